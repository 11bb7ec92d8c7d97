"""Shared rich consoles (stdout for results, stderr for progress and errors)."""

from __future__ import annotations

from rich.console import Console

console = Console()
console_err = Console(stderr=True)
