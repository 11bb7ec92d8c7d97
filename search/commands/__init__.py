"""Subcommands of ``search``; each module has ``register(subparsers)`` and no heavy imports."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from search.spec import StudySpec

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_STUDY = REPO_ROOT / "studies" / "demo.yaml"


TRUST_HELP = ("load a .pt checkpoint that the safe loader refuses (a .pt is a pickle: a full load runs any code "
              "the file carries; only for checkpoints you trust)")


def add_trust_arg(parser: argparse.ArgumentParser) -> None:
    """``--trust-checkpoint``: the opt-in to a code-running checkpoint load."""
    parser.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)


def add_study_arg(parser: argparse.ArgumentParser, positional: bool = False, model: bool = True) -> None:
    """``--study S`` (default: the bundled demo study), and ``--trust-checkpoint`` for commands that load the model."""
    if model:
        add_trust_arg(parser)
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


def load_study(value: Path | None, *, trust: bool = False, **overrides: Any) -> StudySpec:
    """Load the study spec (default: the demo), with dotted-key overrides; ``trust``: ``--trust-checkpoint``."""
    from search.spec import load_spec

    if trust:
        overrides["trust_checkpoint"] = True
    return load_spec(study_path(value), **overrides)


def spec_value(kind: str) -> Callable[[str], Any]:
    """An argparse ``type`` that checks a value with the spec's validator of ``kind`` (see
    :data:`search.spec.VALUE_TYPES`): ``--budget 0`` is refused as ``search.budget: 0`` is."""

    def parse(text: str) -> Any:
        from search.spec import check_value

        try:
            return check_value(kind, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None

    parse.__name__ = kind  # argparse names the type in its messages
    return parse
