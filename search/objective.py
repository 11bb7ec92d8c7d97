"""One trial of the study: parameters -> assignment -> result -> objective values.

A trial samples the search space (:mod:`search.space`), turns it into an assignment, and
builds and evaluates it through the trial pipeline. An assignment already evaluated in the
study is not rebuilt: the trial reuses that result (waiting for it when another worker is
building it now) and is marked ``duplicate_of``. A failing build is recorded with its
reason and raised, so Optuna marks the trial FAIL and the study goes on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from search import trial_attrs
from search.storage import fail_stale_trials
from search.trial_attrs import TrialAttrs

if TYPE_CHECKING:
    import optuna

    from mpq.assignment import Assignment
    from search.pipeline import TrialPipeline
    from search.results import TrialMetrics
    from search.space import SearchSpace


class TrialObjective:
    """The function Optuna optimizes (``study.optimize(objective)``).

    Args:
        pipeline: builds and evaluates assignments; its float baseline gives ``map_drop``.
        space: maps a trial's parameters to an assignment.
        objectives: the study's objectives, in order.
        max_map_drop: the constraint on the mAP drop, if any.
        worker: this worker's id.
        log: where progress messages go.
    """

    def __init__(self, pipeline: TrialPipeline, space: SearchSpace, *, objectives: Sequence[str],
                 max_map_drop: float | None, worker: str, log: Callable[[str], None]) -> None:
        self.pipeline = pipeline
        self.space = space
        self.objectives = list(objectives)
        self.max_map_drop = max_map_drop
        self.worker = worker
        self.log = log

    def __call__(self, trial: optuna.Trial) -> list[float]:
        """Build (or reuse) the trial's assignment and return its objective values."""
        assignment = self.space.suggest(trial)
        digest = assignment.digest()
        summary = assignment.summary(self.pipeline.resources.model.layers)
        trial_attrs.write_start(trial, digest=digest, worker=self.worker, label=summary["label"])
        base = self.pipeline.baseline.metrics()
        prior = self._find_done(trial.study, digest, trial.number) or self._await_twin(trial.study, digest,
                                                                                       trial.number)
        if prior is not None:
            metrics = TrialAttrs.of(prior).metrics
            assert metrics is not None
            trial_attrs.write_duplicate(trial, prior)
        else:
            metrics = self._build(trial, assignment)
        metrics = metrics.with_map_drop(base.map50_95)
        trial_attrs.write_metrics(trial, metrics, self.max_map_drop)
        return [metrics.value(o) for o in self.objectives]

    def _build(self, trial: optuna.Trial, assignment: Assignment) -> TrialMetrics:
        try:
            result = self.pipeline.run(assignment)
        except Exception as exc:
            trial_attrs.write_failure(trial, exc, assignment)
            raise
        trial_attrs.write_result(trial, result)
        return result.metrics

    def _find_done(self, study: optuna.Study, digest: str, number: int) -> Any:
        """A completed trial of the study, other than ``number``, that evaluated ``digest``."""
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
            fail_stale_trials(study)  # a dead worker's twin turns FAIL, and we build it
            time.sleep(1.0)
