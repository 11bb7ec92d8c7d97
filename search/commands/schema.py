"""``search schema``: print the JSON schema of study specs."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("schema", help="print the JSON schema of study spec files", description=__doc__)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import json

    from search.spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0
