"""``search validate STUDY``: report every problem of a study spec at once: keys, values, files,
and the data's contents (annotations parse, every image exists and decodes, ids exist, the
calibration list is not empty)."""

from __future__ import annotations

import argparse

from search.commands import add_study_arg, study_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check a study spec: keys, values and files, all problems at once",
                       description=__doc__)
    add_study_arg(p, positional=True, model=False)
    p.add_argument("--no-files", action="store_true", help="check keys and values only, not that files exist")
    p.add_argument("--no-data", action="store_true",
                   help="check that the data files exist, not their contents (annotations, image decoding)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from search.console import console
    from search.spec import validate_spec_file

    path = study_path(args.study)
    result = validate_spec_file(path, check_files=not args.no_files)
    problems = list(result.problems)
    if not problems and result.spec is not None and not (args.no_files or args.no_data):
        from search.data_check import check_data

        problems = check_data(result.spec)
    if problems:
        console.print(f"[bold red]{path}: {len(problems)} problem(s)[/]")
        for prob in problems:
            console.print(f"  [red]-[/] {prob}", highlight=False)
        return 1
    spec = result.spec
    assert spec is not None
    console.print(f"[green]{path}: valid[/] (study '{spec.name}', model {spec.model.name}, imgsz {spec.imgsz}, "
                  f"backend {spec.backend.name}, candidates {', '.join(map(str, spec.candidates))})",
                  highlight=False)
    return 0
