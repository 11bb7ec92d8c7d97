"""Process-wide environment for the heavy frameworks, applied before they are imported.

Ultralytics must never reach the network: ``YOLO_OFFLINE=1`` and a private, writable
config directory are set before its first import, and its telemetry/integrations are
turned off.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of the project's caches (demo dataset, preprocessed images, engines)."""
    root = os.environ.get("YOLO_MPQ_CACHE")
    if root:
        path = Path(root)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        path = Path(base) / "yolo-mpq"
    path.mkdir(parents=True, exist_ok=True)
    return path


_ULTRALYTICS_READY = False


def import_ultralytics():  # noqa: ANN201 - returns the module
    """Import ultralytics offline, with a private config dir and quiet logging."""
    global _ULTRALYTICS_READY
    if not _ULTRALYTICS_READY:
        os.environ["YOLO_OFFLINE"] = "1"
        cfg = cache_dir() / "ultralytics-config"
        cfg.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("YOLO_CONFIG_DIR", str(cfg))
        os.environ.setdefault("YOLO_VERBOSE", "False")
    import ultralytics

    if not _ULTRALYTICS_READY:
        from ultralytics.utils import SETTINGS

        try:
            SETTINGS.update({"sync": False, "hub": False, "wandb": False, "mlflow": False,
                             "tensorboard": False, "clearml": False, "comet": False,
                             "dvc": False, "neptune": False, "raytune": False})
        except Exception:  # noqa: BLE001 - settings keys vary between releases
            pass
        _ULTRALYTICS_READY = True
    return ultralytics
