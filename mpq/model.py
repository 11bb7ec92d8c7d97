"""Load Ultralytics detectors offline, fold BatchNorm, list their quantizable layers.

:func:`load_model` turns a ``.pt`` checkpoint or a ``.yaml`` architecture into a
:class:`LoadedModel`: a float32, eval-mode :class:`YoloDetector` (BatchNorm folded into the
convolutions as deployment does) with a single output tensor, from the head the user deploys:

- ``head="auto"`` (default) follows the checkpoint, as Ultralytics does: a YOLOv10 head
  carries two branches, and the one the checkpoint selects (``DetectionModel.end2end``) is
  kept, the other one dropped by Ultralytics' own ``fuse``. ``"one2one"`` / ``"one2many"``
  choose explicitly (a model without a one-to-one branch has only ``"one2many"``).
- one-to-one (YOLOv10 end-to-end, NMS-free): ``(N, max_det, 6)`` rows
  ``[x1, y1, x2, y2, score, class]`` in input-pixel coordinates, decoded by a top-k
  (:data:`LAYOUT_END2END`);
- one-to-many (every other YOLO detector, and a YOLOv10 whose checkpoint selects it): raw
  ``(N, 4 + classes, anchors)`` rows ``[cx, cy, w, h, scores...]``, decoded with NMS
  (:data:`LAYOUT_RAW`).

A checkpoint trained with Ultralytics 8.4 stores its YOLOv10 head with the one-to-one
branch *not* selected, and Ultralytics' ``val``/``predict``/``export`` then use the
one-to-many branch with NMS; the seeds' ``(1, 300, 6)`` contract is ``head="one2one"``.

Layer names are the module names of the Ultralytics ``DetectionModel``
(``model.8.m.0.cv1.conv``), stable across loads and identical in every backend.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import threading
import time
from collections.abc import Container, Iterable, Iterator
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

HEAD_AUTO = "auto"
HEAD_ONE2ONE = "one2one"
HEAD_ONE2MANY = "one2many"
HEAD_CHOICES = (HEAD_AUTO, HEAD_ONE2ONE, HEAD_ONE2MANY)


def head_postprocess(head: str) -> str:
    """How a head's output becomes detections: ``"topk"`` (NMS-free) or ``"nms"``."""
    return "topk" if head == HEAD_ONE2ONE else "nms"


def head_label(head: str) -> str:
    """A short human description of a head and its post-processing."""
    return ("one-to-one head, NMS-free (top-k)" if head == HEAD_ONE2ONE
            else "one-to-many head + NMS")


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
    head: str = HEAD_ONE2ONE
    """The branch kept: ``one2one`` (NMS-free, end-to-end layout) or ``one2many`` (raw layout, NMS)."""
    head_selected_by: str = "checkpoint"
    """``checkpoint`` (``head: auto``) or ``spec`` (an explicit ``head``)."""
    checkpoint_head: str = HEAD_ONE2ONE
    """The branch the checkpoint itself selects (what Ultralytics' own predict/val would use)."""

    @property
    def postprocess(self) -> str:
        """``topk`` (NMS-free) or ``nms``."""
        return head_postprocess(self.head)

    def head_info(self) -> dict[str, Any]:
        """The head and post-processing, for metadata files and tables."""
        return {"head": self.head, "postprocess": self.postprocess, "selected_by": self.head_selected_by,
                "checkpoint_head": self.checkpoint_head, "layout": self.layout, "label": head_label(self.head)}

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


def _read_model(path: Path, trust: bool = False) -> Any:
    """Return an Ultralytics DetectionModel from a .pt or .yaml file, offline.

    A ``.pt`` is a pickle, and unpickling can run any code the file carries; it is loaded with
    Ultralytics' restricted loader (``torch.load(weights_only=True)`` and an allow-list of its
    model classes) unless ``trust`` says the file's source is trusted.
    """
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
    from ultralytics.nn import tasks

    if not trust and not tasks._SafeLoad.SUPPORTED:
        raise ModelLoadError(f"{path}: this torch cannot load checkpoints without running their code "
                             f"(weights_only loading needs torch >= 2.6); {TRUST_HINT}")
    try:
        with _SAFE_LOCK, _safe_load(tasks, not trust):
            model, _ckpt = tasks.load_checkpoint(str(path), device="cpu", fuse=False)
    except Exception as exc:  # noqa: BLE001
        text = str(exc).replace("ERROR ❌️ ", "").strip().splitlines()[0]
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc.__cause__ or ""))
        if not trust and refused:
            raise ModelLoadError(f"{path}: refused: the checkpoint references {refused.group(1)}, outside the "
                                 f"Ultralytics model classes, which loading would run; {TRUST_HINT}") from None
        raise ModelLoadError(f"{path}: cannot be read as an Ultralytics checkpoint: {text}") from None
    return model


