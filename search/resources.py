"""The resources of one study, built on first use and kept: the device, the fused float model,
its layer groups, the quantizer backend, the calibration set and the evaluation subset.

The sweep, the trial pipeline, the float baseline and the commands share one
:class:`StudyResources`, so the model is loaded and the images are preprocessed once per process.
"""

from __future__ import annotations

import fnmatch
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpq import keys
from mpq.assignment import Assignment, LayerGroup, Precision
from search.paths import RunPaths

if TYPE_CHECKING:
    from mpq.data import CalibrationSet, CocoSubset
    from mpq.model import LoadedModel
    from quantizers.base import QuantizedModel, QuantizerBackend
    from search.spec import StudySpec


class StudyResources:
    """Lazily built components of one study run.

    Args:
        spec: the validated study spec.
        run_dir: where artifacts go (default ``spec.run_dir()``).
        device: torch device for calibration (default: the spec's ``device``).
        progress: show rich progress bars.
    """

    def __init__(self, spec: StudySpec, *, run_dir: Path | None = None, device: str | None = None,
                 progress: bool = True) -> None:
        self.spec = spec
        self.paths = RunPaths(Path(run_dir) if run_dir else spec.run_dir())
        self._device = device or spec.device
        self.progress = progress

    @property
    def run_dir(self) -> Path:
        """The run directory (``runs/<study-name>`` by default)."""
        return self.paths.root

    def prepare_run_dir(self) -> None:
        """Create the run directory and write ``spec.yaml`` and ``env.json``."""
        self.paths.prepare(self.spec.to_yaml(), {"device": self.device})

    @cached_property
    def device(self) -> str:
        """The resolved torch device (``auto`` becomes ``cuda`` or ``cpu``)."""
        from mpq.device import resolve_device

        return resolve_device(self._device)

    # -- model ----------------------------------------------------------------------------------
    @cached_property
    def model(self) -> LoadedModel:
        """The fused float model."""
        from mpq.model import load_model

        return load_model(self.spec.model, self.spec.imgsz, max_det=self.spec.evaluation.max_det, head=self.spec.head,
                          trust=self.spec.trust_checkpoint)

    @cached_property
    def model_digest(self) -> str:
        """The model file's digest (see :func:`mpq.keys.model_digest`)."""
        return keys.model_digest(self.spec.model, self.spec.head)

    @cached_property
    def groups(self) -> list[LayerGroup]:
        """The searched layer groups: the model's groups at the spec's granularity, less ``keep_float``."""
        groups = self.model.groups(self.spec.granularity)
        if self.spec.keep_float:
            groups = [g for g in groups
                      if not any(fnmatch.fnmatch(name, pat) for name in (g.name, *g.layers)
                                 for pat in self.spec.keep_float)]
        return groups

    # -- backend --------------------------------------------------------------------------------
    @cached_property
    def backend(self) -> QuantizerBackend:
        """The spec's quantizer backend (its framework is imported now); what it computes once
        per model and calibration set (rounded weights) is kept in ``cache/weights`` for reruns."""
        from quantizers import get_backend
        from search.console import console_err

        return get_backend(self.spec.backend, device=self.device, target=self.spec.deploy.target,
                           cache_dir=self.paths.cache / "weights", progress=self.progress, console=console_err)

    def candidates_for(self, group: LayerGroup) -> list[Precision]:
        """The study's candidates this backend can build for every layer of ``group`` (float excluded)."""
        caps = self.backend.capabilities
        by_name = {lay.name: lay for lay in self.model.layers}
        return [p for p in self.spec.candidates
                if all(caps.supports(by_name[name], p) for name in group.layers)]

    def materialize(self, assignment: Assignment) -> QuantizedModel:
        """Build ``assignment`` with the backend, calibrated on the study's calibration set; the
        first build that computes or loads the backend's one-time weights records that in
        ``weights.json``."""
        qmodel = self.backend.materialize(self.model, assignment, self.calibration)
        weights = qmodel.info.get("weights", {})
        if weights.get("served_from") in ("computed", "disk"):
            from mpq.files import write_json

            write_json(self.run_dir / "weights.json", {**weights, "seconds": qmodel.timings.get("weights"),
                                                       "cache_dir": str(self.paths.cache / "weights")})
        return qmodel

    # -- data -----------------------------------------------------------------------------------
    @cached_property
    def calibration(self) -> CalibrationSet:
        """The calibration images, preprocessed once (cached in ``cache/calibration.npz``)."""
        from mpq.data import CalibrationSet, preprocess_many, read_calibration_list

        cal = self.spec.calibration
        paths = read_calibration_list(cal.source, cal.max_images)
        images, _ = preprocess_many(paths, self.spec.imgsz, cache=self.paths.cache / "calibration.npz",
                                    progress=self.progress, description="calibration images")
        return CalibrationSet(images=images, paths=paths, batch_size=cal.batch_size)

    @cached_property
    def subset(self) -> CocoSubset:
        """The evaluation subset of the dataset."""
        from mpq.data import load_coco_subset

        ds = self.spec.dataset
        return load_coco_subset(ds.images, ds.annotations, max_images=ds.max_images, image_ids=ds.image_ids)

    @cached_property
    def verify_subset(self) -> CocoSubset | None:
        """The held-out verification split (``dataset.verify``), or None when the spec has none."""
        from mpq.data import load_verification_subset

        v = self.spec.dataset.verify
        if v is None:
            return None
        return load_verification_subset(self.subset, max_images=v.max_images, image_ids=v.image_ids)

    @cached_property
    def data_digest(self) -> str:
        """The evaluation subset, calibration images and image size (see :func:`mpq.keys.data_digest`)."""
        return keys.data_digest(self.subset.image_ids, self.spec.dataset.annotations, self.calibration.paths,
                                self.spec.imgsz)

    def context_key(self) -> dict[str, Any]:
        """What, besides the assignment, decides a trial's result."""
        s = self.spec
        return keys.context_key(model=self.model_digest, data=self.data_digest, imgsz=s.imgsz, backend=s.backend,
                                evaluation=s.evaluation, latency=s.latency, deploy=s.deploy)
