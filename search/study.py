"""The Optuna multi-objective study over per-layer bit assignments.

One study per spec name, in the run directory's SQLite storage unless a storage URL
(e.g. PostgreSQL) is given; any number of workers can join it. The first worker to
create the study owns the sensitivity sweep: it computes (or loads) the table, enqueues
the policy configurations and publishes the table in the study's user attributes, from
where every other worker, on any machine, reads it.

A trial samples parameters of the search space (:mod:`search.space`), turns them into an
:class:`~mpq.assignment.Assignment`, and builds and evaluates it through the backend
(:meth:`search.context.RunContext.build_and_evaluate`). Its assignment, summary, metrics,
provider, timings and artifact path are stored as user attributes (the dashboard shows
them). An assignment already evaluated in the study is not rebuilt: the trial reuses its
result, is marked ``duplicate_of`` and does not count toward the budget. A failing trial
is recorded as FAIL with its reason, and the study goes on. Trials of a killed worker are
failed by Optuna's heartbeat and retried once.
"""

from __future__ import annotations

import json
import os
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mpq.assignment import Assignment, Precision
from mpq.errors import UserError
from search.context import RunContext, TrialOutcome, worker_id
from search.sensitivity import SensitivityTable, load_cached, run_sweep
from search.space import SearchSpace, describe_params

if TYPE_CHECKING:
    import optuna

OBJECTIVES: dict[str, tuple[str, str, str]] = {
    # name: (direction, metric key, display)
    "map": ("maximize", "map50_95", "mAP50-95"),
    "latency": ("minimize", "latency_ms", "latency ms"),
    "size": ("minimize", "weight_bytes", "weight bytes"),
    "bops": ("minimize", "bops", "BOPs"),
}
HEARTBEAT_S = 20
GRACE_S = 60
# Overrides (seconds) for the heartbeat of running trials and the grace period after which a
# silent worker's trial is failed and retried; the parallel-worker test shortens them.
HEARTBEAT_ENV = "YOLO_MPQ_HEARTBEAT_S"
GRACE_ENV = "YOLO_MPQ_GRACE_S"
SWEEP_STALE_S = 180


def storage_url(ctx: RunContext, storage: str | None = None) -> str:
    url = storage or ctx.spec.search.storage
    if url:
        return url
    return f"sqlite:///{(ctx.run_dir / 'study.db').resolve()}"


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """An RDB storage with heartbeats (stale trials of killed workers fail, then retry once)."""
    import warnings

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


def redact(url: str) -> str:
    """The URL without its password."""
    import re

    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def directions(objectives: Sequence[str]) -> list[Any]:
    return [OBJECTIVES[o][0] for o in objectives]


def objective_values(metrics: dict[str, Any], objectives: Sequence[str]) -> list[float]:
    return [float(metrics[OBJECTIVES[o][1]]) for o in objectives]


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
    def from_ctx(cls, ctx: RunContext, *, budget: int | None = None, storage: str | None = None,
                 sampler: str | None = None, space: str | None = None, objectives: Sequence[str] | None = None,
                 seed_policies: bool | None = None, seed: int | None = None) -> RunSettings:
        s = ctx.spec.search
        objs = list(objectives or s.objectives)
        bad = [o for o in objs if o not in OBJECTIVES]
        if bad:
            raise UserError(f"unknown objective(s) {bad}; choose from {', '.join(OBJECTIVES)}")
        if "map" not in objs:
            raise UserError("the objectives must include 'map' (accuracy)")
        return cls(budget=budget or s.budget, objectives=objs, sampler=sampler or s.sampler,
                   space=space or s.space, seed=s.seed if seed is None else seed,
                   seed_policies=s.seed_policies if seed_policies is None else seed_policies,
                   max_map_drop=s.max_map_drop, storage=storage_url(ctx, storage))


