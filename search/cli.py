"""The ``search`` command line.

Each subcommand lives in ``search/commands/<name>.py`` with ``register(subparsers)``; those
modules import nothing heavy at import time, so ``search --help`` stays fast and works
without torch, a GPU or TensorRT.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from collections.abc import Sequence

COMMANDS = ("validate", "inspect", "eval", "quantize", "sweep", "run", "report", "export", "dashboard", "schema")

DESCRIPTION = """Sensitivity-driven mixed-precision search for Ultralytics YOLO detectors.

With no --study, commands use the bundled offline demo (studies/demo.yaml)."""


def build_parser() -> argparse.ArgumentParser:
    """The ``search`` argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="search", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"search.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"search.commands.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``search`` command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and not argv[0].startswith("-"):
        known = [a for a in parser._subparsers._group_actions[0].choices]  # type: ignore[union-attr]
        if argv[0] not in known:
            near = difflib.get_close_matches(argv[0], known, n=1)
            hint = f" Did you mean '{near[0]}'?" if near else ""
            parser.print_usage(sys.stderr)
            print(f"search: error: unknown command '{argv[0]}'.{hint} Commands: {', '.join(known)}", file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    if args.version:
        from importlib.metadata import version

        print(version("yolo-mpq"))
        return 0
    if not args.command:
        parser.print_help()
        return 0
    from mpq.errors import UserError

    try:
        return int(args.handler(args) or 0)
    except UserError as exc:
        from search.console import console_err

        console_err.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; finished work is kept and the next run resumes from it", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
