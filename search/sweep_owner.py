"""The sweep-ownership protocol: one worker computes a study's sensitivity table, every worker reads it.

Through the study's user attributes, so it works across machines with nothing but the storage:

1. the worker that creates the study claims the sweep at once (``sweep_owner``,
   ``sweep_heartbeat``);
2. the owner computes (or loads) the table, refreshing ``sweep_heartbeat`` as it goes, runs
   ``before_publish`` (the study enqueues its policy configurations there) and publishes the
   table as ``sensitivity``;
3. any other worker waits for ``sensitivity``; if the owner's heartbeat is older than
   :data:`SWEEP_STALE_S`, it takes the sweep over.

Every worker keeps a copy of the table in its run directory.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from mpq.files import write_json
from search.sensitivity import SensitivityTable, load_cached, run_sweep, table_path

if TYPE_CHECKING:
    import optuna

    from search.pipeline import TrialPipeline

SWEEP_STALE_S = 180


def claim(study: optuna.Study, worker: str) -> None:
    """Make ``worker`` the owner of the study's sweep."""
    study.set_user_attr("sweep_owner", worker)
    study.set_user_attr("sweep_heartbeat", time.time())


def published(study: optuna.Study) -> SensitivityTable | None:
    """The table published in the study, if any."""
    attrs = study.user_attrs
    return SensitivityTable.from_json(json.loads(attrs["sensitivity"])) if "sensitivity" in attrs else None


class SharedSweep:
    """The sensitivity table of a study shared through its storage (see the module docstring).

    Args:
        study: the Optuna study.
        pipeline: the study's resources and float baseline (to compute the table).
        worker: this worker's id.
        log: where progress messages go.
        progress: show the sweep's progress bar.
    """

    def __init__(self, study: optuna.Study, pipeline: TrialPipeline, *, worker: str,
                 log: Callable[[str], None], progress: bool = True) -> None:
        self.study = study
        self.pipeline = pipeline
        self.worker = worker
        self.log = log
        self.progress = progress
        self._last_beat = 0.0

    def ensure(self, created: bool, before_publish: Callable[[SensitivityTable], None]) -> SensitivityTable:
        """The table: published by another worker, or computed (loaded) here and published."""
        table = published(self.study)
        if table is None and not created:
            table = self._wait()
        if table is not None:
            self._save_local(table)
            return table
        claim(self.study, self.worker)
        self._last_beat = time.time()
        res = self.pipeline.resources
        cached = load_cached(res)
        table = cached if cached is not None else run_sweep(res, self.pipeline.baseline, progress=self.progress,
                                                             heartbeat=self._heartbeat)
        self.study.set_user_attr("sweep_heartbeat", time.time())
        before_publish(table)
        self.study.set_user_attr("sensitivity", json.dumps(table.to_json()))
        return table

    def _wait(self) -> SensitivityTable | None:
        """Wait for the owner's table; ``None`` when its heartbeat stopped (this worker takes over)."""
        waited = 0.0
        started = time.time()
        while True:
            table = published(self.study)
            if table is not None:
                return table
            attrs = self.study.user_attrs
            beat = float(attrs.get("sweep_heartbeat", started))
            if time.time() - beat > SWEEP_STALE_S:
                self.log(f"sweep owner {attrs.get('sweep_owner', '?')} is silent: taking the sweep over")
                return None
            if waited == 0.0:
                self.log(f"waiting for the sensitivity sweep of {attrs.get('sweep_owner', 'another worker')}")
            time.sleep(3.0)
            waited += 3.0

    def _heartbeat(self) -> None:
        """Called after each probe: keeps waiting workers from taking a long sweep over."""
        if time.time() - self._last_beat > SWEEP_STALE_S / 6:
            self._last_beat = time.time()
            self.study.set_user_attr("sweep_heartbeat", self._last_beat)

    def _save_local(self, table: SensitivityTable) -> None:
        res = self.pipeline.resources
        path = table_path(res, table.metric)
        if not path.is_file():
            res.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(path, table.to_json())
