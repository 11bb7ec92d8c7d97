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
_QUERY_PASSWORD = re.compile(r"([?&][^=&#]*(?:password|passwd|pwd|secret|token)=)([^&#]*)", re.IGNORECASE)
#: What a password becomes in printed and recorded URLs.
MASK = "***"
#: The real storage URL, for run files that record it redacted (see :func:`connectable`).
STORAGE_ENV = "YOLO_MPQ_STORAGE"


def redact(url: str) -> str:
    """A storage URL fit to print or record: the password of its user info (any characters, ``@``
    included) and ``password=``-like query parameters replaced by ``***``.

    The one redaction of the project: every URL that is printed, logged, written to a run file
    (``spec.yaml``) or to a study attribute goes through it.
    """
    url = _USERINFO_PASSWORD.sub(rf"\1:{MASK}@\3", url)
    return _QUERY_PASSWORD.sub(rf"\1{MASK}", url)


def secrets_of(url: str) -> list[str]:
    """The passwords in ``url`` (user info and query), as written and percent-decoded."""
    from urllib.parse import unquote

    found = []
    m = _USERINFO_PASSWORD.match(url)
    if m and m.group(2):
        found.append(m.group(2))
    found += [q.group(2) for q in _QUERY_PASSWORD.finditer(url) if q.group(2)]
    out = [s for s in found if s != MASK]
    return [*out, *(unquote(s) for s in out)]


