"""Metrics stage (after write): confusion counts, the IoU family, trimap bands and their dataset-wide sums.

Pure numpy, no I/O and no Ray: ``pipeline/metrics/evaluate.py`` feeds it decoded masks, ``pipeline/metrics/report.py`` turns the
sums into files. Protocol (reference section 4): one CxC confusion matrix summed over all pixels of all images,
row = ground truth, column = prediction, ground truth 255 (void) skipped.

Decisions, named here once:
- **Absent classes.** A class with no pixel in the ground truth *and* none in the prediction has no IoU
  (``None``, never 0) and is left out of the mean. Every other class counts, 0 included (e.g. predicted but never
  in the ground truth). On VOC val every class is present, so this is the VOC devkit's mean over all 21 classes;
  the devkit itself would return NaN for an absent class.
- **Trimap band.** ``"void"`` source (the paper): band(w) = dilate(gt == 255, square of side 2w+1) AND gt != 255.
  ``"edges"`` source, for labels without a void band: the seeds are the label edges E (non-void pixels with a
  4-neighbour of another non-void class, both sides of the edge), band(w) = dilate(E, square of side 2w-1) AND
  gt != 255, so band(1) is the pixels right at the edge, as band(1) of the void source is the pixels touching the
  void band. The dataset-wide choice (``choose_band_source``): ``"void"`` when at least half of the labelled images
  contain void pixels, else ``"edges"``; callers may force either.
- **Bands for all widths at once.** One chessboard distance transform per image (two raster passes, exact for the
  square structuring element), then a bincount by (distance, gt, prediction) and a cumulative sum over distance:
  band(w) is exactly the pixels at distance <= w, so 40 widths cost one pass, not 40 dilations.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.schema import VOC_CLASSES

# Per-image counting is the encode stage's (it stores them in every row); here they are summed and scored.
from pipeline.stages.encode import VOID, _check_pair, confusion_matrix

__all__ = [
    "VOID",
    "BAND_SOURCES",
    "VOC_CLASS_NAMES",
    "confusion_matrix",
    "summarize",
    "image_mean_iou",
    "chessboard_distance",
    "label_edges",
    "band_distance",
    "image_band_source",
    "trimap_band",
    "band_confusions",
    "choose_band_source",
    "ImageScore",
    "MetricsAccumulator",
]

BAND_SOURCES = ("void", "edges")
VOC_CLASS_NAMES = VOC_CLASSES


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def summarize(conf: np.ndarray) -> dict:
    """The IoU family from a (C, C) confusion matrix (row = ground truth, column = prediction).

    Returns plain Python values (JSON-ready): ``per_class_iou`` (None for classes absent from both ground truth
    and prediction), ``mean_iou`` (mean over the non-None IoUs; None when there are none), ``per_class_accuracy``
    (recall, None for classes absent from the ground truth), ``mean_accuracy`` (mean over the non-None ones),
    ``pixel_accuracy``, ``fw_iou`` (IoU weighted by ground-truth class frequency), ``num_pixels`` and
    ``absent_classes`` (indices left out of the mean IoU).
    """
    conf = np.asarray(conf, dtype=np.int64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C), got shape {conf.shape}")
    tp = np.diag(conf)
    gt_count = conf.sum(axis=1)
    pred_count = conf.sum(axis=0)
    total = int(conf.sum())
    union = gt_count + pred_count - tp
    per_class_iou = [_ratio(tp[c], union[c]) for c in range(conf.shape[0])]
    per_class_acc = [_ratio(tp[c], gt_count[c]) for c in range(conf.shape[0])]
    ious = [v for v in per_class_iou if v is not None]
    accs = [v for v in per_class_acc if v is not None]
    fw_iou = None
    if total:
        # Classes absent from the ground truth have weight 0, so their (possibly None) IoU never matters.
        fw_iou = float(
            sum(int(gt_count[c]) * per_class_iou[c] for c in range(conf.shape[0]) if gt_count[c]) / total
        )
    return {
        "mean_iou": float(sum(ious) / len(ious)) if ious else None,
        "per_class_iou": per_class_iou,
        "pixel_accuracy": _ratio(int(tp.sum()), total),
        "mean_accuracy": float(sum(accs) / len(accs)) if accs else None,
        "per_class_accuracy": per_class_acc,
        "fw_iou": fw_iou,
        "num_pixels": total,
        "absent_classes": [c for c, v in enumerate(per_class_iou) if v is None],
    }


def image_mean_iou(conf: np.ndarray) -> float | None:
    """Per-image mean IoU: over the classes present in this image's ground truth or prediction (None if void-only)."""
    return summarize(conf)["mean_iou"]