def _sampler(settings: RunSettings, constraints: Callable[[Any], Sequence[float]] | None, worker_seed: int
             ) -> optuna.samplers.BaseSampler:
    import optuna

    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=worker_seed)
    if settings.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=max(8, min(50, settings.budget // 4)),
                                             seed=worker_seed, constraints_func=constraints)
    return optuna.samplers.TPESampler(seed=worker_seed, n_startup_trials=max(5, settings.budget // 10),
                                      multivariate=True, constraints_func=constraints)


def _constraint(trial: Any) -> Sequence[float]:
    return [float(trial.user_attrs.get("constraint", 0.0))]


class StudyRunner:
    """Runs (or joins, or resumes) the study of ``ctx`` until the budget is reached."""

    def __init__(self, ctx: RunContext, settings: RunSettings, *, progress: bool = True,
                 log: Callable[[str], None] | None = None) -> None:
        self.ctx = ctx
        self.settings = settings
        self.progress = progress
        self.log = log or (lambda msg: None)
        self.worker = worker_id()
        self._float: dict[str, Any] | None = None
        self.table: SensitivityTable | None = None
        self.space: SearchSpace | None = None

    # -- study ------------------------------------------------------------------------------------
    def study_key(self) -> dict[str, Any]:
        return {"context": self.ctx.context_key(), "objectives": self.settings.objectives,
                "space": self.settings.space, "granularity": self.ctx.spec.granularity,
                "candidates": [str(p) for p in self.ctx.spec.candidates],
                "sensitivity": self.ctx.spec.sensitivity.model_dump(mode="json")}

    def open(self, *, create: bool = True) -> tuple[optuna.Study, bool]:
        """Create or load the study; returns (study, created_by_this_worker)."""
        import optuna

        storage = make_storage(self.settings.storage)
        name = self.ctx.spec.name
        sampler = _sampler(self.settings, _constraint if self.settings.max_map_drop is not None else None,
                           self._worker_seed())
        created = False
        if create:
            try:
                study = optuna.create_study(storage=storage, study_name=name,
                                            directions=directions(self.settings.objectives), sampler=sampler)
                created = True
                # claim the sweep at once: a worker that loads the study meanwhile waits for it
                study.set_user_attr("sweep_owner", self.worker)
                study.set_user_attr("sweep_heartbeat", time.time())
                with warnings.catch_warnings():  # "experimental" since Optuna 3.2
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    study.set_metric_names([OBJECTIVES[o][2] for o in self.settings.objectives])
                study.set_user_attr("key", self.study_key())
                study.set_user_attr("objectives", self.settings.objectives)
                study.set_user_attr("run_dir", str(self.ctx.run_dir.resolve()))
                study.set_user_attr("spec", self.ctx.spec.model_dump(mode="json"))
            except optuna.exceptions.DuplicatedStudyError:
                study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        else:
            try:
                study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
            except KeyError:
                raise UserError(f"no study named '{name}' in {redact(self.settings.storage)}") from None
        if not created:
            stored = study.user_attrs.get("key")
            if stored is not None and stored != self.study_key():
                diff = [k for k in self.study_key() if stored.get(k) != self.study_key()[k]]
                raise UserError(
                    f"the study '{name}' in {redact(self.settings.storage)} was made with a different "
                    f"{', '.join(diff)}; start over with `search run --fresh`, or give the spec another name")
            if list(study.directions) and [d.name.lower() for d in study.directions] != directions(
                    self.settings.objectives):
                raise UserError(f"the study '{name}' optimizes other objectives "
                                f"({study.user_attrs.get('objectives')}); use --fresh or another name")
        return study, created

    def _worker_seed(self) -> int:
        index = int(os.environ.get("YOLO_MPQ_WORKER_INDEX", "0"))
        if self.settings.storage.startswith("sqlite") and index == 0:
            return self.settings.seed
        return self.settings.seed + index + zlib.crc32(self.worker.encode()) % 100_000

    # -- sensitivity, shared through the storage ----------------------------------------------------
    def ensure_sensitivity(self, study: optuna.Study, created: bool) -> SensitivityTable:
        attrs = study.user_attrs
        if "sensitivity" in attrs:
            table = SensitivityTable.from_json(json.loads(attrs["sensitivity"]))
            self._save_local(table)
            return table
        if not created:
            # another worker owns the sweep: wait for it, or take over if its heartbeat stopped
            waited = 0.0
            started = time.time()
            while True:
                attrs = study.user_attrs
                if "sensitivity" in attrs:
                    table = SensitivityTable.from_json(json.loads(attrs["sensitivity"]))
                    self._save_local(table)
                    return table
                beat = float(attrs.get("sweep_heartbeat", started))
                if time.time() - beat > SWEEP_STALE_S:
                    self.log(f"sweep owner {attrs.get('sweep_owner', '?')} is silent: taking the sweep over")
                    break
                if waited == 0.0:
                    self.log(f"waiting for the sensitivity sweep of {attrs.get('sweep_owner', 'another worker')}")
                time.sleep(3.0)
                waited += 3.0
        study.set_user_attr("sweep_owner", self.worker)
        study.set_user_attr("sweep_heartbeat", time.time())
        last = [time.time()]

        def heartbeat() -> None:  # keeps waiting workers from taking a long sweep over
            if time.time() - last[0] > SWEEP_STALE_S / 6:
                last[0] = time.time()
                study.set_user_attr("sweep_heartbeat", last[0])

        cached = load_cached(self.ctx)
        table = cached if cached is not None else run_sweep(self.ctx, progress=self.progress, heartbeat=heartbeat)
        study.set_user_attr("sweep_heartbeat", time.time())
        if self.settings.seed_policies and not study.user_attrs.get("policies_enqueued"):
            self._enqueue_policies(study, table)
        study.set_user_attr("sensitivity", json.dumps(table.to_json()))
        return table

    def _save_local(self, table: SensitivityTable) -> None:
        from mpq.files import write_json
        from search.sensitivity import table_path

        path = table_path(self.ctx, table.metric)
        if not path.is_file():
            self.ctx.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(path, table.to_json())

    def make_space(self, table: SensitivityTable) -> SearchSpace:
        from mpq.assignment import FLOAT

        options = {g.name: [*self.ctx.candidates_for(g), FLOAT] for g in self.ctx.groups}
        empty = [g for g, opts in options.items() if len(opts) == 1]
        if len(empty) == len(options):
            raise UserError(f"backend '{self.ctx.backend.name}' can build none of the study's candidates "
                            f"{[str(p) for p in self.ctx.spec.candidates]} ({self.ctx.backend.capabilities.notes})")
        cost_kinds = tuple(o for o in self.settings.objectives if o in ("size", "bops", "latency"))
        return SearchSpace(self.settings.space, self.ctx.groups, options, table,
                           {lay.name: lay for lay in self.ctx.model.layers}, cost_kinds or ("size",))

    def _enqueue_policies(self, study: optuna.Study, table: SensitivityTable) -> None:
        space = self.make_space(table)
        policies = space.policies()
        for label, params in policies:
            study.enqueue_trial(params, user_attrs={"policy": label}, skip_if_exists=True)
        study.set_user_attr("policies_enqueued", len(policies))
        self.log(f"enqueued {len(policies)} policy configurations (top-K lists, budget-constrained minima)")

    # -- trials ----------------------------------------------------------------------------------
    def float_metrics(self) -> dict[str, Any]:
        if self._float is None:
            self._float = self.ctx.float_metrics()
        return self._float

    def _find_done(self, study: optuna.Study, digest: str, number: int) -> Any:
        import optuna

        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if t.number != number and t.user_attrs.get("digest") == digest and "metrics" in t.user_attrs:
                return t
        return None

    def _await_twin(self, study: optuna.Study, digest: str, number: int) -> Any:
        """Another worker is building the same assignment (an earlier RUNNING trial): wait, reuse it.

        Returns its COMPLETE trial, or None when there is no such trial or it failed (then
        this trial builds the assignment itself).
        """
        import optuna

        S = optuna.trial.TrialState
        logged = False
        while True:
            twins = [t for t in study.get_trials(deepcopy=False, states=(S.RUNNING, S.COMPLETE))
                     if t.number < number and t.user_attrs.get("digest") == digest]
            done = [t for t in twins if t.state == S.COMPLETE and "metrics" in t.user_attrs]
            if done:
                return done[0]
            if not twins:
                return None
            if not logged:
                self.log(f"trial #{number}: the same assignment is being built by trial #{twins[0].number} "
                         f"({twins[0].user_attrs.get('worker', '?')}); waiting for it")
                logged = True
            _fail_stale(study)  # a dead worker's twin turns FAIL, and we build it
            time.sleep(1.0)

    def objective(self, trial: optuna.Trial) -> list[float]:
        assert self.space is not None
        assignment = self.space.suggest(trial)
        digest = assignment.digest()
        summary = assignment.summary(self.ctx.model.layers)
        trial.set_user_attr("digest", digest)
        trial.set_user_attr("worker", self.worker)
        trial.set_user_attr("label", summary["label"])
        base = self.float_metrics()
        prior = self._find_done(trial.study, digest, trial.number) or self._await_twin(trial.study, digest,
                                                                                       trial.number)
        if prior is not None:
            metrics = dict(prior.user_attrs["metrics"])
            for key in ("assignment", "summary", "artifact", "timings", "provider"):
                if key in prior.user_attrs:
                    trial.set_user_attr(key, prior.user_attrs[key])
            trial.set_user_attr("duplicate_of", prior.number)
        else:
            try:
                outcome = self.ctx.build_and_evaluate(assignment)
            except Exception as exc:
                trial.set_user_attr("failure", f"{type(exc).__name__}: {exc}"[:2000])
                trial.set_user_attr("assignment", assignment.to_dict())
                raise
            metrics = outcome.metrics
            self._record(trial, outcome)
        metrics = {k: v for k, v in metrics.items() if k != "per_class"} | {"per_class": metrics.get("per_class")}
        metrics["map_drop"] = base["map50_95"] - metrics["map50_95"]
        # flat scalars first: the dashboard's trial table sorts and filters on them
        for key, value in (("mAP50-95", metrics["map50_95"]), ("mAP change (pt)", -100 * metrics["map_drop"]),
                           ("latency ms", metrics.get("latency_ms")), ("weights MB", metrics["weight_bytes"] / 1e6),
                           ("W4 weight share", metrics.get("w4_weight_share"))):
            if value is not None:
                trial.set_user_attr(key, round(float(value), 5))
        trial.set_user_attr("metrics", metrics)
        if self.settings.max_map_drop is not None:
            trial.set_user_attr("constraint", metrics["map_drop"] - self.settings.max_map_drop)
        return objective_values(metrics, self.settings.objectives)

    def _record(self, trial: optuna.Trial, outcome: TrialOutcome) -> None:
        trial.set_user_attr("assignment", outcome.assignment.to_dict())
        trial.set_user_attr("summary", outcome.summary)
        trial.set_user_attr("artifact", str(outcome.artifact.resolve()))
        trial.set_user_attr("timings", {k: round(v, 3) for k, v in outcome.timings.items()})
        trial.set_user_attr("provider", outcome.metrics.get("provider"))
        trial.set_user_attr("cached", outcome.cached)

    # -- the loop ---------------------------------------------------------------------------------
    def counts(self, study: optuna.Study) -> dict[str, int]:
        import optuna

        S = optuna.trial.TrialState
        trials = study.get_trials(deepcopy=False)
        done = sum(1 for t in trials if t.state == S.COMPLETE and "duplicate_of" not in t.user_attrs)
        return {"done": done, "running": sum(1 for t in trials if t.state == S.RUNNING),
                "failed": sum(1 for t in trials if t.state == S.FAIL),
                "duplicates": sum(1 for t in trials if t.state == S.COMPLETE and "duplicate_of" in t.user_attrs),
                "total": len(trials), "waiting": sum(1 for t in trials if t.state == S.WAITING)}

    def run(self, on_trial: Callable[[Any, dict[str, int]], None] | None = None) -> optuna.Study:
        import optuna

        self.ctx.prepare_run_dir()
        study, created = self.open()
        self.table = self.ensure_sensitivity(study, created)
        self.space = self.make_space(self.table)
        base = self.float_metrics()
        self.log(f"float baseline: mAP50-95 {base['map50_95']:.4f}, latency {base['latency_ms']:.2f} ms "
                 f"({base['latency_provider']})")
        budget = self.settings.budget
        max_total = budget * 4 + 20
        waiting_since = 0.0
        reported: set[int] = set()
        while True:
            # a killed worker's RUNNING trial: FAIL once its heartbeat is older than the grace period
            # (and retried once, as a WAITING copy that the next optimize() picks up)
            _fail_stale(study)
            c = self.counts(study)
            if c["done"] >= budget or c["total"] >= max_total:
                break
            if c["done"] + c["running"] >= budget:
                # the rest of the budget is running in other workers: wait for it, since a worker
                # that dies leaves its trial to be failed and retried, and someone must run the retry
                if not waiting_since:
                    waiting_since = time.monotonic()
                    self.log(f"{c['running']} trial(s) running in other workers; waiting for them to finish")
                time.sleep(2.0)
                continue
            waiting_since = 0.0
            if c["failed"] >= 3 and c["done"] == 0:
                fails = [t.user_attrs.get("failure", "?") for t in study.get_trials(
                    deepcopy=False, states=(optuna.trial.TrialState.FAIL,))]
                raise UserError(f"the first {c['failed']} trials failed; last reason: {fails[-1]}")
            if c["failed"] > budget:
                raise UserError(f"{c['failed']} trials failed; see the 'failure' user attribute of each")
            study.optimize(self.objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
            if on_trial is not None:
                import optuna

                mine = [t for t in study.get_trials(deepcopy=False)
                        if t.user_attrs.get("worker") == self.worker and t.number not in reported
                        and t.state != optuna.trial.TrialState.RUNNING]
                for t in sorted(mine, key=lambda t: t.number):
                    reported.add(t.number)
                    on_trial(t, self.counts(study))
        return study


def _fail_stale(study: optuna.Study) -> None:
    """Fail the RUNNING trials whose worker stopped heartbeating (Optuna retries them once)."""
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def params_label(params: dict[str, Any]) -> str:
    return describe_params(params)


def assignment_of(trial: Any) -> Assignment:
    return Assignment({k: Precision.parse(v) for k, v in trial.user_attrs.get("assignment", {}).items()})
