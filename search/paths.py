"""The run directory of a study: where each file goes.

::

    runs/<study-name>/
      spec.yaml            the resolved spec, as run
      env.json             versions, device, providers
      study.db             Optuna storage (SQLite default)
      sensitivity.json     the sweep table (sensitivity-<metric>.json for other metrics)
      cache/               preprocessed images, engines
      float/               the float model's ONNX and metrics
      trials/<digest>/     assignment.json, model.onnx, metrics.json
      report/              index.html, pareto.csv, summary.md, plots
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpq.files import environment, write_json, write_text


@dataclass(frozen=True)
class RunPaths:
    """The files of one run directory."""

    root: Path

    @property
    def cache(self) -> Path:
        """Preprocessed images and other caches of this run."""
        return self.root / "cache"

    @property
    def float_dir(self) -> Path:
        """The float model's ONNX (``model.onnx``), its export key and its metrics."""
        return self.root / "float"

    @property
    def report(self) -> Path:
        """The report folder of ``search report``."""
        return self.root / "report"

    def trial(self, digest: str) -> Path:
        """The folder of the trial that built the assignment with ``digest``."""
        return self.root / "trials" / digest

    def sensitivity(self, metric: str, default_metric: str) -> Path:
        """The sweep table of ``metric``: ``sensitivity.json`` for the study's own metric."""
        return self.root / ("sensitivity.json" if metric == default_metric else f"sensitivity-{metric}.json")

    def prepare(self, spec_yaml: str, env: dict[str, Any]) -> None:
        """Create the run directory and write ``spec.yaml`` and ``env.json``."""
        self.root.mkdir(parents=True, exist_ok=True)
        write_text(self.root / "spec.yaml", spec_yaml)
        write_json(self.root / "env.json", {**environment(), **env})
