"""Train the demo detector on the synthetic dataset, on the CPU, reproducibly.

    python -m search.demo.train [--epochs 60] [--imgsz 192] [--out search/demo/assets/yolov10n-shapes.pt]

The architecture is Ultralytics' own ``yolov10n.yaml`` (C2f, SCDown, PSA, C2fCIB and the
v10Detect head, as in YOLOv10m) with six classes. Training uses a fixed seed,
deterministic mode and no dataloader workers, so the same command gives the same model
on the same software stack.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from search.demo import DEFAULT_IMGSZ, DEMO_WEIGHTS, demo_dataset


def train(epochs: int = 60, imgsz: int = DEFAULT_IMGSZ, out: Path = DEMO_WEIGHTS,
          workdir: Path | None = None, batch: int = 32, seed: int = 0) -> Path:
    """Train and copy the final weights to ``out``; returns ``out``."""
    from mpq.env import cache_dir, import_ultralytics

    import_ultralytics()
    from ultralytics import YOLO

    data = demo_dataset()
    workdir = workdir or cache_dir() / "demo-train"
    model = YOLO("yolov10n.yaml")
    start = time.time()
    model.train(data=str(data / "data.yaml"), epochs=epochs, imgsz=imgsz, batch=batch,
                workers=0, device="cpu", seed=seed, deterministic=True, amp=False,
                project=str(workdir), name="yolov10n-shapes", exist_ok=True, plots=False,
                close_mosaic=max(epochs // 6, 1), patience=0, verbose=False)
    elapsed = time.time() - start
    best = workdir / "yolov10n-shapes" / "weights" / "last.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(best, out)
    meta = {"epochs": epochs, "imgsz": imgsz, "batch": batch, "seed": seed,
            "train_seconds": round(elapsed, 1), "architecture": "yolov10n.yaml (nc=6)"}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line of ``python -m search.demo.train``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--imgsz", type=int, default=DEFAULT_IMGSZ)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=DEMO_WEIGHTS)
    args = parser.parse_args(argv)
    path = train(epochs=args.epochs, imgsz=args.imgsz, out=args.out, batch=args.batch)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
