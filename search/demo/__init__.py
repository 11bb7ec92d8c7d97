"""The offline demo fixture: a synthetic COCO-format dataset and a small YOLOv10 trained on it."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_WEIGHTS = ASSETS / "yolov10n-shapes.pt"
DEFAULT_IMGSZ = 192


def demo_dataset(root: Path | None = None, progress: bool = True) -> Path:
    """Generate (once) and return the synthetic dataset folder in the cache."""
    from mpq.env import cache_dir
    from search.demo.synth import GENERATOR_VERSION, generate

    root = root or cache_dir() / f"demo-data-v{GENERATOR_VERSION}"
    return generate(root, progress=progress)


def resolve_demo_path(rel: str) -> Path:
    """Resolve ``demo://REL``: a bundled asset (the weights) or a path in the demo dataset."""
    rel = rel.lstrip("/")
    asset = ASSETS / rel
    if asset.exists():
        return asset
    return demo_dataset() / rel
