"""Shared rich consoles (stdout for results, stderr for progress and errors)."""

from __future__ import annotations

from rich.console import Console

console = Console()
console_err = Console(stderr=True)


def warn(message: str) -> None:
    """One warning line on stderr (e.g. a cached artifact that is rebuilt, naming its file)."""
    from rich.markup import escape

    console_err.print(f"[bold yellow]warning:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True)