def scrub(text: str, url: str) -> str:
    """``text`` (e.g. a driver's error message) without any password of ``url`` in it."""
    for secret in sorted(set(secrets_of(url)), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return _QUERY_PASSWORD.sub(rf"\1{MASK}", _USERINFO_PASSWORD.sub(rf"\1:{MASK}@\3", text))


def connectable(url: str) -> str:
    """The URL to connect with: a redacted one (from a run file) becomes the real one.

    A URL whose password is ``***`` is replaced by ``$YOLO_MPQ_STORAGE`` when that redacts to
    the same URL; otherwise the masked password is dropped, so the driver reads its own secret
    store (PostgreSQL: ``PGPASSWORD`` or ``~/.pgpass``). A password with characters that URLs
    reserve (``@``, ``/``, ``:``, ``#``, ``?``) is percent-encoded, so it reaches the server whole.
    """
    from urllib.parse import quote, unquote

    env = os.environ.get(STORAGE_ENV)
    if MASK in url and env and redact(env) == url:
        url = env
    m = _USERINFO_PASSWORD.match(url)
    if m:
        password = m.group(2)
        if password == MASK:
            url = f"{m.group(1)}@{m.group(3)}"
        else:
            url = f"{m.group(1)}:{quote(unquote(password), safe='')}@{m.group(3)}"
    url = re.sub(r"([?&])[^=&#]*(?:password|passwd|pwd|secret|token)=" + re.escape(MASK) + r"(&?)",
                 lambda q: q.group(1) if q.group(2) else "", url, flags=re.IGNORECASE)
    return url.rstrip("?&")


def _hint(url: str) -> str:
    """For a recorded (redacted) URL: where the password can come from."""
    if MASK not in url:
        return ""
    return (f" (the run files record this URL without its password: pass --storage URL, set {STORAGE_ENV}=URL, "
            "or give PostgreSQL the password in PGPASSWORD or ~/.pgpass)")


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
    """An RDB storage for running trials, with heartbeats: :func:`fail_stale_trials` fails a killed
    worker's trial (with the reason) and enqueues its retry."""
    import optuna
    from optuna.storages import RDBStorage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    given, url = url, connectable(url)
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
            return RDBStorage(url, heartbeat_interval=heartbeat, grace_period=grace, **kwargs)
    except Exception as exc:  # noqa: BLE001 - connection errors of every driver
        reason = (scrub(str(exc), given).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot open the study storage {redact(given)}: {reason}{_hint(given)}") from None


def open_existing(url: str) -> RDBStorage:
    """Open an existing Optuna RDB storage read-mostly (no table creation, no migration).

    Raises:
        UserError: no database driver, the server cannot be reached, or it holds no
            Optuna tables.
    """
    import optuna
    import sqlalchemy.exc

    shown = redact(url)
    given, url = url, connectable(url)
    no_study = f"{shown} holds no Optuna study yet: start `search run --storage URL` first"
    try:
        storage = optuna.storages.RDBStorage(url, skip_compatibility_check=True, skip_table_creation=True)
        storage.get_all_studies()
    except ImportError as exc:
        reason = scrub(str(exc.__cause__ or exc), given)
        raise UserError(f"{shown}: no database driver for this URL ({reason}); for PostgreSQL "
                        "install the postgres extra: pip install -e '.[postgres]'") from None
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
        cause: BaseException = exc
        while not isinstance(cause, sqlalchemy.exc.SQLAlchemyError) and cause.__cause__ is not None:
            cause = cause.__cause__  # Optuna wraps SQLAlchemy's errors
        if isinstance(cause, sqlalchemy.exc.ArgumentError):
            raise UserError(f"{shown}: not a valid storage URL ({scrub(str(cause), given)})") from None
        orig = getattr(cause, "orig", None) or cause
        text = scrub(str(orig), given).strip()
        first = text.splitlines()[0] if text else type(orig).__name__
        if isinstance(cause, sqlalchemy.exc.ProgrammingError) or "no such table" in first or (
                "relation" in first and "does not exist" in first):
            raise UserError(no_study) from None
        raise UserError(f"cannot open storage {shown}: {first}{_hint(given)}") from None
    return storage


def delete_study(url: str, name: str) -> None:
    """Delete study ``name`` from the storage (nothing happens when there is none)."""
    import optuna

    try:
        optuna.delete_study(study_name=name, storage=open_storage(url))
    except KeyError:
        pass


def fail_stale_trials(study: optuna.Study) -> list[int]:
    """Fail the RUNNING trials whose worker died, saying so, and enqueue each one's retry (once).

    A worker on this host whose process is gone is found at once (:func:`search.liveness.process_gone`);
    any other, once its heartbeat is older than the grace period. Each trial gets the ``failure``
    user attribute before it turns FAIL, and a WAITING copy of its parameters (``retry_of``), which
    the next ``optimize`` of any worker runs first, unless the trial was itself a retry.
    Returns the numbers of the trials failed here.
    """
    import optuna
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

    from search.liveness import process_gone

    S = optuna.trial.TrialState
    storage = study._storage
    stale: set[int] = set()
    if isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage):
        stale = set(storage._get_stale_trial_ids(study._study_id))
    failed = []
    for t in study.get_trials(deepcopy=False, states=(S.RUNNING,)):
        worker = str(t.user_attrs.get("worker", "?"))
        if process_gone(worker):
            reason = f"worker {worker} died (its process is gone)"
        elif t._trial_id in stale:
            reason = f"worker {worker} died or was cut off (no heartbeat within the grace period)"
        else:
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "failure", reason)
            storage.set_trial_user_attr(t._trial_id, "worker_died", True)
            if not storage.set_trial_state_values(t._trial_id, state=S.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first
        failed.append(t.number)
        if t.user_attrs.get("retry_of") is None and t.params:
            enqueue_retry(study, t)
    return failed


def enqueue_retry(study: optuna.Study, failed: optuna.trial.FrozenTrial) -> None:
    """Enqueue ``failed``'s parameters again, to run next: ahead of the configurations already waiting
    (the policy configurations), or the budget could be spent before the retry's turn comes."""
    import optuna

    S = optuna.trial.TrialState
    waiting = study.get_trials(deepcopy=False, states=(S.WAITING,))
    attrs = {"policy": failed.user_attrs.get("policy") or "", "retry_of": failed.number}
    study.enqueue_trial(dict(failed.params), user_attrs=attrs)
    if not waiting:
        return
    # Optuna runs waiting trials in number order: exchange the retry with the first one waiting
    first = waiting[0]
    retry = study.get_trials(deepcopy=False, states=(S.WAITING,))[-1]
    storage = study._storage
    moved = {"policy": first.user_attrs.get("policy") or "", "retry_of": first.user_attrs.get("retry_of")}
    storage.set_trial_system_attr(retry._trial_id, "fixed_params", first.system_attrs.get("fixed_params", {}))
    for key, value in moved.items():
        storage.set_trial_user_attr(retry._trial_id, key, value)
    storage.set_trial_system_attr(first._trial_id, "fixed_params", dict(failed.params))
    for key, value in attrs.items():
        storage.set_trial_user_attr(first._trial_id, key, value)