def chessboard_distance(seeds: np.ndarray) -> np.ndarray:
    """int32 (H, W) chessboard (L-inf) distance from each pixel to the nearest True pixel of ``seeds``.

    dilate(seeds, square of side 2w+1) == (distance <= w). Two raster passes (Rosenfeld-Pfaltz chamfer with unit
    weights, exact for L-inf), vectorised per row: the in-row sweep is a cumulative minimum. Pixels with no seed
    in the image get H + W (larger than any real distance).
    """
    seeds = np.asarray(seeds, dtype=bool)
    if seeds.ndim != 2:
        raise ValueError(f"seeds must be 2-D (H, W), got shape {seeds.shape}")
    if seeds.shape[0] > seeds.shape[1]:
        # The Python loop runs over rows: loop over the shorter side (the transform is symmetric).
        return np.ascontiguousarray(chessboard_distance(seeds.T).T)
    h, w = seeds.shape
    far = h + w
    d = np.where(seeds, 0, far).astype(np.int32)
    if not seeds.any():
        return d
    ar = np.arange(w, dtype=np.int32)

    def from_row(prev: np.ndarray) -> np.ndarray:
        # min over the 3 pixels above (or below): x-1, x, x+1
        m = prev.copy()
        np.minimum(m[1:], prev[:-1], out=m[1:])
        np.minimum(m[:-1], prev[1:], out=m[:-1])
        return m + 1

    for y in range(h):  # forward: top-left to bottom-right
        row = d[y]
        if y:
            row = np.minimum(row, from_row(d[y - 1]))
        d[y] = np.minimum.accumulate(row - ar) + ar  # row[x] = min_{x' <= x} row[x'] + (x - x')
    for y in range(h - 1, -1, -1):  # backward: bottom-right to top-left
        row = d[y]
        if y < h - 1:
            row = np.minimum(row, from_row(d[y + 1]))
        d[y] = np.minimum.accumulate((row + ar)[::-1])[::-1] - ar  # row[x] = min_{x' >= x} row[x'] + (x' - x)
    return np.minimum(d, far)


def label_edges(gt: np.ndarray) -> np.ndarray:
    """bool (H, W): non-void pixels with a 4-neighbour of a different non-void class (both sides of each edge)."""
    gt = np.asarray(gt)
    valid = gt != VOID
    edges = np.zeros(gt.shape, dtype=bool)
    for a, b in (
        (np.s_[:, 1:], np.s_[:, :-1]),  # horizontal neighbours
        (np.s_[1:, :], np.s_[:-1, :]),  # vertical neighbours
    ):
        diff = (gt[a] != gt[b]) & valid[a] & valid[b]
        edges[a] |= diff
        edges[b] |= diff
    return edges


def band_distance(gt: np.ndarray, source: str) -> np.ndarray:
    """int32 (H, W) "band distance": pixel p is in band(w) iff distance[p] <= w (w >= 1). Void pixels are never in.

    ``"void"``: chessboard distance to the nearest void pixel. ``"edges"``: 1 + chessboard distance to the nearest
    label-edge pixel. See the module docstring for why.
    """
    if source not in BAND_SOURCES:
        raise ValueError(f"band source must be one of {BAND_SOURCES}, got {source!r}")
    gt = np.asarray(gt)
    if gt.ndim != 2:
        raise ValueError(f"gt must be 2-D (H, W), got shape {gt.shape}")
    void = gt == VOID
    # Edges are shifted by 1 so that band(1) is the edge pixels themselves (void: the pixels touching void).
    d = chessboard_distance(void) if source == "void" else chessboard_distance(label_edges(gt)) + 1
    d[void] = np.iinfo(np.int32).max  # never in a band
    return d


