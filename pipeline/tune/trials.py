"""One tuning trial: the cached DCNN logits of the images, refined by the segment job's CRF stage and scored."""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema as S
from pipeline import storage
from pipeline.metrics.confusion import MetricsAccumulator, confusion_matrix, summarize
from pipeline.stages.crf import CRFConfig, CRFRefiner
from pipeline.tune.space import TRIMAP_WIDTHS, _canonical

__all__ = ["compute_logits", "cache_rows", "TrialError", "crf_masks", "score_crf", "evaluate_params"]

log = logging.getLogger(__name__)

# Logits cache: the DCNN once per image


_CACHE_SCHEMA = pa.schema(
    [
        pa.field(S.ID, pa.string(), nullable=False),
        pa.field(S.HEIGHT, pa.int32(), nullable=False),
        pa.field(S.WIDTH, pa.int32(), nullable=False),
        pa.field("image_rgb", pa.binary(), nullable=False),  # uint8 (H, W, 3)
        pa.field("label_raw", pa.binary(), nullable=False),  # uint8 (H, W), 255 = void
        pa.field("raw_mask_raw", pa.binary(), nullable=False),  # uint8 (H, W), the DCNN argmax
        pa.field("logits_f16", pa.binary(), nullable=False),  # float16 (C, h, w), stride 8
        pa.field("logits_shape", pa.list_(pa.int32()), nullable=False),
        pa.field(S.UPSAMPLE_OFFSET, pa.int32(), nullable=False),
    ]
)


