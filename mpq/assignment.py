"""Precisions, layer groups and assignments: the plain values passed between parts.

- :class:`Precision` is ``(w_bits, a_bits)``: weights in {4, 8, 16}, input activations in
  {8, 16}; 16 means float. ``W16A16`` is the float layer.
- :class:`LayerInfo` describes one quantizable layer of the fused model (a Conv2d or a
  Linear): its stable module name, shape, parameter count and MACs at the study's image
  size.
- :class:`LayerGroup` is the unit a search assigns one precision to: one layer
  (granularity ``layer``) or the layers of one top-level block (granularity ``block``).
- :class:`Assignment` maps layer names to precisions. Layers it does not name stay float.
  Its :meth:`Assignment.digest` names artifacts and makes trials cacheable.

Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

WEIGHT_BITS = (4, 8, 16)
ACT_BITS = (8, 16)
_PRECISION_RE = re.compile(r"^\s*[wW](\d+)\s*[aA](\d+)\s*$")


@dataclass(frozen=True, order=True)
class Precision:
    """Weight and input-activation bit widths of one layer; 16 means float."""

    w_bits: int = 16
    a_bits: int = 16

    def __post_init__(self) -> None:
        if self.w_bits not in WEIGHT_BITS:
            raise ValueError(f"weight bits must be one of {WEIGHT_BITS}, got {self.w_bits}")
        if self.a_bits not in ACT_BITS:
            raise ValueError(f"activation bits must be one of {ACT_BITS}, got {self.a_bits}")

    @classmethod
    def parse(cls, text: str | Precision) -> Precision:
        """Parse ``"W4A8"`` (case-insensitive); ``"float"``/``"fp"`` is ``W16A16``."""
        if isinstance(text, Precision):
            return text
        if text.strip().lower() in ("float", "fp", "fp32", "fp16"):
            return FLOAT
        match = _PRECISION_RE.match(text)
        if not match:
            raise ValueError(f"precision {text!r} is not of the form W<bits>A<bits>, e.g. W4A8 or W8A16")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def is_float(self) -> bool:
        """Whether this is W16A16 (the float layer)."""
        return self.w_bits == 16 and self.a_bits == 16

    @property
    def quantizes_weights(self) -> bool:
        """Whether the weights go below 16 bits."""
        return self.w_bits < 16

    @property
    def quantizes_inputs(self) -> bool:
        """Whether the layer's input goes below 16 bits."""
        return self.a_bits < 16

    def __str__(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}"


