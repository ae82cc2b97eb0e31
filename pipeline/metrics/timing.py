"""Where the time went (report stage): per-stage seconds per image from the output rows, and a cost estimate.

Every output row carries the seconds each stage spent on it (``schema.TIMING_COLUMNS``: decode, DCNN, CRF, encode)
and the Ray node the DCNN and the CRF ran on (``schema.NODE_COLUMNS``). ``summarize_timing`` turns those columns
(of ok rows; a failed row's seconds stop where it failed) into medians, 90th percentiles, each stage's share of the
busy time, and, per node when several ran, the same for the node's images.

The cost estimate multiplies busy seconds by prices per hour (``Prices``): the DCNN's seconds by the price of one
DCNN worker (a GPU, or a CPU core when the DCNN ran on CPUs) and the other stages' seconds by the price of one CPU
core. It is a lower bound for what the stages themselves cost: idle workers, start-up, storage, requests and the
driver are not in the rows. The default prices are examples to show the arithmetic, not quotes: set yours.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema
from pipeline.metrics.page import Headline, Section, Table

__all__ = [
    "STAGES",
    "Prices",
    "TimingSamples",
    "timing_columns",
    "summarize_timing",
    "run_facts",
    "fmt_seconds",
    "where_lines",
    "time_headline",
    "time_section",
]

# (stage name shown, timing column, node column or None, which price applies)
STAGES = (
    ("decode", "decode_s", None, "cpu"),
    ("DCNN", "dcnn_s", "dcnn_node", "dcnn"),
    ("CRF", "crf_s", "crf_node", "cpu"),
    ("encode", "encode_s", None, "cpu"),
)
assert tuple(s[1] for s in STAGES) == schema.TIMING_COLUMNS


@dataclass(frozen=True)
class Prices:
    """Prices for the cost estimate, USD per hour. The defaults are examples only (roughly an on-demand cloud GPU
    and one vCPU of a general-purpose instance), not a claim about any provider: pass your own."""

    dcnn_worker_hour_usd: float = 2.50  # one DCNN worker: a GPU (or a CPU core when the DCNN ran on CPUs)
    cpu_core_hour_usd: float = 0.05  # one CPU core: decode, CRF, encode

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not (isinstance(value, int | float) and value >= 0 and np.isfinite(value)):
                raise ValueError(f"Prices.{name} must be a finite number >= 0, got {value!r}")


def timing_columns(names: Sequence[str]) -> list[str]:
    """The columns ``summarize_timing`` reads, of those an output has (older outputs may lack some)."""
    wanted = (schema.STATUS, *schema.TIMING_COLUMNS, *schema.NODE_COLUMNS)
    return [c for c in wanted if c in names]


def _stats(values: np.ndarray) -> dict[str, float | int | None]:
    if values.size == 0:
        return {"images": 0, "median_s": None, "p90_s": None, "mean_s": None, "sum_s": 0.0}
    q = np.percentile(values, [50, 90])
    return {
        "images": int(values.size),
        "median_s": float(q[0]),
        "p90_s": float(q[1]),
        "mean_s": float(values.mean()),
        "sum_s": float(values.sum()),
    }


def _as_table(rows: pa.Table | Sequence[Mapping[str, Any]]) -> pa.Table:
    if isinstance(rows, pa.Table):
        return rows
    return pa.Table.from_pylist(list(rows)) if rows else pa.table({schema.STATUS: pa.array([], pa.string())})


class TimingSamples:
    """The seconds of ok rows, per stage and per (stage, node), gathered batch by batch (one Parquet file or row
    group at a time): 4 float32 per row are kept (160 MB for 10M rows) so the quantiles are exact."""

    def __init__(self) -> None:
        self._values: dict[tuple[str, str | None], list[np.ndarray]] = {}
        self.ok_rows = 0

    def add(self, rows: pa.Table | Sequence[Mapping[str, Any]]) -> None:
        table = _as_table(rows)
        if schema.STATUS in table.column_names:
            table = table.filter(pc.equal(table[schema.STATUS], schema.OK))
        for _, column, node_column, _ in STAGES:
            if column not in table.column_names:
                continue
            sub = table.filter(pc.is_valid(table[column]))
            values = np.asarray(sub[column].to_numpy(zero_copy_only=False), dtype=np.float32)
            self._values.setdefault((column, None), []).append(values)
            if node_column is None or node_column not in sub.column_names:
                continue
            encoded = pc.dictionary_encode(sub[node_column]).combine_chunks()
            codes = np.asarray(encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False))
            for code, node in enumerate(encoded.dictionary.to_pylist()):
                if node:
                    self._values.setdefault((column, node), []).append(values[codes == code])
        self.ok_rows += table.num_rows

    def seconds(self, column: str, node: str | None = None) -> np.ndarray:
        """float64 seconds (float32 in the Parquet, widened exactly)."""
        parts = self._values.get((column, node), [])
        return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)

    def nodes(self, column: str) -> list[str]:
        return sorted(n for c, n in self._values if c == column and n is not None)


def _cost(stages: list[dict], prices: Prices) -> dict:
    price_of = {"dcnn": prices.dcnn_worker_hour_usd, "cpu": prices.cpu_core_hour_usd}
    per_million = {
        s["stage"]: (s["mean_s"] or 0.0) * 1e6 / 3600.0 * price_of[s["price"]] for s in stages if s["images"]
    }
    return {
        "prices": asdict(prices),
        "usd_per_million_by_stage": per_million,
        "usd_per_million": sum(per_million.values()),
        "basis": "mean busy seconds per image x price per hour; idle workers, start-up, storage and requests "
        "are not included (a lower bound); the default prices are examples, not quotes",
    }


def summarize_timing(
    rows: pa.Table | Sequence[Mapping[str, Any]] | TimingSamples,
    *,
    prices: Prices = Prices(),
    wall_s: float | None = None,
    wall_images: int | None = None,
) -> dict:
    """Per-stage seconds per image of the ok rows (median, p90, mean, share of the busy time), per node, and the
    cost per million images. ``wall_s`` and ``wall_images``: a run's wall time and the images it processed, when
    known (the segment run's summary), for the job's images per second."""
    samples = rows if isinstance(rows, TimingSamples) else TimingSamples()
    if not isinstance(rows, TimingSamples):
        samples.add(rows)
    stages = []
    for name, column, _, price in STAGES:
        stages.append({"stage": name, "column": column, "price": price, **_stats(samples.seconds(column))})
    busy = sum(s["sum_s"] for s in stages)
    for s in stages:
        s["share"] = s["sum_s"] / busy if busy > 0 else None
        # One worker of this stage, busy all the time: its images per second.
        s["images_per_s_per_worker"] = 1.0 / s["mean_s"] if s["mean_s"] else None
    nodes = {
        node_column: [{"node": n, **_stats(samples.seconds(column, n))} for n in samples.nodes(column)]
        for _, column, node_column, _ in STAGES
        if node_column
    }
    job = None
    if wall_s and wall_images:
        job = {"wall_s": float(wall_s), "images": int(wall_images), "images_per_s": wall_images / wall_s}
    return {
        "ok_rows": samples.ok_rows,
        "stages": stages,
        "busy_s_per_image": sum(s["mean_s"] or 0.0 for s in stages),
        "nodes": nodes,
        "several_nodes": any(len(v) > 1 for v in nodes.values()),
        "job": job,
        "cost": _cost(stages, prices),
    }


# -- the run's facts and how the page shows them --------------------------------------------------------------------
def run_facts(
    read_from: str,
    *,
    timing: dict | None,
    original_output: str | None = None,
    model_digests: Sequence[str] = (),
    written_utc: tuple[str, str] | None = None,
    report_utc: str | None = None,
) -> dict:
    """What the report says about the run beside the metrics (``report/run.json``): where the output is read
    from and, when that is a copy, the output it copies; the model digests in the rows; when the parts were
    written; the timing summary."""
    if report_utc is None:
        report_utc = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    return {
        "read_from": read_from,
        "original_output": original_output,
        "model_digests": sorted(set(model_digests)),
        "written_utc": list(written_utc) if written_utc else None,
        "report_utc": report_utc,
        "timing": timing,
    }


def fmt_seconds(v: float | None) -> str:
    """Seconds per image as the page states them: 3 significant digits."""
    return "-" if v is None else f"{v:.3g}"


def _stage(timing: dict, name: str) -> dict:
    return next(s for s in timing["stages"] if s["stage"] == name)


def where_lines(run: dict | None, output_uri: str | None) -> list[str]:
    """Sentences under the title: where the output is read from (and what it is a copy of), when, on what."""
    run = run or {}
    read_from = run.get("read_from") or output_uri
    original = run.get("original_output")
    if original and original != read_from:
        out = [f"Read from {read_from}, a copy of the output {original}."]
    else:
        out = [f"Output: {read_from}."]
    written = run.get("written_utc")
    if written:
        span = written[0] if written[0] == written[1] else f"{written[0]} to {written[1]}"
        out.append(f"Rows written {span} UTC.")
    nodes = (run.get("timing") or {}).get("nodes") or {}
    if nodes.get("dcnn_node") or nodes.get("crf_node"):
        out.append(
            f"DCNN ran on {len(nodes.get('dcnn_node', []))} node(s), CRF on {len(nodes.get('crf_node', []))}."
        )
    if run.get("report_utc"):
        out.append(f"Report made {run['report_utc']} UTC.")
    return out


def time_headline(timing: dict) -> list[Headline]:
    dcnn, crf = _stage(timing, "DCNN"), _stage(timing, "CRF")
    big = [("DCNN ", None), (fmt_seconds(dcnn["median_s"]), "median-dcnn"), (" s", None)]
    if crf["images"]:
        big += [(" · CRF ", None), (fmt_seconds(crf["median_s"]), "median-crf"), (" s", None)]
    job = timing["job"]
    rate = f"; last run {job['images_per_s']:.3g} images/s" if job else ""
    cost = timing["cost"]
    prices = cost["prices"]
    return [
        Headline(
            "Median seconds per image",
            big,
            f"all stages {fmt_seconds(timing['busy_s_per_image'])} s busy (mean){rate}",
        ),
        Headline(
            "Cost per million images (estimate)",
            [(f"${cost['usd_per_million']:,.2f}", "cost")],
            f"at ${prices['dcnn_worker_hour_usd']:g}/DCNN-worker-hour, ${prices['cpu_core_hour_usd']:g}/CPU-core-hour "
            "(example prices, set yours); busy time only",
        ),
    ]


def _node_rows(entries: list[dict]) -> list[list[str]]:
    return [
        [e["node"][:12], str(e["images"]), fmt_seconds(e["median_s"]), fmt_seconds(e["p90_s"])]
        for e in entries
    ]


def time_section(timing: dict) -> Section:
    """Per-stage table (median, p90, mean, share, images/s of one worker), per node, the job's rate, the cost."""
    rows = [
        [
            s["stage"], str(s["images"]), fmt_seconds(s["median_s"]), fmt_seconds(s["p90_s"]),
            fmt_seconds(s["mean_s"]), "-" if s["share"] is None else f"{100 * s['share']:.0f} %",
            "-" if s["images_per_s_per_worker"] is None else f"{s['images_per_s_per_worker']:.3g}",
        ]
        for s in timing["stages"]
    ]  # fmt: skip
    header = ["stage", "images", "median s", "p90 s", "mean s", "share of busy time", "images/s per worker"]
    blocks: list = [Table(header, rows, "Seconds per image, ok rows (from the rows' decode_s, dcnn_s, crf_s, encode_s)",
                          table_id="stage-times")]  # fmt: skip
    job = timing["job"]
    if job:
        blocks.append(
            f"Last run: {job['images']} images in {job['wall_s']:.1f} s wall time, {job['images_per_s']:.3g} "
            "images/s for the whole job (all workers together, start-up included)."
        )
    if timing["several_nodes"]:
        for column, stage in (("dcnn_node", "DCNN"), ("crf_node", "CRF")):
            entries = timing["nodes"].get(column) or []
            if entries:
                blocks.append(Table(["node", "images", "median s", "p90 s"], _node_rows(entries),
                                    f"{stage} seconds per image by node"))  # fmt: skip
    cost = timing["cost"]
    prices = cost["prices"]
    cost_rows = [[stage, f"${usd:,.2f}"] for stage, usd in cost["usd_per_million_by_stage"].items()]
    cost_rows.append(["total", f"${cost['usd_per_million']:,.2f}"])
    blocks.append(Table(["stage", "USD per million images"], cost_rows, "Cost estimate"))
    blocks.append(
        f"Prices: ${prices['dcnn_worker_hour_usd']:g} per DCNN-worker-hour (a GPU, or a CPU core when the DCNN "
        f"ran on CPUs), ${prices['cpu_core_hour_usd']:g} per CPU-core-hour (evaluate's prices). "
        f"Basis: {cost['basis']}."
    )
    return Section("time", "Where the time went", blocks)
