"""``search dashboard RUN_DIR | --storage URL``: optuna-dashboard on a study's storage.

The storage is the run directory's ``study.db`` (SQLite), or the storage recorded in its
``spec.yaml`` when that is not SQLite (a PostgreSQL study shared by several workers), or
any ``--storage URL``. The server listens on loopback unless ``--host`` says otherwise,
prints the address of the study page, and runs until Ctrl-C. Trials show their metrics,
assignment summary and artifact paths (user attributes), and multi-objective studies
their Pareto front.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpq.errors import UserError
from search.storage import default_url, open_existing, redact, sqlite_file

LOOPBACK = ("127.0.0.1", "localhost", "::1")
_URL_RE = re.compile(r"^[a-z0-9+]+://")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="optuna-dashboard on a study's storage (run dir or --storage URL)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", nargs="?", type=Path, default=None,
                   help="run directory made by `search run` (default: the --study spec's run directory)")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="Optuna storage URL instead of a run directory (postgresql://user:pass@host/db, "
                        "sqlite:///path/study.db)")
    p.add_argument("--study", "-s", default=None, metavar="NAME|SPEC",
                   help="the Optuna study to point at (default: the run's spec name, or the only study in the "
                        "storage), or a study spec YAML whose run directory and storage are used "
                        "(default: studies/demo.yaml)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0 picks a free one)")
    p.add_argument("--verbose", "-v", action="store_true", help="log every HTTP request")
    p.set_defaults(handler=run)


# --------------------------------------------------------------------------------------
# Which storage, which study
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """What the dashboard serves: a storage URL and the study to point at (if known)."""

    storage: str
    study_name: str | None
    source: str  # where the storage came from, for messages


def _read_run_spec(run_dir: Path) -> dict[str, Any]:
    """``name`` and ``search.storage`` of ``RUN_DIR/spec.yaml`` (empty when there is none)."""
    import yaml

    from search.spec import expand_vars

    path = run_dir / "spec.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc}); pass --storage URL instead") from None
    if not isinstance(data, dict):
        return {}
    search = data.get("search") if isinstance(data.get("search"), dict) else {}
    storage = search.get("storage") if search else None
    return {"name": data.get("name"),
            "storage": expand_vars(str(storage)) if storage else None}


def resolve_target(run_dir: Path | None, storage: str | None, study: Path | None,
                   study_name: str | None = None) -> Target:
    """Work out the storage URL and study name from the command line.

    Args:
        run_dir: A run directory (``runs/<study>/``), or None.
        storage: An explicit storage URL (wins over the run directory), or None.
        study: A study spec YAML (its run directory and storage are used when neither
            ``run_dir`` nor ``storage`` is given; default: the bundled demo).
        study_name: The Optuna study name to point at (default: the spec's name).

    Raises:
        UserError: a missing run directory or study database, or a malformed URL.
    """
    name = study_name
    if storage is not None:
        if not _URL_RE.match(storage):
            raise UserError(f"--storage {storage!r} is not a database URL (e.g. "
                            "postgresql://user:password@host:5432/db or sqlite:///runs/demo/study.db)")
        if name is None and run_dir is not None:
            name = _read_run_spec(run_dir).get("name") or run_dir.name
        if name is None and study is not None:
            name = _load_spec(study).name
        return Target(_check_sqlite(storage, "--storage"), name, "--storage")
    if run_dir is None:
        spec = _load_spec(study)
        run_dir = spec.run_dir()
        if not run_dir.is_dir() and spec.search.storage and not spec.search.storage.startswith("sqlite"):
            return Target(spec.search.storage, name or spec.name, f"search.storage of {study}")
        if not run_dir.is_dir():
            raise UserError(f"run directory {run_dir} not found (study '{spec.name}'): run `search run"
                            f"{' --study ' + str(study) if study else ''}` first, or pass RUN_DIR or --storage URL")
    if not run_dir.is_dir():
        hint = " (it is a file; pass the folder made by `search run`)" if run_dir.exists() else ""
        raise UserError(f"run directory {run_dir} not found{hint}: pass the folder made by `search run` "
                        "(runs/<study-name>/) or --storage URL")
    recorded = _read_run_spec(run_dir)
    name = name or recorded.get("name") or run_dir.name
    rec_storage = recorded.get("storage")
    if rec_storage and not rec_storage.startswith("sqlite"):
        return Target(rec_storage, name, f"search.storage in {run_dir / 'spec.yaml'}")
    db = run_dir / "study.db"
    if not db.is_file():
        raise UserError(f"{run_dir} holds no study.db: has `search run` been started there? "
                        "(for a PostgreSQL study pass --storage URL)")
    return Target(default_url(run_dir), name, str(run_dir))


def _load_spec(study: Path | None) -> Any:
    from search.commands import study_path
    from search.spec import load_spec

    return load_spec(study_path(study), check_files=False)


def is_spec_path(value: str) -> bool:
    """``--study`` names a spec file (``*.yaml``/``*.yml`` or an existing file) rather than a study."""
    return value.endswith((".yaml", ".yml")) or Path(value).is_file()


def _check_sqlite(url: str, where: str) -> str:
    """An SQLite URL must name an existing file (Optuna would silently create an empty one)."""
    path = sqlite_file(url)
    if path is not None and not path.is_file():
        raise UserError(f"{where} {url}: no such SQLite file {path}")
    return url


# --------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------
def study_page(base: str, study_id: int) -> str:
    """The dashboard page of one study."""
    return f"{base}/dashboard/studies/{study_id}"


def make_server(app: Any, host: str, port: int, verbose: bool = False) -> Any:
    """A threaded wsgiref server for the dashboard app, bound (``port`` 0: a free port).

    Raises:
        UserError: the address cannot be bound (port in use, unknown host).
    """
    import socket
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer
    from wsgiref.simple_server import make_server as wsgi_make_server

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Handler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            if verbose:
                super().log_message(format, *args)

    try:
        return wsgi_make_server(host, port, app, server_class=Server, handler_class=Handler)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pass another --port "
                        "(0 picks a free one) or --host") from None


def run(args: argparse.Namespace) -> int:
    spec_file = Path(args.study) if args.study and is_spec_path(args.study) else None
    asked_name = args.study if args.study and spec_file is None else None
    target = resolve_target(args.run_dir, args.storage, spec_file, asked_name)
    storage = open_existing(target.storage)
    studies = {s.study_name: s._study_id for s in storage.get_all_studies()}
    if target.study_name is not None and target.study_name not in studies:
        if asked_name is not None or len(studies) != 1:
            known = ", ".join(sorted(studies)) or "none"
            raise UserError(f"no study named '{target.study_name}' in {redact(target.storage)} "
                            f"(studies there: {known}); pass --study NAME")
        target = Target(target.storage, next(iter(studies)), target.source)
    if target.study_name is None and len(studies) == 1:
        target = Target(target.storage, next(iter(studies)), target.source)

    from optuna_dashboard import wsgi

    app = wsgi(storage)
    server = make_server(app, args.host, args.port, verbose=args.verbose)
    host, port = server.server_address[:2]
    shown_host = f"[{host}]" if ":" in host else host
    base = f"http://{shown_host}:{port}"
    print(f"optuna-dashboard on {redact(target.storage)} (from {target.source})", flush=True)
    print(f"listening on {base}/dashboard", flush=True)
    if target.study_name is not None:
        print(f"study '{target.study_name}': {study_page(base, studies[target.study_name])}", flush=True)
    elif studies:
        for name, sid in sorted(studies.items()):
            print(f"study '{name}': {study_page(base, sid)}", flush=True)
    else:
        print("no study in this storage yet; it appears once a worker starts (reload the page)", flush=True)
    if args.host not in LOOPBACK:
        print(f"warning: listening on {args.host}, reachable from other machines; the dashboard has no "
              "login and can edit or delete studies", file=sys.stderr, flush=True)
    print("Ctrl-C to stop", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("dashboard stopped", flush=True)
    finally:
        server.server_close()
    return 0