def image_band_source(gt: np.ndarray, source: str = "auto") -> str:
    """Resolve ``source`` for one label: "auto" -> "void" if it has void pixels, else "edges"."""
    if source == "auto":
        return "void" if bool((np.asarray(gt) == VOID).any()) else "edges"
    if source not in BAND_SOURCES:
        raise ValueError(f"band source must be 'auto' or one of {BAND_SOURCES}, got {source!r}")
    return source


def trimap_band(gt: np.ndarray, width: int, *, source: str = "auto") -> np.ndarray:
    """bool (H, W) band of ``width`` around the void band (``source="void"``) or label edges (``"edges"``);
    ``"auto"`` picks per image (``image_band_source``). Datasets use one source for all images (the accumulator)."""
    if width < 1:
        raise ValueError(f"trimap width must be >= 1, got {width}")
    return band_distance(gt, image_band_source(gt, source)) <= width


def _check_widths(widths: Sequence[int]) -> np.ndarray:
    w = np.asarray(list(widths), dtype=np.int64)
    if w.ndim != 1 or w.size == 0 or int(w.min()) < 1:
        raise ValueError(f"trimap widths must be a non-empty list of integers >= 1, got {list(widths)}")
    return w


def band_confusions(
    gt: np.ndarray,
    pred: np.ndarray,
    widths: Sequence[int],
    num_classes: int,
    *,
    source: str = "auto",
    distance: np.ndarray | None = None,
) -> np.ndarray:
    """int64 (len(widths), C, C): the confusion matrix restricted to band(w) for each width.

    ``source`` as in ``trimap_band``. ``distance`` (from ``band_distance(gt, source)``) may be passed to share one transform between the raw and the
    CRF masks. Same validation as ``confusion_matrix``.
    """
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    _check_pair(gt, pred, num_classes)
    w = _check_widths(widths)
    max_w = int(w.max())
    if distance is None:
        distance = band_distance(gt, image_band_source(gt, source))
    elif distance.shape != gt.shape:
        raise ValueError(f"distance shape {distance.shape} must equal the ground truth shape {gt.shape}")
    inside = distance <= max_w  # excludes void (distance = int32 max)
    d = distance[inside].astype(np.int64) - 1  # 0..max_w-1
    g = gt[inside].astype(np.int64)
    p = pred[inside].astype(np.int64)
    if g.size and int(g.max()) >= num_classes:
        raise ValueError(f"ground truth values must be < {num_classes} or {VOID}, got max {int(g.max())}")
    if p.size and int(p.max()) >= num_classes:
        raise ValueError(f"prediction values must be < {num_classes}, got max {int(p.max())}")
    cc = num_classes * num_classes
    per_distance = np.bincount(d * cc + g * num_classes + p, minlength=max_w * cc).reshape(max_w, cc)
    cumulative = np.cumsum(per_distance, axis=0)  # row k = band(k + 1)
    return cumulative[w - 1].reshape(len(w), num_classes, num_classes).astype(np.int64)


def choose_band_source(num_images_with_void: int, num_images: int) -> str:
    """Dataset-wide band source: "void" when at least half of the labelled images have void pixels, else "edges"."""
    if num_images and 2 * num_images_with_void >= num_images:
        return "void"
    return "edges"


@dataclass(frozen=True)
class ImageScore:
    """One evaluated image: its id and per-image mean IoU / pixel accuracy (None when undefined)."""

    image_id: str
    mean_iou_raw: float | None
    mean_iou_crf: float | None
    pixel_accuracy_raw: float | None
    pixel_accuracy_crf: float | None
    num_pixels: int

    @property
    def mean_iou(self) -> float | None:
        """The final mask's mIoU: CRF when the CRF ran, raw otherwise."""
        return self.mean_iou_crf if self.mean_iou_crf is not None else self.mean_iou_raw