#: How a user loads a checkpoint that the safe loader refuses.
TRUST_HINT = ("if you trust its source, pass --trust-checkpoint (or trust_checkpoint: true in the spec), "
              "which lets the file run code on this machine")
_SAFE_LOCK = threading.Lock()


@contextlib.contextmanager
def _safe_load(tasks: Any, safe: bool) -> Iterator[None]:
    """Ultralytics' own restricted loading (``torch.load(weights_only=True)`` against its allow-list of
    model classes) for one ``load_checkpoint`` call; ``safe=False`` is a full, code-running unpickle."""
    before = tasks.SAFE_LOAD
    tasks.SAFE_LOAD = safe
    try:
        yield
    finally:
        tasks.SAFE_LOAD = before


def load_model(path: str | os.PathLike[str], imgsz: int = 640, *, max_det: int = 300,
               head: str = HEAD_AUTO, end2end: bool | None = None, trust: bool = False) -> LoadedModel:
    """Load, fuse and wrap a detector with the head ``head`` (see the module docstring).

    ``end2end`` is the older spelling: True means ``head="one2one"``, False ``"one2many"``;
    ``trust`` allows a checkpoint that the restricted loader refuses to run its own code
    (see :func:`_read_model`).
    """
    import torch
    from ultralytics.nn.modules.head import Detect

    start = time.perf_counter()
    path = Path(path)
    det = _read_model(path, trust)
    det = det.float().eval()
    det_head = det.model[-1]
    if not isinstance(det_head, Detect):
        raise ModelLoadError(f"{path}: the last layer is {type(det_head).__name__}, not a YOLO Detect head "
                             "(only detection models are supported)")
    if type(det_head).__name__ not in ("Detect", "v10Detect"):
        raise ModelLoadError(f"{path}: head {type(det_head).__name__} is not a plain detection head "
                             "(segmentation, pose and OBB models are not supported)")
    if end2end is not None:
        choice = HEAD_ONE2ONE if end2end else HEAD_ONE2MANY
    else:
        choice = head
    if choice not in HEAD_CHOICES:
        raise ModelLoadError(f"head: {choice!r} is not one of {', '.join(HEAD_CHOICES)}")
    total_convs = sum(isinstance(m, torch.nn.Conv2d) for m in det.modules())
    has_one2one = getattr(det_head, "one2one_cv2", None) is not None
    has_one2many = getattr(det_head, "cv2", None) is not None
    checkpoint_head = HEAD_ONE2ONE if getattr(det_head, "end2end", False) else HEAD_ONE2MANY
    chosen = checkpoint_head if choice == HEAD_AUTO else choice
    if chosen == HEAD_ONE2ONE and not has_one2one:
        raise ModelLoadError(f"{path}: head: one2one asked, but this {type(det_head).__name__} head has no "
                             "one-to-one (NMS-free) branch; use head: auto or one2many")
    if chosen == HEAD_ONE2MANY and not has_one2many:
        raise ModelLoadError(f"{path}: head: one2many asked, but this checkpoint's one-to-many branch was removed "
                             "(fused for export); use head: auto or one2one")
    if has_one2one:
        det_head.end2end = chosen == HEAD_ONE2ONE
    with torch.no_grad():
        det.fuse(verbose=False)  # Ultralytics' fuse drops the branch not selected
    for p in det.parameters():
        p.requires_grad_(False)
    det_head.export = True
    det_head.format = "onnx"  # type: ignore[assignment]
    det_head.dynamic = False
    det_head.max_det = max_det
    layout = LAYOUT_END2END if getattr(det_head, "end2end", False) else LAYOUT_RAW
    if (layout == LAYOUT_END2END) != (chosen == HEAD_ONE2ONE):
        raise ModelLoadError(f"{path}: could not select the {chosen} head (Ultralytics kept the other branch)")
    module = _detector_class()(det.model, list(det.save)).eval()
    fused_convs = sum(isinstance(m, torch.nn.Conv2d) for m in module.modules())
    names = det.names if isinstance(getattr(det, "names", None), dict) else {}
    if len(names) != det_head.nc:
        names = {i: str(i) for i in range(det_head.nc)}
    layers = layer_table(module, imgsz)
    return LoadedModel(
        module=module, source=path, imgsz=imgsz, names={int(k): str(v) for k, v in names.items()},
        layout=layout, max_det=max_det, layers=layers, total_convs=total_convs,
        dropped_convs=total_convs - fused_convs, load_seconds=time.perf_counter() - start,
        info={"head": type(det_head).__name__, "stride": [int(s) for s in det_head.stride.tolist()],
              "yaml": getattr(det, "yaml", {}).get("yaml_file", ""), "params": int(sum(
                  p.numel() for p in module.parameters()))},
        head=chosen, head_selected_by="checkpoint" if choice == HEAD_AUTO else "spec",
        checkpoint_head=checkpoint_head,
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