FLOAT = Precision(16, 16)
DEFAULT_CANDIDATES: tuple[Precision, ...] = (
    Precision(4, 16),
    Precision(4, 8),
    Precision(8, 16),
    Precision(8, 8),
)


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable layer (Conv2d or Linear) of the fused model."""

    name: str
    kind: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    groups: int
    params: int
    macs: int
    index: int
    block: str
    quantizable: bool = True
    reason: str = ""

    @property
    def weight_params(self) -> int:
        """Number of weight elements (bias excluded)."""
        k = 1
        for d in self.kernel:
            k *= d
        return self.out_channels * (self.in_channels // max(self.groups, 1)) * k


@dataclass(frozen=True)
class LayerGroup:
    """A unit of the search: one layer, or the quantizable layers of one block."""

    name: str
    layers: tuple[str, ...]
    kind: str
    params: int
    weight_params: int
    macs: int
    index: int

    @property
    def size(self) -> int:
        """Number of layers in the group."""
        return len(self.layers)


def group_layers(layers: Iterable[LayerInfo], granularity: str = "layer") -> list[LayerGroup]:
    """Group the quantizable layers: ``layer`` gives one group per layer, ``block`` one per
    top-level block (``model.8``), in network order."""
    quant = [lay for lay in layers if lay.quantizable]
    if granularity == "layer":
        return [LayerGroup(lay.name, (lay.name,), lay.kind, lay.params, lay.weight_params, lay.macs, i)
                for i, lay in enumerate(quant)]
    if granularity != "block":
        raise ValueError(f"granularity must be 'layer' or 'block', got {granularity!r}")
    order: dict[str, list[LayerInfo]] = {}
    for lay in quant:
        order.setdefault(lay.block, []).append(lay)
    groups = []
    for i, (block, members) in enumerate(order.items()):
        kinds = sorted({m.kind for m in members})
        groups.append(LayerGroup(block, tuple(m.name for m in members), "+".join(kinds),
                                 sum(m.params for m in members), sum(m.weight_params for m in members),
                                 sum(m.macs for m in members), i))
    return groups


@dataclass(frozen=True)
class Assignment:
    """A frozen mapping from layer name to :class:`Precision`; unnamed layers stay float.

    Float entries are dropped on construction, so two assignments that build the same
    model are equal and share a digest.
    """

    precisions: Mapping[str, Precision] = field(default_factory=dict)

    def __post_init__(self) -> None:
        cleaned = {str(k): Precision.parse(v) for k, v in dict(self.precisions).items()}
        object.__setattr__(self, "precisions",
                           dict(sorted((k, v) for k, v in cleaned.items() if not v.is_float)))

    # -- construction -------------------------------------------------------------------
    @classmethod
    def uniform(cls, layers: Iterable[LayerInfo | LayerGroup | str], precision: Precision | str) -> Assignment:
        """Every given layer (or every layer of every given group) at ``precision``."""
        p = Precision.parse(precision)
        return cls({name: p for name in _layer_names(layers)})

    @classmethod
    def from_groups(cls, groups: Iterable[LayerGroup], choice: Mapping[str, Precision | str]) -> Assignment:
        """Expand a per-group choice to the group's layers."""
        out: dict[str, Precision] = {}
        for g in groups:
            if g.name in choice:
                p = Precision.parse(choice[g.name])
                for layer in g.layers:
                    out[layer] = p
        return cls(out)

    # -- access ---------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Precision:
        return self.precisions.get(name, FLOAT)

    def get(self, name: str) -> Precision:
        """The precision of layer ``name`` (float when unnamed)."""
        return self.precisions.get(name, FLOAT)

    def __iter__(self) -> Iterator[str]:
        return iter(self.precisions)

    def __len__(self) -> int:
        return len(self.precisions)

    def items(self) -> Iterable[tuple[str, Precision]]:
        """(layer name, precision) of every quantized layer, sorted by name."""
        return self.precisions.items()

    # -- identity -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, str]:
        """Layer name -> ``"W4A8"`` of every quantized layer."""
        return {k: str(v) for k, v in self.precisions.items()}

    def digest(self) -> str:
        """A stable 16-hex-digit name for this assignment."""
        payload = json.dumps({"v": 1, "layers": self.to_dict()}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_json(self, **extra: Any) -> str:
        """The ``assignment.json`` text: version, digest, layers (and ``extra`` keys)."""
        return json.dumps({"version": 1, "digest": self.digest(), "layers": self.to_dict(), **extra},
                          indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str | Mapping[str, Any], *, source: str = "assignment") -> Assignment:
        """Read ``{"layers": {name: "W4A8", ...}}`` (or a bare name -> precision mapping)."""
        data = json.loads(text) if isinstance(text, str) else dict(text)
        layers = data.get("layers", data) if isinstance(data, dict) else None
        if not isinstance(layers, dict):
            raise ValueError(f"{source}: expected an object with a 'layers' mapping of layer name -> 'W4A8'")
        out: dict[str, Precision] = {}
        for k, v in layers.items():
            if k in ("version", "digest"):
                continue
            try:
                out[k] = Precision.parse(str(v))
            except ValueError as exc:
                raise ValueError(f"{source}: layer {k!r}: {exc}") from None
        return cls(out)

    # -- summaries ------------------------------------------------------------------------
    def summary(self, layers: Iterable[LayerInfo]) -> dict[str, Any]:
        """Counts and weight shares per precision over the quantizable layers."""
        quant = [lay for lay in layers if lay.quantizable]
        total_w = sum(lay.weight_params for lay in quant) or 1
        counts: dict[str, int] = {}
        wshare: dict[str, float] = {}
        w4 = 0
        a8 = 0
        for lay in quant:
            p = self.get(lay.name)
            counts[str(p)] = counts.get(str(p), 0) + 1
            wshare[str(p)] = wshare.get(str(p), 0.0) + lay.weight_params / total_w
            if p.w_bits == 4:
                w4 += lay.weight_params
            if p.a_bits == 8:
                a8 += 1
        return {
            "layers": len(quant),
            "counts": dict(sorted(counts.items())),
            "weight_share": {k: round(v, 4) for k, v in sorted(wshare.items())},
            "w4_weight_share": round(w4 / total_w, 4),
            "a8_layers": a8,
            "label": self.label(quant),
        }

    def label(self, layers: Iterable[LayerInfo] | None = None) -> str:
        """A short human label: ``uniform W4A8``, ``float``, or ``mixed 40xW4A16 20xW8A8 ...``."""
        names = [lay.name for lay in layers if lay.quantizable] if layers is not None else list(self.precisions)
        precs = [self.get(n) for n in names]
        uniq = sorted(set(precs))
        if not precs or uniq == [FLOAT]:
            return "float"
        if len(uniq) == 1:
            return f"uniform {uniq[0]}"
        counts = {p: precs.count(p) for p in uniq}
        return "mixed " + " ".join(f"{c}x{p}" for p, c in sorted(counts.items(), key=lambda t: -t[1]))


def _layer_names(items: Iterable[LayerInfo | LayerGroup | str]) -> list[str]:
    names: list[str] = []
    for it in items:
        if isinstance(it, str):
            names.append(it)
        elif isinstance(it, LayerGroup):
            names.extend(it.layers)
        elif it.quantizable:
            names.append(it.name)
    return names