class MetricsAccumulator:
    """Dataset-wide sums: confusions (raw, CRF), trimap band confusions for both band sources, per-image scores,
    error counts. ``merge`` adds another accumulator (Ray: one per batch, summed on the driver); integer sums make
    the result independent of order and partitioning.

    ``band_sources``: which sources to compute per image ("auto" at dataset level needs both).
    """

    MAX_ERROR_SAMPLES = 20

    def __init__(
        self,
        num_classes: int,
        widths: Sequence[int] = tuple(range(1, 41)),
        band_sources: Iterable[str] = BAND_SOURCES,
    ) -> None:
        if num_classes < 1 or num_classes > VOID:
            raise ValueError(f"num_classes must be in 1..{VOID}, got {num_classes}")
        self.num_classes = int(num_classes)
        self.widths = tuple(int(x) for x in _check_widths(widths))
        self.band_sources = tuple(band_sources)
        for s in self.band_sources:
            if s not in BAND_SOURCES:
                raise ValueError(f"band source must be one of {BAND_SOURCES}, got {s!r}")
        c, n = self.num_classes, len(self.widths)
        self.confusion = {"raw": np.zeros((c, c), np.int64), "crf": np.zeros((c, c), np.int64)}
        self.trimap = {
            s: {"raw": np.zeros((n, c, c), np.int64), "crf": np.zeros((n, c, c), np.int64)}
            for s in self.band_sources
        }
        self.num_images = 0  # evaluated: status ok, label usable
        self.num_crf_images = 0  # of those, with a CRF mask
        self.num_images_with_void = 0
        self.num_errors = 0  # rows whose status is not ok
        self.errors_by_status: dict[str, int] = {}
        self.num_unlabelled = 0  # ok rows without ground truth
        self.num_eval_errors = 0  # ok rows whose label or masks could not be used here
        self.num_confusion_mismatches = 0  # stored per-image confusion != recomputed
        self.error_samples: list[dict] = []
        self.images: list[ImageScore] = []

    # -- adding ----------------------------------------------------------------------------------------------------
    def add_image(
        self,
        image_id: str,
        gt: np.ndarray,
        raw: np.ndarray,
        crf: np.ndarray | None = None,
        *,
        stored_raw: Sequence[int] | None = None,
        stored_crf: Sequence[int] | None = None,
    ) -> None:
        """Add one labelled image. ``crf`` None = the CRF was off (raw only). ``stored_*`` are the flattened
        per-image confusions written by the segment run; a difference from the recomputed counts is counted.
        Raises ValueError (nothing added) when the label or masks are inconsistent."""
        c = self.num_classes
        conf_raw = confusion_matrix(gt, raw, c)
        conf_crf = confusion_matrix(gt, crf, c) if crf is not None else None
        bands: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        for s in self.band_sources:
            dist = band_distance(gt, s)
            b_raw = band_confusions(gt, raw, self.widths, c, distance=dist)
            b_crf = band_confusions(gt, crf, self.widths, c, distance=dist) if crf is not None else None
            bands[s] = (b_raw, b_crf)
        # All checks passed: commit.
        for stored, conf in ((stored_raw, conf_raw), (stored_crf, conf_crf)):
            if stored is not None and conf is not None:
                arr = np.asarray(stored, dtype=np.int64)
                if arr.shape != (c * c,) or not np.array_equal(arr, conf.ravel()):
                    self.num_confusion_mismatches += 1
        self.confusion["raw"] += conf_raw
        if conf_crf is not None:
            self.confusion["crf"] += conf_crf
            self.num_crf_images += 1
        for s, (b_raw, b_crf) in bands.items():
            self.trimap[s]["raw"] += b_raw
            if b_crf is not None:
                self.trimap[s]["crf"] += b_crf
        self.num_images += 1
        self.num_images_with_void += int(bool((np.asarray(gt) == VOID).any()))
        s_raw = summarize(conf_raw)
        s_crf = summarize(conf_crf) if conf_crf is not None else None
        self.images.append(
            ImageScore(
                image_id=str(image_id),
                mean_iou_raw=s_raw["mean_iou"],
                mean_iou_crf=s_crf["mean_iou"] if s_crf else None,
                pixel_accuracy_raw=s_raw["pixel_accuracy"],
                pixel_accuracy_crf=s_crf["pixel_accuracy"] if s_crf else None,
                num_pixels=s_raw["num_pixels"],
            )
        )

    def _keep_samples(self, samples: list[dict]) -> None:
        # The first ids in sort order, not in arrival order: the same samples whatever the partitioning.
        samples = sorted(samples, key=lambda d: (d["image_id"], d["status"], d["error"] or ""))
        self.error_samples = samples[: self.MAX_ERROR_SAMPLES]

    def _sample(self, image_id: str, status: str, error: str | None) -> None:
        self._keep_samples(
            [*self.error_samples, {"image_id": str(image_id), "status": status, "error": error}]
        )

    def add_error(self, image_id: str, status: str, error: str | None) -> None:
        """A row the pipeline marked as failed (status != "ok")."""
        self.num_errors += 1
        self.errors_by_status[status] = self.errors_by_status.get(status, 0) + 1
        self._sample(image_id, status, error)

    def add_eval_error(self, image_id: str, error: str) -> None:
        """An ok row that could not be evaluated here (label unreadable, size mismatch, bad values)."""
        self.num_eval_errors += 1
        self._sample(image_id, "eval_error", error)

    def add_unlabelled(self) -> None:
        self.num_unlabelled += 1

    # -- merging ---------------------------------------------------------------------------------------------------
    def _check_compatible(self, other: MetricsAccumulator) -> None:
        if (other.num_classes, other.widths, other.band_sources) != (
            self.num_classes,
            self.widths,
            self.band_sources,
        ):
            raise ValueError(
                "cannot merge accumulators with different setups: expected "
                f"{(self.num_classes, self.widths, self.band_sources)}, got "
                f"{(other.num_classes, other.widths, other.band_sources)}"
            )

    def merge(self, other: MetricsAccumulator) -> MetricsAccumulator:
        """Add ``other`` into ``self`` and return ``self``."""
        self._check_compatible(other)
        for k in self.confusion:
            self.confusion[k] += other.confusion[k]
        for s in self.trimap:
            for k in self.trimap[s]:
                self.trimap[s][k] += other.trimap[s][k]
        for name in (
            "num_images",
            "num_crf_images",
            "num_images_with_void",
            "num_errors",
            "num_unlabelled",
            "num_eval_errors",
            "num_confusion_mismatches",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for k, v in other.errors_by_status.items():
            self.errors_by_status[k] = self.errors_by_status.get(k, 0) + v
        self._keep_samples(self.error_samples + other.error_samples)
        self.images.extend(other.images)
        return self

    # -- reading ---------------------------------------------------------------------------------------------------
    @property
    def has_crf(self) -> bool:
        return self.num_crf_images > 0

    def sorted_images(self) -> list[ImageScore]:
        """Per-image scores ordered worst first by the final mask's mIoU (CRF when present), ties by id;
        images with no defined mIoU (void-only) go last. Deterministic whatever the merge order."""

        def key(s: ImageScore) -> tuple:
            v = s.mean_iou
            return (v is None, v if v is not None else 0.0, s.image_id)

        return sorted(self.images, key=key)

    def band_source(self, requested: str = "auto") -> str:
        """The dataset-wide band source for ``requested`` ("auto", "void" or "edges")."""
        if requested == "auto":
            chosen = choose_band_source(self.num_images_with_void, self.num_images)
        elif requested in BAND_SOURCES:
            chosen = requested
        else:
            raise ValueError(f"band source must be 'auto' or one of {BAND_SOURCES}, got {requested!r}")
        if chosen not in self.trimap:
            raise ValueError(f"band source {chosen!r} was not computed (computed: {list(self.trimap)})")
        return chosen
