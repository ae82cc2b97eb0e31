"""The few lines a user reads at the end of a segment run (from the job's manifest)."""

from __future__ import annotations

__all__ = ["format_summary", "print_summary", "print_logs_line"]


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def format_summary(manifest: dict) -> str:
    counts, run = manifest["counts"], manifest["run"]
    errors = {k: v for k, v in counts["status"].items() if k != "ok"}
    lines = [
        f"images        {counts['inputs']} ({counts['rows']} rows; {counts['processed_this_run']} processed now, "
        f"{counts['done_before']} done before)",
        f"errors        {counts['errors']}" + (f" {errors}" if errors else ""),
        *(
            [f"retryable     {counts['retryable']} (storage, credentials or memory): re-run the same command"]
            if counts.get("retryable")
            else []
        ),
        f"throughput    {run['images_per_s']:.2f} images/s ({run['wall_s']:.1f} s streaming)",
        f"model         {manifest['model']['variant']} sha256:{manifest['model']['digest'][:12]}",
    ]
    metrics = manifest.get("metrics")
    if metrics:
        lines.append(
            f"mean IoU      raw {_pct(metrics['mean_iou_raw'])}  CRF {_pct(metrics['mean_iou_crf'])}"
        )
        lines.append(f"report        {metrics['report']}report.html")
    lines.append(f"masks         {manifest['outputs']['masks']}")
    return "\n".join(lines)


def print_summary(manifest: dict) -> None:
    print(format_summary(manifest), flush=True)
    print_logs_line()


def print_logs_line() -> None:
    """Where Ray's warnings and internals went (pipeline/logs.py), as the summary's last line."""
    from pipeline.logs import logs_line

    line = logs_line()
    if line:
        print(line, flush=True)
