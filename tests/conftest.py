"""Shared fixtures: the bundled demo study, its model and data (built offline, cached)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("PYTHONHASHSEED", "0")

REPO = Path(__file__).resolve().parents[1]
DEMO_STUDY = REPO / "studies" / "demo.yaml"


@pytest.fixture(scope="session")
def demo_spec():
    from search.spec import load_spec

    return load_spec(DEMO_STUDY)


@pytest.fixture(scope="session")
def demo_model(demo_spec):
    """The fused float demo detector (do not modify; use ``.fresh()`` for a copy)."""
    from mpq.model import load_model

    return load_model(demo_spec.model, demo_spec.imgsz, max_det=demo_spec.evaluation.max_det)


@pytest.fixture(scope="session")
def demo_subset(demo_spec):
    from mpq.data import load_coco_subset

    ds = demo_spec.dataset
    return load_coco_subset(ds.images, ds.annotations, max_images=ds.max_images, image_ids=ds.image_ids)


@pytest.fixture(scope="session")
def demo_calib(demo_spec):
    from mpq.data import read_calibration_list

    return read_calibration_list(demo_spec.calibration.source, demo_spec.calibration.max_images)


@pytest.fixture(scope="session")
def ultralytics_assets() -> Path:
    from mpq.env import import_ultralytics

    return Path(import_ultralytics().__file__).parent / "assets"


# --------------------------------------------------------------------------------------
# External servers and browsers (PostgreSQL, Chromium): .ci/run installs and starts them
# and sets YOLO_MPQ_TEST_REQUIRE=postgres,chromium, so there a missing one fails the test
# instead of skipping it.
# --------------------------------------------------------------------------------------
def _unavailable(component: str, reason: str) -> None:
    required = {c.strip() for c in os.environ.get("YOLO_MPQ_TEST_REQUIRE", "").split(",")}
    if component in required:
        pytest.fail(f"{reason} (YOLO_MPQ_TEST_REQUIRE names {component})", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server():
    """URL of a PostgreSQL server for the tests.

    ``YOLO_MPQ_TEST_POSTGRES`` (set by ``.ci/run``) if given; else a throwaway server on
    127.0.0.1 started from Debian's binaries (``tests/pgserver.py``) and removed at the end.
    """
    url = os.environ.get("YOLO_MPQ_TEST_POSTGRES")
    if url:
        yield url
        return
    import tempfile

    import pgserver

    if pgserver.find_bin_dir() is None:
        _unavailable("postgres", "no PostgreSQL server: YOLO_MPQ_TEST_POSTGRES is not set and no initdb/pg_ctl "
                     "under /usr/lib/postgresql/*/bin (apt-get install postgresql, or run .ci/run)")
    datadir = Path(tempfile.mkdtemp(prefix="yolo-mpq-pg-"))
    try:
        url = pgserver.start(datadir)
    except pgserver.PostgresUnavailable as exc:
        pgserver.stop(datadir, remove=True)
        _unavailable("postgres", f"no PostgreSQL server: could not start one: {exc}")
    yield url
    pgserver.stop(datadir, remove=True)


@pytest.fixture
def postgres_url(postgres_server, request):
    """A fresh, empty database on the test PostgreSQL server, dropped after the test."""
    import re
    import uuid

    try:
        import psycopg
    except ImportError:
        _unavailable("postgres", "psycopg is not installed (pip install -e '.[postgres]')")
    from sqlalchemy.engine import make_url

    base = make_url(postgres_server)
    name = "t_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:40] + "_" + uuid.uuid4().hex[:8]
    conninfo = dict(host=base.host, port=base.port, user=base.username, password=base.password,
                    dbname=base.database or "postgres")
    try:
        with psycopg.connect(**conninfo, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.errors.InsufficientPrivilege:
        yield postgres_server  # a role without CREATEDB: share its database (study names are unique)
        return
    except psycopg.OperationalError as exc:
        _unavailable("postgres", f"no PostgreSQL server: cannot connect to {base!r}: {exc}")
    yield base.set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(**conninfo, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of a Chromium (or Chrome) binary for headless screenshots."""
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    _unavailable("chromium", "Chromium is not installed (apt-get install chromium, or run .ci/run)")
    raise AssertionError("unreachable")
