"""A throwaway PostgreSQL server on loopback, for the tests and for CI.

It uses the server binaries of Debian's ``postgresql`` package
(``/usr/lib/postgresql/<version>/bin``): ``initdb`` into a folder of its own, ``pg_ctl``
to start the server on ``127.0.0.1`` only (the Unix socket lives in that folder too), and
``psql`` to create a login role (with ``CREATEDB``, so tests can make a database each)
and a database. Run as root, the server runs as the ``postgres`` user, since PostgreSQL
refuses to run as root.

``.ci/run`` calls it with the system Python (stdlib only)::

    python3 tests/pgserver.py start /tmp/yolo-mpq-ci-postgres   # prints the URL
    python3 tests/pgserver.py stop /tmp/yolo-mpq-ci-postgres

Starting is idempotent: a server already running from that folder is reused and its URL
printed again. ``tests/conftest.py`` uses the same functions when
``YOLO_MPQ_TEST_POSTGRES`` is not set.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

USER = "yolo_mpq"
PASSWORD = "yolo_mpq"
DATABASE = "yolo_mpq"
HOST = "127.0.0.1"
_PORT_FILE = "yolo_mpq_port"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries here, or the server would not start (message says why)."""


def find_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin`` holding ``initdb``, ``pg_ctl`` and ``psql``."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                        key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parent.name.split(".")])
    for cand in reversed(candidates):
        d = Path(cand)
        if all((d / exe).is_file() for exe in ("initdb", "pg_ctl", "psql")):
            return d
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl") and shutil.which("psql"):
        return Path(initdb).parent
    return None


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def url(port: int, database: str = DATABASE) -> str:
    """The client URL of the test role on this server."""
    return f"postgresql://{USER}:{PASSWORD}@{HOST}:{port}/{database}"


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    if shutil.which("runuser") is None:
        raise PostgresUnavailable("running as root, and runuser (util-linux) is missing to drop to 'postgres'")
    return ["runuser", "-u", "postgres", "--", *cmd]


def _run(cmd: list[str], what: str) -> str:
    proc = subprocess.run(_as_server_user(cmd), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise PostgresUnavailable(f"{what} failed ({' '.join(cmd)}): {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def _running(bin_dir: Path, datadir: Path) -> bool:
    if not (datadir / "PG_VERSION").is_file():
        return False
    proc = subprocess.run(_as_server_user([str(bin_dir / "pg_ctl"), "status", "-D", str(datadir)]),
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return proc.returncode == 0


def _prepare_dir(datadir: Path) -> None:
    datadir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresUnavailable("running as root, but there is no 'postgres' user to run the server "
                                      "(install Debian's postgresql package)") from None
        os.chown(datadir, pw.pw_uid, pw.pw_gid)
    datadir.chmod(0o700)


def _psql(bin_dir: Path, datadir: Path, port: int, sql: str, database: str = "postgres") -> str:
    return _run([str(bin_dir / "psql"), "-h", str(datadir), "-p", str(port), "-U", "postgres", "-d", database,
                 "-v", "ON_ERROR_STOP=1", "-At", "-c", sql], "psql")


def start(datadir: str | os.PathLike[str], port: int | None = None) -> str:
    """Start (or reuse) a server whose files live in ``datadir``; return the test role's URL.

    Args:
        datadir: Folder for the cluster (created; reused when it already holds one).
        port: TCP port on 127.0.0.1 (default: a free one; a running server keeps its own).

    Raises:
        PostgresUnavailable: no server binaries, or the server did not start.
    """
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise PostgresUnavailable("no PostgreSQL server binaries (initdb, pg_ctl, psql) under "
                                  "/usr/lib/postgresql/*/bin or on PATH; install Debian's postgresql package")
    datadir = Path(datadir).resolve()
    port_file = datadir / _PORT_FILE
    if _running(bin_dir, datadir) and port_file.is_file():
        port = int(port_file.read_text())
    else:
        if not (datadir / "PG_VERSION").is_file():
            if datadir.exists() and any(datadir.iterdir()):
                shutil.rmtree(datadir)  # a half-made cluster from an interrupted run
            _prepare_dir(datadir)
            _run([str(bin_dir / "initdb"), "-D", str(datadir), "-U", "postgres", "-E", "UTF8",
                  "--auth-local=trust", "--auth-host=scram-sha-256", "--no-instructions"], "initdb")
        last_error: PostgresUnavailable | None = None
        for attempt in range(3):
            port = port if (port and attempt == 0) else free_port()
            opts = (f"-c listen_addresses={HOST} -p {port} -c unix_socket_directories={datadir} "
                    "-c max_connections=200 -c fsync=off")
            try:
                _run([str(bin_dir / "pg_ctl"), "start", "-D", str(datadir), "-l", str(datadir / "server.log"),
                      "-w", "-t", "60", "-o", opts], "pg_ctl start")
                break
            except PostgresUnavailable as exc:  # e.g. the port was taken between choosing and binding
                last_error = exc
                time.sleep(0.5)
        else:
            log = datadir / "server.log"
            tail = log.read_text()[-2000:] if log.is_file() else ""
            raise PostgresUnavailable(f"{last_error}\n{tail}")
        port_file.write_text(str(port))
    assert port is not None
    role_sql = (f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{USER}') THEN "
                f"CREATE ROLE {USER} LOGIN CREATEDB PASSWORD '{PASSWORD}'; END IF; END $$;")
    _psql(bin_dir, datadir, port, role_sql)
    if _psql(bin_dir, datadir, port, f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'").strip() != "1":
        _psql(bin_dir, datadir, port, f"CREATE DATABASE {DATABASE} OWNER {USER}")
    return url(port)


def stop(datadir: str | os.PathLike[str], remove: bool = False) -> None:
    """Stop the server of ``datadir`` (if running); with ``remove``, delete the folder too."""
    bin_dir = find_bin_dir()
    datadir = Path(datadir).resolve()
    if bin_dir is not None and _running(bin_dir, datadir):
        _run([str(bin_dir / "pg_ctl"), "stop", "-D", str(datadir), "-m", "fast", "-w", "-t", "60"], "pg_ctl stop")
    if remove and datadir.exists():
        shutil.rmtree(datadir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("datadir", type=Path)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--remove", action="store_true", help="stop: delete the cluster folder too")
    args = parser.parse_args(argv)
    try:
        if args.action == "start":
            print(start(args.datadir, args.port))
        else:
            stop(args.datadir, remove=args.remove)
    except PostgresUnavailable as exc:
        print(f"pgserver: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