def compute_logits(
    items: list[dict], dcnn_cfg: Any, decode_cfg: Any, storage_cfg: storage.StorageConfig
) -> tuple[pa.Table, list[dict]]:
    """The segment job's read -> decode -> DCNN stages on ``items`` (batches of ``dcnn_cfg.batch_size``).

    Returns the cache table (one row per image with a usable label) and the rows left out (id, status, error).
    """
    from pipeline.stages.dcnn import DeepLabPredictor
    from pipeline.stages.decode import decode_batch
    from pipeline.stages.read import fetch_batch

    predictor = DeepLabPredictor(dcnn_cfg, storage_cfg)
    rows: dict[str, list] = {name: [] for name in _CACHE_SCHEMA.names}
    excluded: list[dict] = []
    step = dcnn_cfg.batch_size
    for start in range(0, len(items), step):
        chunk = items[start : start + step]
        batch = {k: np.array([it[k] for it in chunk], dtype=object) for k in chunk[0]}
        batch = predictor(decode_batch(fetch_batch(batch, storage_cfg), decode_cfg))
        for i in range(len(chunk)):
            image_id = str(batch[S.ID][i])
            status, problem = str(batch[S.STATUS][i]), S.text_or_none(batch[S.LABEL_PROBLEM][i])
            label = batch[S.LABEL][i]
            if status != S.OK or problem or not isinstance(label, np.ndarray) or label.size == 0:
                why = S.text_or_none(batch[S.ERROR][i]) if status != S.OK else (problem or "no label")
                excluded.append(
                    {S.ID: image_id, S.STATUS: status if status != S.OK else S.ErrorKind.LABEL, S.ERROR: why}
                )
                continue
            image, logits = batch[S.IMAGE][i], batch[S.LOGITS][i]
            rows[S.ID].append(image_id)
            rows[S.HEIGHT].append(int(image.shape[0]))
            rows[S.WIDTH].append(int(image.shape[1]))
            rows["image_rgb"].append(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
            rows["label_raw"].append(np.ascontiguousarray(label, dtype=np.uint8).tobytes())
            rows["raw_mask_raw"].append(np.ascontiguousarray(batch[S.RAW_MASK][i], dtype=np.uint8).tobytes())
            rows["logits_f16"].append(np.ascontiguousarray(logits, dtype=np.float16).tobytes())
            rows["logits_shape"].append([int(d) for d in logits.shape])
            rows[S.UPSAMPLE_OFFSET].append(int(batch[S.UPSAMPLE_OFFSET][i]))
    return pa.Table.from_pydict(rows, schema=_CACHE_SCHEMA), excluded


def cache_rows(table: pa.Table) -> list[dict]:
    """Cache table -> per-image dicts of numpy arrays (what each trial reads)."""
    out = []
    for r in table.to_pylist():
        h, w = r[S.HEIGHT], r[S.WIDTH]
        out.append(
            {
                S.ID: r[S.ID],
                S.IMAGE: np.frombuffer(r["image_rgb"], dtype=np.uint8).reshape(h, w, 3),
                S.LABEL: np.frombuffer(r["label_raw"], dtype=np.uint8).reshape(h, w),
                S.RAW_MASK: np.frombuffer(r["raw_mask_raw"], dtype=np.uint8).reshape(h, w),
                S.LOGITS: np.frombuffer(r["logits_f16"], dtype=np.float16).reshape(r["logits_shape"]),
                S.UPSAMPLE_OFFSET: int(r[S.UPSAMPLE_OFFSET]),
            }
        )
    return out


def _table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Scoring (what every trial runs)


class TrialError(RuntimeError):
    """The CRF failed on an image: the trial has no score."""


def crf_masks(params: dict[str, Any], rows: Sequence[dict]) -> list[np.ndarray]:
    """CRF masks for ``rows`` through the segment job's CRF stage (``CRFRefiner`` on one-row batches)."""
    refiner = CRFRefiner(CRFConfig(**_canonical(params)))
    masks = []
    for row in rows:
        batch = {
            S.ID: S.object_column([row[S.ID]]),
            S.STATUS: S.object_column([S.OK]),
            S.ERROR: S.object_column([None]),
            S.IMAGE: S.object_column([row[S.IMAGE]]),
            S.LOGITS: S.object_column([row[S.LOGITS]]),
            S.UPSAMPLE_OFFSET: np.array([row[S.UPSAMPLE_OFFSET]], dtype=np.int64),
        }
        out = refiner(batch)
        if out[S.STATUS][0] != S.OK:
            raise TrialError(f"{row[S.ID]}: {out[S.ERROR][0]}")
        masks.append(out[S.MASK][0])
    return masks


def score_crf(params: dict[str, Any], rows: Sequence[dict], num_classes: int) -> dict[str, Any]:
    """Dataset mean IoU and pixel accuracy of the CRF with ``params``: per-image confusions (as encode stores them)
    summed over ``rows`` and summarised as metrics.json does."""
    total = np.zeros((num_classes, num_classes), dtype=np.int64)
    for row, mask in zip(rows, crf_masks(params, rows), strict=True):
        total += confusion_matrix(row[S.LABEL], mask, num_classes)
    s = summarize(total)
    return {
        "mean_iou": s["mean_iou"],
        "pixel_accuracy": s["pixel_accuracy"],
        "confusion": total.ravel().tolist(),
    }


def evaluate_params(params: dict[str, Any], rows: Sequence[dict], num_classes: int) -> MetricsAccumulator:
    """Full metrics (confusions, trimap bands) of the raw masks and the CRF with ``params``."""
    acc = MetricsAccumulator(num_classes, TRIMAP_WIDTHS)
    for row, mask in zip(rows, crf_masks(params, rows), strict=True):
        acc.add_image(row[S.ID], row[S.LABEL], row[S.RAW_MASK], mask)
    return acc


def _trial(config: dict, data: dict) -> None:
    """Ray Tune function trainable: one parameter set, one report. Errors are reported, not raised (a raised error
    makes Tune retire the actor, and on 2.60 the freed slot then stays idle for the rest of the round)."""
    import torch
    from ray import tune

    torch.set_num_threads(1)  # one CPU slot per trial: the upsampling must not spread over the node
    start = time.perf_counter()
    spec = config["trial"]
    try:
        result = score_crf(spec["crf"], data["rows"], data["num_classes"])
        result["error"] = None
    except Exception as e:  # noqa: BLE001 - any failure is this trial's record; the search goes on
        result = {
            "mean_iou": None,
            "pixel_accuracy": None,
            "confusion": None,
            "error": f"{type(e).__name__}: {e}",
        }
    result.update(key=spec["key"], seconds=time.perf_counter() - start, pid=os.getpid())
    tune.report(result)
