"""The few lines a user reads at the end of a segment run (from the job's manifest)."""

from __future__ import annotations

__all__ = ["format_summary", "print_summary", "format_dry_run", "print_logs_line"]


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


def format_dry_run(plan: dict) -> str:
    """``deeplab segment --dry-run``'s report (segment.dry_run_segment's dict)."""
    pools, cluster = plan["pools"], plan["cluster"]
    dcnn = (
        f"DCNN {pools['dcnn_size'][0]}-{pools['dcnn_size'][1]} actors x "
        f"({pools['dcnn_num_cpus']:g} CPU, {pools['dcnn_num_gpus']:g} GPU)"
    )
    crf = f"CRF {pools['crf_size'][0]}-{pools['crf_size'][1]} actors x 1 CPU" if plan["crf"] else "CRF off"
    extra = (
        f"; {plan['unreadable_parts']} unreadable parts (a run removes them)"
        if plan["unreadable_parts"]
        else ""
    )
    model = plan["model"]
    return "\n".join(
        [
            "dry run       nothing was run or written",
            f"inputs        {plan['inputs']} found under {plan['input']} ({plan['input_format']}, "
            f"{plan['labelled']} labelled, {plan['listing_tasks']} listing tasks)",
            f"done          {plan['done']} ({plan['rows_before']} rows under {plan['output'].rstrip('/')}/masks/{extra})",
            f"to do         {plan['todo']}"
            + (f" ({plan['retried']} of them error rows to retry)" if plan.get("retried") else ""),
            f"pools         {dcnn}; {crf} (cluster: {cluster['CPU']:g} CPU, {cluster['GPU']:g} GPU)",
            f"model         {model['variant']} sha256:{model['digest'][:12]}, {model['num_classes']} classes",
        ]
    )


def print_summary(manifest: dict) -> None:
    print(format_summary(manifest), flush=True)
    print_logs_line()


def print_logs_line() -> None:
    """Where Ray's warnings and internals went (pipeline/console/logs.py), as the summary's last line."""
    from pipeline.console.logs import logs_line

    line = logs_line()
    if line:
        print(line, flush=True)
