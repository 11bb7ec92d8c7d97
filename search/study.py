"""The Optuna multi-objective study over per-layer bit assignments.

One study per spec name, in the run directory's SQLite storage unless a storage URL (e.g.
PostgreSQL) is given; any number of workers can join it. :meth:`StudyRunner.prepare` opens
(or creates) the study, gets the sensitivity table (:mod:`search.sweep_owner`: the first
worker computes it and enqueues the policy configurations), builds the search space and the
float baseline; :meth:`StudyRunner.run` then runs trials (:mod:`search.objective`) until the
budget of distinct assignments is reached. Trials of a killed worker are failed by Optuna's
heartbeat and retried once.
"""

from __future__ import annotations

import os
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpq import keys
from mpq.errors import UserError
from mpq.objectives import ACCURACY, OBJECTIVES, directions, labels
from search import trial_attrs
from search.objective import TrialObjective
from search.results import worker_id
from search.storage import fail_stale_trials, open_storage, redact, storage_url
from search.sweep_owner import SharedSweep, claim

if TYPE_CHECKING:
    import optuna

    from search.pipeline import TrialPipeline
    from search.sensitivity import SensitivityTable
    from search.spec import StudySpec


@dataclass
class RunSettings:
    """What ``search run`` was asked for (the spec's search section, with CLI overrides)."""

    budget: int
    objectives: list[str]
    sampler: str
    space: str
    seed: int
    seed_policies: bool
    max_map_drop: float | None
    storage: str

    @classmethod
    def from_spec(cls, spec: StudySpec, run_dir: Path, *, budget: int | None = None, storage: str | None = None,
                  sampler: str | None = None, space: str | None = None, objectives: Sequence[str] | None = None,
                  seed_policies: bool | None = None, seed: int | None = None) -> RunSettings:
        """The spec's ``search`` section with the command line's overrides; checks the objectives."""
        s = spec.search
        objs = list(objectives or s.objectives)
        bad = [o for o in objs if o not in OBJECTIVES]
        if bad:
            raise UserError(f"unknown objective(s) {bad}; choose from {', '.join(OBJECTIVES)}")
        if ACCURACY not in objs:
            raise UserError(f"the objectives must include '{ACCURACY}' (accuracy)")
        return cls(budget=budget or s.budget, objectives=objs, sampler=sampler or s.sampler,
                   space=space or s.space, seed=s.seed if seed is None else seed,
                   seed_policies=s.seed_policies if seed_policies is None else seed_policies,
                   max_map_drop=s.max_map_drop, storage=storage_url(run_dir, given=storage, spec_storage=s.storage))


