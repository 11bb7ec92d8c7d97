"""Subcommands of ``search``; each module has ``register(subparsers)`` and no heavy imports."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from search.spec import StudySpec

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_STUDY = REPO_ROOT / "studies" / "demo.yaml"


def add_study_arg(parser: argparse.ArgumentParser, positional: bool = False) -> None:
    """``--study S`` (default: the bundled demo study)."""
    if positional:
        parser.add_argument("study", nargs="?", type=Path, default=None,
                            help="study spec YAML (default: studies/demo.yaml, the offline demo)")
    else:
        parser.add_argument("--study", "-s", type=Path, default=None,
                            help="study spec YAML (default: studies/demo.yaml, the offline demo)")


def study_path(value: Path | None) -> Path:
    """The study spec file to use (default: the bundled demo), checked to exist."""
    from mpq.errors import UserError

    path = value or DEFAULT_STUDY
    if not path.exists():
        if value is None:
            raise UserError(f"the bundled demo study {DEFAULT_STUDY} is missing; pass --study PATH")
        raise UserError(f"study spec not found: {path}")
    return path


def load_study(value: Path | None, **overrides: Any) -> StudySpec:
    """Load the study spec (default: the demo), with dotted-key overrides."""
    from search.spec import load_spec

    return load_spec(study_path(value), **overrides)
