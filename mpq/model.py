"""Load Ultralytics detectors offline, fold BatchNorm, list their quantizable layers.

:func:`load_model` turns a ``.pt`` checkpoint or a ``.yaml`` architecture into a
:class:`LoadedModel`: a float32, eval-mode :class:`YoloDetector` (BatchNorm folded into the
convolutions as deployment does; for YOLOv10 the one-to-many training branch dropped) with
a single output tensor:

- YOLOv10 (end-to-end): ``(N, max_det, 6)`` rows ``[x1, y1, x2, y2, score, class]`` in
  input-pixel coordinates;
- other YOLO detectors: raw ``(N, 4 + classes, anchors)`` rows ``[cx, cy, w, h, scores...]``.

Layer names are the module names of the Ultralytics ``DetectionModel``
(``model.8.m.0.cv1.conv``), stable across loads and identical in every backend.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Container, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpq.assignment import LayerGroup, LayerInfo, group_layers
from mpq.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

LAYOUT_END2END = "end2end"
LAYOUT_RAW = "raw"


class ModelLoadError(UserError):
    """A model file that cannot be loaded; the message names the file and what is expected."""


def _detector_class():  # noqa: ANN202 - returns a torch.nn.Module subclass
    """Build the wrapper class lazily so importing this module does not import torch."""
    global _DETECTOR_CLS
    if _DETECTOR_CLS is not None:
        return _DETECTOR_CLS
    from torch import nn

    class YoloDetector(nn.Module):
        """The layers of an Ultralytics ``DetectionModel`` with one output tensor.

        It holds the model's ``nn.Sequential`` under the same attribute name (``model``),
        so module names (``model.8.m.0.cv1.conv``) are those of Ultralytics, and runs
        the same routing as ``DetectionModel._predict_once``.
        """

        def __init__(self, layers: nn.Sequential, save: list[int]):
            super().__init__()
            self.model = layers
            self.save = sorted(set(save))

        def forward(self, x: Any) -> Any:
            out, _ = run_blocks(self.model, x, save=self.save)
            return first_output(out)

    _DETECTOR_CLS = YoloDetector
    return YoloDetector


_DETECTOR_CLS: Any = None


def run_blocks(blocks: Iterable[Any], x: Any, outputs: list[Any] | None = None,
               save: Container[int] | None = None) -> tuple[Any, list[Any]]:
    """Run Ultralytics blocks in order, routing as ``DetectionModel._predict_once`` does.

    Each block reads the previous output (``f == -1``) or the outputs of the blocks its
    ``f`` names. ``outputs`` holds the outputs of the blocks before ``blocks`` (the routing
    indexes it by block index) and is extended in place; with ``save``, only the outputs of
    those block indices are kept (the others are ``None``). Returns the last output and
    ``outputs``.
    """
    y = [] if outputs is None else outputs
    for m in blocks:
        f: Any = m.f
        if f != -1:
            x = y[f] if isinstance(f, int) else [x if j == -1 else y[j] for j in f]
        x = m(x)
        y.append(x if save is None or m.i in save else None)
    return x, y


def first_output(out: Any) -> Any:
    """The detector's output tensor: the head's first output when it returns several."""
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class LoadedModel:
    """A fused float detector ready for quantization, export and evaluation."""

    module: nn.Module
    source: Path
    imgsz: int
    names: dict[int, str]
    layout: str
    max_det: int
    layers: list[LayerInfo]
    total_convs: int
    dropped_convs: int
    load_seconds: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Number of classes the detector predicts."""
        return len(self.names)

    @property
    def quantizable_layers(self) -> list[LayerInfo]:
        """The layers a backend may quantize."""
        return [lay for lay in self.layers if lay.quantizable]

    def groups(self, granularity: str = "layer") -> list[LayerGroup]:
        """The quantizable layers grouped per ``layer`` or per ``block``."""
        return group_layers(self.layers, granularity)

    def layer(self, name: str) -> LayerInfo:
        """The layer named ``name`` (``KeyError`` if there is none)."""
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise KeyError(name)

    def fresh(self) -> LoadedModel:
        """A deep copy whose module can be modified (quantized) without touching this one."""
        return replace(self, module=copy.deepcopy(self.module))

    def dummy_input(self, batch: int = 1) -> torch.Tensor:
        """A zero input batch of the model's size."""
        import torch

        return torch.zeros(batch, 3, self.imgsz, self.imgsz)

    def output_shape(self, batch: int = 1) -> tuple[int, ...]:
        """The output shape for a batch: ``(N, max_det, 6)`` end to end, else raw."""
        if self.layout == LAYOUT_END2END:
            return (batch, self.max_det, 6)
        anchors = sum((self.imgsz // s) ** 2 for s in (8, 16, 32))
        return (batch, 4 + self.num_classes, anchors)


def _not_quantizable_reason(name: str, module: nn.Module, parent: nn.Module | None) -> str:
    from ultralytics.nn.modules.block import DFL

    if isinstance(parent, DFL):
        return "DFL: fixed arange weights (0..15) that must stay exact"
    return ""


def _parents(model: nn.Module) -> dict[str, nn.Module]:
    out = {}
    for pname, pmod in model.named_modules():
        for cname, _ in pmod.named_children():
            out[f"{pname}.{cname}" if pname else cname] = pmod
    return out


def layer_table(module: nn.Module, imgsz: int) -> list[LayerInfo]:
    """Every Conv2d/Linear of ``module`` with parameters and MACs at ``imgsz`` x ``imgsz``."""
    import torch
    from torch import nn

    convs = [(n, m) for n, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    out_shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for n, m in convs:
        hooks.append(m.register_forward_hook(
            lambda mod, inp, out, n=n: out_shapes.__setitem__(n, tuple(out.shape))))
    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, imgsz, imgsz))
    finally:
        for h in hooks:
            h.remove()
    parents = _parents(module)
    head_prefix = f"model.{len(getattr(module, 'model', [])) - 1}."

    def block_of(name: str) -> str:
        parts = name.split(".")
        # the detection head is split per branch and scale (model.23.one2one_cv2.0)
        return ".".join(parts[:4] if name.startswith(head_prefix) else parts[:2])

    layers = []
    for i, (n, m) in enumerate(convs):
        shape = out_shapes.get(n)
        params = sum(p.numel() for p in m.parameters(recurse=False))
        if isinstance(m, nn.Conv2d):
            kernel = tuple(int(k) for k in m.kernel_size)
            per_out = (m.in_channels // m.groups) * kernel[0] * kernel[1]
            spatial = shape[2] * shape[3] if shape else 0
            macs = m.out_channels * spatial * per_out
            info = LayerInfo(n, "Conv2d", m.in_channels, m.out_channels, kernel,
                             tuple(int(s) for s in m.stride), m.groups, params, macs, i, block_of(n))
        else:
            rows = 1
            if shape:
                for d in shape[1:-1]:
                    rows *= d
            macs = rows * m.in_features * m.out_features
            info = LayerInfo(n, "Linear", m.in_features, m.out_features, (1,), (1,), 1, params, macs, i,
                             block_of(n))
        reason = _not_quantizable_reason(n, m, parents.get(n))
        if shape is None:
            reason = reason or "not executed by the forward pass"
        if reason:
            info = replace(info, quantizable=False, reason=reason)
        layers.append(info)
    return layers


def _read_model(path: Path) -> Any:
    """Return an Ultralytics DetectionModel from a .pt or .yaml file, offline."""
    from mpq.env import import_ultralytics

    import_ultralytics()
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        from ultralytics.nn.tasks import DetectionModel

        source = str(path) if path.exists() else path.name  # bare names: Ultralytics' bundled configs
        if not path.exists() and path.parent != Path("."):
            raise ModelLoadError(f"{path}: architecture file not found")
        try:
            return DetectionModel(source, verbose=False)
        except FileNotFoundError:
            raise ModelLoadError(f"{path}: architecture file not found (and not one of Ultralytics' bundled "
                                 "configs such as yolov10m.yaml)") from None
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"{path}: not a valid Ultralytics detection architecture: {exc}") from exc
    if suffix != ".pt":
        raise ModelLoadError(f"{path}: expected an Ultralytics checkpoint (.pt) or architecture (.yaml)")
    if not path.is_file():
        raise ModelLoadError(f"{path}: checkpoint not found (this tool never downloads weights; "
                             "put the .pt file there or fix the path)")
    from ultralytics.nn.tasks import load_checkpoint

    try:
        model, _ckpt = load_checkpoint(str(path), device="cpu", fuse=False)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{path}: cannot be read as an Ultralytics checkpoint: {exc}") from exc
    return model


def load_model(path: str | os.PathLike[str], imgsz: int = 640, *, max_det: int = 300,
               end2end: bool = True) -> LoadedModel:
    """Load, fuse and wrap a detector. ``end2end`` keeps YOLOv10's NMS-free head."""
    import torch
    from ultralytics.nn.modules.head import Detect

    start = time.perf_counter()
    path = Path(path)
    det = _read_model(path)
    det = det.float().eval()
    head = det.model[-1]
    if not isinstance(head, Detect):
        raise ModelLoadError(f"{path}: the last layer is {type(head).__name__}, not a YOLO Detect head "
                             "(only detection models are supported)")
    if type(head).__name__ not in ("Detect", "v10Detect"):
        raise ModelLoadError(f"{path}: head {type(head).__name__} is not a plain detection head "
                             "(segmentation, pose and OBB models are not supported)")
    total_convs = sum(isinstance(m, torch.nn.Conv2d) for m in det.modules())
    has_one2one = getattr(head, "one2one_cv2", None) is not None
    if has_one2one:
        head.end2end = bool(end2end)
    with torch.no_grad():
        det.fuse(verbose=False)
    for p in det.parameters():
        p.requires_grad_(False)
    head.export = True
    head.format = "onnx"  # type: ignore[assignment]
    head.dynamic = False
    head.max_det = max_det
    layout = LAYOUT_END2END if getattr(head, "end2end", False) else LAYOUT_RAW
    module = _detector_class()(det.model, list(det.save)).eval()
    fused_convs = sum(isinstance(m, torch.nn.Conv2d) for m in module.modules())
    names = det.names if isinstance(getattr(det, "names", None), dict) else {}
    if len(names) != head.nc:
        names = {i: str(i) for i in range(head.nc)}
    layers = layer_table(module, imgsz)
    return LoadedModel(
        module=module, source=path, imgsz=imgsz, names={int(k): str(v) for k, v in names.items()},
        layout=layout, max_det=max_det, layers=layers, total_convs=total_convs,
        dropped_convs=total_convs - fused_convs, load_seconds=time.perf_counter() - start,
        info={"head": type(head).__name__, "stride": [int(s) for s in head.stride.tolist()],
              "yaml": getattr(det, "yaml", {}).get("yaml_file", ""), "params": int(sum(
                  p.numel() for p in module.parameters()))},
    )


def export_onnx(module: nn.Module, path: str | os.PathLike[str], imgsz: int, *, opset: int = 17,
                dynamic_batch: bool = True) -> Path:
    """Export a float detector to ONNX (legacy TorchScript exporter), input ``images``,
    output ``output0``; written atomically."""
    import torch

    from mpq.files import atomic_path

    path = Path(path)
    dummy = torch.zeros(1, 3, imgsz, imgsz)
    dyn = {"images": {0: "batch"}, "output0": {0: "batch"}} if dynamic_batch else None
    import warnings

    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(module, (dummy,), str(tmp), opset_version=opset, input_names=["images"],
                          output_names=["output0"], dynamic_axes=dyn, dynamo=False, do_constant_folding=True)
    return path