def make_sampler(settings: RunSettings, constrained: bool, seed: int) -> optuna.samplers.BaseSampler:
    """The sampler of ``settings`` (with the mAP-drop constraint when ``constrained``)."""
    import optuna

    constraints = trial_attrs.constraint if constrained else None
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if settings.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=max(8, min(50, settings.budget // 4)),
                                             seed=seed, constraints_func=constraints)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(5, settings.budget // 10),
                                      multivariate=True, constraints_func=constraints)


def trial_counts(study: optuna.Study) -> dict[str, int]:
    """Distinct assignments done, trials running, failed, duplicated, waiting, and all trials."""
    import optuna

    S = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    done = sum(1 for t in trials if t.state == S.COMPLETE and "duplicate_of" not in t.user_attrs)
    return {"done": done, "running": sum(1 for t in trials if t.state == S.RUNNING),
            "failed": sum(1 for t in trials if t.state == S.FAIL),
            "duplicates": sum(1 for t in trials if t.state == S.COMPLETE and "duplicate_of" in t.user_attrs),
            "total": len(trials), "waiting": sum(1 for t in trials if t.state == S.WAITING)}


class StudyRunner:
    """Runs (or joins, or resumes) the study of a trial pipeline until the budget is reached."""

    def __init__(self, pipeline: TrialPipeline, settings: RunSettings, *, progress: bool = True,
                 log: Callable[[str], None] | None = None) -> None:
        self.pipeline = pipeline
        self.res = pipeline.resources
        self.settings = settings
        self.progress = progress
        self.log = log or (lambda msg: None)
        self.worker = worker_id()

    def study_key(self) -> dict[str, Any]:
        """What the study was made with; a joining worker must agree (see :func:`mpq.keys.study_key`)."""
        spec = self.res.spec
        return keys.study_key(context=self.res.context_key(), objectives=self.settings.objectives,
                              space=self.settings.space, granularity=spec.granularity, candidates=spec.candidates,
                              sensitivity=spec.sensitivity)

    def open(self, *, create: bool = True) -> tuple[optuna.Study, bool]:
        """Create or load the study; returns (study, created_by_this_worker)."""
        import optuna

        storage = open_storage(self.settings.storage)
        name = self.res.spec.name
        sampler = make_sampler(self.settings, self.settings.max_map_drop is not None, self._worker_seed())
        if create:
            try:
                study = optuna.create_study(storage=storage, study_name=name,
                                            directions=directions(self.settings.objectives), sampler=sampler)
            except optuna.exceptions.DuplicatedStudyError:
                pass
            else:
                self._describe(study)
                return study, True
        try:
            study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        except KeyError:
            raise UserError(f"no study named '{name}' in {redact(self.settings.storage)}") from None
        self._check_joinable(study)
        return study, False

    def _describe(self, study: optuna.Study) -> None:
        """Claim the sweep (a worker that loads the study meanwhile waits for it) and record what it is."""
        import optuna

        claim(study, self.worker)
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(labels(self.settings.objectives))
        study.set_user_attr("key", self.study_key())
        study.set_user_attr("objectives", self.settings.objectives)
        study.set_user_attr("run_dir", str(self.res.run_dir.resolve()))
        study.set_user_attr("spec", self.res.spec.model_dump(mode="json"))

    def _check_joinable(self, study: optuna.Study) -> None:
        name, shown = self.res.spec.name, redact(self.settings.storage)
        stored = study.user_attrs.get("key")
        key = self.study_key()
        if stored is not None and stored != key:
            diff = [k for k in key if stored.get(k) != key[k]]
            raise UserError(
                f"the study '{name}' in {shown} was made with a different "
                f"{', '.join(diff)}; start over with `search run --fresh`, or give the spec another name")
        if list(study.directions) and [d.name.lower() for d in study.directions] != directions(
                self.settings.objectives):
            raise UserError(f"the study '{name}' optimizes other objectives "
                            f"({study.user_attrs.get('objectives')}); use --fresh or another name")

    def _worker_seed(self) -> int:
        index = int(os.environ.get("YOLO_MPQ_WORKER_INDEX", "0"))
        if self.settings.storage.startswith("sqlite") and index == 0:
            return self.settings.seed
        return self.settings.seed + index + zlib.crc32(self.worker.encode()) % 100_000

    def prepare(self) -> tuple[optuna.Study, TrialObjective]:
        """Everything before the first trial: run directory, study, sensitivity table, space, float baseline."""
        from search.space import policies, space_for

        self.res.prepare_run_dir()
        study, created = self.open()
        sweep = SharedSweep(study, self.pipeline, worker=self.worker, log=self.log, progress=self.progress)

        def enqueue_policies(table: SensitivityTable) -> None:
            if self.settings.seed_policies and not study.user_attrs.get("policies_enqueued"):
                configs = policies(space_for(self.res, table, self.settings.space, self.settings.objectives))
                for label, params in configs:
                    study.enqueue_trial(params, user_attrs={"policy": label}, skip_if_exists=True)
                study.set_user_attr("policies_enqueued", len(configs))
                self.log(f"enqueued {len(configs)} policy configurations (top-K lists, budget-constrained minima)")

        table = sweep.ensure(created, enqueue_policies)
        space = space_for(self.res, table, self.settings.space, self.settings.objectives)
        self.pipeline.baseline.metrics()
        objective = TrialObjective(self.pipeline, space, objectives=self.settings.objectives,
                                   max_map_drop=self.settings.max_map_drop, worker=self.worker, log=self.log)
        return study, objective

    def run(self, on_trial: Callable[[Any, dict[str, int]], None] | None = None) -> optuna.Study:
        """Run trials until the budget of distinct assignments is done; ``on_trial`` sees each finished one."""
        study, objective = self.prepare()
        base = self.pipeline.baseline.metrics()
        self.log(f"float baseline: mAP50-95 {base.map50_95:.4f}, latency {base.latency_ms:.2f} ms "
                 f"({base.latency_provider})")
        reported: set[int] = set()
        while self._next(study):
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
            if on_trial is not None:
                self._report_mine(study, reported, on_trial)
        return study

    def _next(self, study: optuna.Study) -> bool:
        """Whether to run another trial here (waits while the rest of the budget runs elsewhere)."""
        import optuna

        budget = self.settings.budget
        max_total = budget * 4 + 20
        waiting = False
        while True:
            # a killed worker's RUNNING trial: FAIL once its heartbeat is older than the grace period
            # (and retried once, as a WAITING copy that the next optimize() picks up)
            fail_stale_trials(study)
            c = trial_counts(study)
            if c["done"] >= budget or c["total"] >= max_total:
                return False
            if c["done"] + c["running"] < budget:
                break
            # the rest of the budget is running in other workers: wait for it, since a worker
            # that dies leaves its trial to be failed and retried, and someone must run the retry
            if not waiting:
                waiting = True
                self.log(f"{c['running']} trial(s) running in other workers; waiting for them to finish")
            time.sleep(2.0)
        if c["failed"] >= 3 and c["done"] == 0:
            fails = [t.user_attrs.get("failure", "?") for t in study.get_trials(
                deepcopy=False, states=(optuna.trial.TrialState.FAIL,))]
            raise UserError(f"the first {c['failed']} trials failed; last reason: {fails[-1]}")
        if c["failed"] > budget:
            raise UserError(f"{c['failed']} trials failed; see the 'failure' user attribute of each")
        return True

    def _report_mine(self, study: optuna.Study, reported: set[int],
                     on_trial: Callable[[Any, dict[str, int]], None]) -> None:
        import optuna

        mine = [t for t in study.get_trials(deepcopy=False)
                if t.user_attrs.get("worker") == self.worker and t.number not in reported
                and t.state != optuna.trial.TrialState.RUNNING]
        for t in sorted(mine, key=lambda t: t.number):
            reported.add(t.number)
            on_trial(t, trial_counts(study))
