"""Issue 14, hardening: a run file's redacted URL connects with the password from the environment
(PGPASSWORD / YOLO_MPQ_STORAGE), and a password with any character reaches PostgreSQL."""

from __future__ import annotations

import uuid

import pytest

pytestmark = pytest.mark.postgres


def test_a_redacted_url_connects_with_the_password_from_the_environment(postgres_url, monkeypatch):
    from sqlalchemy.engine import make_url

    from search.storage import STORAGE_ENV, open_existing, open_storage, redact

    url = make_url(postgres_url)
    if not url.password:
        pytest.skip("the test server has no password")
    real = url.render_as_string(hide_password=False)
    open_storage(real).get_all_studies()  # the tables
    shown = redact(real)
    assert f":{url.password}@" not in shown and ":***@" in shown
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    monkeypatch.setenv("PGPASSWORD", url.password)
    open_existing(shown).get_all_studies()  # the mask is dropped: libpq reads PGPASSWORD (or ~/.pgpass)
    monkeypatch.delenv("PGPASSWORD")
    monkeypatch.setenv(STORAGE_ENV, real)
    open_existing(shown).get_all_studies()


def test_a_password_with_reserved_characters_connects(postgres_url, monkeypatch):
    import psycopg
    from sqlalchemy.engine import make_url

    from search.storage import open_storage

    base = make_url(postgres_url)
    role, password = f"r_{uuid.uuid4().hex[:8]}", "p@ss:w/rd?#x@y"
    conninfo = dict(host=base.host, port=base.port, user=base.username, password=base.password,
                    dbname=base.database)
    with psycopg.connect(**conninfo, autocommit=True) as conn:
        try:
            conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        except psycopg.errors.InsufficientPrivilege:
            pytest.skip("the test server's role cannot create roles")
    try:
        monkeypatch.delenv("PGPASSWORD", raising=False)
        url = f"postgresql://{role}:{password}@{base.host}:{base.port}/{base.database}"
        open_storage(url).get_all_studies()
    finally:
        with psycopg.connect(**conninfo, autocommit=True) as conn:
            conn.execute(f"DROP ROLE {role}")
