"""Optuna storages: which URL a run uses, opening it, and printing it without its password.

``search run``, ``search report``, ``search export`` and ``search dashboard`` all find a study's
storage here: the ``--storage`` URL, else the spec's ``search.storage``, else the run
directory's ``study.db`` (:func:`default_url`).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpq.errors import UserError

if TYPE_CHECKING:
    import optuna
    from optuna.storages import RDBStorage

HEARTBEAT_S = 20
GRACE_S = 60
# Overrides (seconds) for the heartbeat of running trials and the grace period after which a
# silent worker's trial is failed and retried; the parallel-worker test shortens them.
HEARTBEAT_ENV = "YOLO_MPQ_HEARTBEAT_S"
GRACE_ENV = "YOLO_MPQ_GRACE_S"

_USERINFO_PASSWORD = re.compile(r"^([A-Za-z0-9+.-]+://[^:/@?#]*):(.*)@([^@]*)$")
_QUERY_PASSWORD = re.compile(r"([?&](?:password|passwd|pwd)=)[^&#]*", re.IGNORECASE)


def redact(url: str) -> str:
    """A storage URL fit to print: the password of its user info (any characters, ``@`` included)
    and ``password=`` query parameters replaced by ``***``."""
    url = _USERINFO_PASSWORD.sub(r"\1:***@\3", url)
    return _QUERY_PASSWORD.sub(r"\1***", url)


def default_url(run_dir: Path) -> str:
    """The SQLite URL of a run directory's ``study.db`` (absolute: the working directory does not matter)."""
    return f"sqlite:///{(Path(run_dir) / 'study.db').resolve()}"


def storage_url(run_dir: Path, *, given: str | None = None, spec_storage: str | None = None) -> str:
    """The storage of a run: ``given`` (``--storage``), else the spec's ``search.storage``, else ``study.db``."""
    return given or spec_storage or default_url(run_dir)


def sqlite_file(url: str) -> Path | None:
    """The database file of an ``sqlite:///`` URL (``None`` for other URLs and in-memory databases)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):]
    return Path(path) if path not in ("", ":memory:") else None


def open_storage(url: str) -> RDBStorage:
    """An RDB storage for running trials, with heartbeats: a killed worker's trial fails, then retries once."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    else:
        kwargs["engine_kwargs"] = {"pool_pre_ping": True}
    try:
        heartbeat = int(os.environ.get(HEARTBEAT_ENV, HEARTBEAT_S))
        grace = int(os.environ.get(GRACE_ENV, max(GRACE_S, 3 * heartbeat)))
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna, and used as documented
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, heartbeat_interval=heartbeat, grace_period=grace,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
                              **kwargs)
    except Exception as exc:  # noqa: BLE001 - connection errors of every driver
        raise UserError(f"cannot open the study storage {redact(url)}: {exc}") from exc


def open_existing(url: str) -> RDBStorage:
    """Open an existing Optuna RDB storage read-mostly (no table creation, no migration).

    Raises:
        UserError: no database driver, the server cannot be reached, or it holds no
            Optuna tables.
    """
    import optuna
    import sqlalchemy.exc

    shown = redact(url)
    no_study = f"{shown} holds no Optuna study yet: start `search run --storage URL` first"
    try:
        storage = optuna.storages.RDBStorage(url, skip_compatibility_check=True, skip_table_creation=True)
        storage.get_all_studies()
    except ImportError as exc:
        raise UserError(f"{shown}: no database driver for this URL ({exc.__cause__ or exc}); for PostgreSQL "
                        "install the postgres extra: pip install -e '.[postgres]'") from None
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
        cause: BaseException = exc
        while not isinstance(cause, sqlalchemy.exc.SQLAlchemyError) and cause.__cause__ is not None:
            cause = cause.__cause__  # Optuna wraps SQLAlchemy's errors
        if isinstance(cause, sqlalchemy.exc.ArgumentError):
            raise UserError(f"{shown}: not a valid storage URL ({cause})") from None
        orig = getattr(cause, "orig", None) or cause
        text = str(orig).strip()
        first = text.splitlines()[0] if text else type(orig).__name__
        if isinstance(cause, sqlalchemy.exc.ProgrammingError) or "no such table" in first or (
                "relation" in first and "does not exist" in first):
            raise UserError(no_study) from None
        raise UserError(f"cannot open storage {shown}: {first}") from None
    return storage


def delete_study(url: str, name: str) -> None:
    """Delete study ``name`` from the storage (nothing happens when there is none)."""
    import optuna

    try:
        optuna.delete_study(study_name=name, storage=open_storage(url))
    except KeyError:
        pass


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail the RUNNING trials whose worker stopped heartbeating (Optuna retries them once)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
