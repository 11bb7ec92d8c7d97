"""The data of a study checked before any work: ``search validate`` and the start of ``search run``.

A study that would fail on its data fails here, in seconds, naming the file: the annotations
parse as COCO instances, every image id and category an annotation of the subset names
exists, every image of the evaluation subset and of the calibration list exists and decodes
(with the decoder the run uses), and the calibration list is not empty. Images are decoded
in parallel threads (the decoder releases the GIL), with a progress bar for large sets.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpq.errors import UserError

if TYPE_CHECKING:
    from search.spec import StudySpec

#: Above this many images the check shows a progress bar.
PROGRESS_FROM = 200


def check_data(spec: StudySpec, *, progress: bool = True) -> list[str]:
    """Every problem of the spec's data, as ``where: what`` lines naming the file (empty: all good)."""
    from mpq.data import DataError, load_coco_subset, read_calibration_list

    problems: list[str] = []
    images: list[tuple[str, Path]] = []
    ds = spec.dataset
    try:
        subset = load_coco_subset(ds.images, ds.annotations, max_images=ds.max_images, image_ids=ds.image_ids)
    except DataError as exc:
        problems.append(f"dataset: {exc}")
    else:
        problems += _annotation_problems(ds.annotations, set(subset.image_ids))
        images += [("dataset.images", p) for p in subset.paths]
    cal = spec.calibration
    try:
        paths = read_calibration_list(cal.source, cal.max_images)
    except DataError as exc:
        problems.append(f"calibration.source: {exc}")
    else:
        images += [("calibration.source", p) for p in paths]
    problems += _undecodable(images, progress)
    return problems


def require_data(spec: StudySpec, *, progress: bool = True) -> None:
    """Raise a one-line :class:`UserError` for the first data problem (and how many there are)."""
    problems = check_data(spec, progress=progress)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s): `search validate` lists them)" if len(problems) > 1 else ""
        raise UserError(f"{problems[0]}{more}")


def _annotation_problems(path: Path, subset_ids: set[int]) -> list[str]:
    """Annotations of the subset whose image, category or box is not valid."""
    import json

    data = json.loads(Path(path).read_text())  # parsed once already by load_coco_subset
    images = {im.get("id") for im in data["images"] if isinstance(im, dict)}
    categories = {c.get("id") for c in data["categories"] if isinstance(c, dict)}
    problems: list[str] = []
    for n, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            problems.append(f"dataset.annotations: {path}: annotation #{n} is not an object")
            continue
        image = ann.get("image_id")
        if image not in images:
            problems.append(f"dataset.annotations: {path}: annotation #{n} names image id {image!r}, "
                            "which is not in 'images'")
            continue
        if image not in subset_ids:
            continue
        if ann.get("category_id") not in categories:
            problems.append(f"dataset.annotations: {path}: annotation #{n} names category "
                            f"{ann.get('category_id')!r}, which is not in 'categories'")
        if not _is_box(ann.get("bbox")):
            problems.append(f"dataset.annotations: {path}: annotation #{n} has no valid 'bbox' [x, y, w, h]")
        if len(problems) >= 20:
            problems.append(f"dataset.annotations: {path}: more problems not listed")
            break
    return problems


def _is_box(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value)
            and value[2] >= 0 and value[3] >= 0)


def _undecodable(images: Sequence[tuple[str, Path]], progress: bool) -> list[str]:
    """``where: why`` for each image that is missing or does not decode."""
    from concurrent.futures import ThreadPoolExecutor

    from mpq.data import DataError, load_image

    def check(item: tuple[str, Path]) -> str | None:
        where, path = item
        try:
            load_image(path)
        except DataError as exc:
            return f"{where}: {exc}"
        return None

    unique = list(dict.fromkeys(images))
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        results: Iterable[str | None] = pool.map(check, unique)
        if progress and len(unique) >= PROGRESS_FROM:
            from rich.progress import track

            from search.console import console_err

            results = track(results, total=len(unique), description="checking images", console=console_err,
                            transient=True)
        return [r for r in results if r is not None]
