"""The ``deeplab`` command: one subcommand per user task; each failure is one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

__all__ = ["main"]

log = logging.getLogger("deeplab")


def _segment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input",
        help="VOC root, image prefix, shards prefix or manifest (.parquet/.csv; local path or s3://)",
    )
    p.add_argument(
        "--input-format",
        choices=["auto", "voc", "images", "shards", "manifest"],
        help="input layout (default auto; a prefix of manifest files needs 'manifest')",
    )
    p.add_argument("--labels", help="prefix of label PNGs named <image_id>.png (for an image prefix input)")
    p.add_argument("--output", help="output prefix: masks/, _manifest.json and report/ go under it")
    p.add_argument("--model", help="checkpoint (.pt) path or s3:// URI")
    p.add_argument("--variant", help="expected model variant (checked against the checkpoint)")
    p.add_argument("--split", help="VOC split list to read (ImageSets/Segmentation/<split>.txt)")
    p.add_argument(
        "--retry-errors",
        choices=["retryable", "all", "none"],
        help="which error rows of an earlier run to process again (default retryable: timeouts, throttling, "
        "5xx, expired credentials, up to write.max_retries attempts; all: also permanent errors; none: keep "
        "every row)",
    )
    p.add_argument(
        "--allow-identity-change",
        action="store_true",
        help="add this run's rows to an output made from another input, model or CRF settings (refused otherwise)",
    )
    p.add_argument(
        "--break-lease",
        action="store_true",
        help="take over the output's lease from a run you know is gone (see docs/operations.md)",
    )
    p.add_argument("--no-crf", action="store_true", help="skip the dense CRF (masks are the DCNN argmax)")
    p.add_argument("--no-evaluate", action="store_true", help="don't compute metrics at the end")
    p.add_argument(
        "--endpoint-url",
        help="S3-compatible endpoint (default: storage.endpoint_url, AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, AWS)",
    )
    p.add_argument(
        "--region",
        help="S3 signing region (default: storage.region, AWS_REGION, AWS_DEFAULT_REGION; on AWS the bucket's own)",
    )
    p.add_argument(
        "--config",
        help="job YAML, a local path or s3:// URI (keys: input, output, model, read, write, dcnn, crf, pools, ...)",
    )
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, or start a local Ray)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list the inputs and what is done, plan the pools, then stop: nothing runs, nothing is written",
    )


def cmd_segment(args: argparse.Namespace) -> int:
    from pipeline.config import load_job_config_from_args
    from pipeline.console.logs import user_stream
    from pipeline.console.summary import format_dry_run, print_logs_line, print_summary
    from pipeline.segment import dry_run_segment, run_segment

    cfg, crf_raw = load_job_config_from_args(args)
    if args.no_crf:
        crf_raw = {"enabled": False}
    if args.no_evaluate:
        cfg = cfg.__class__(**{**cfg.__dict__, "evaluate": False})
    if args.allow_identity_change:
        cfg = dataclasses.replace(cfg, write=dataclasses.replace(cfg.write, allow_identity_change=True))
    if args.dry_run:
        print(format_dry_run(dry_run_segment(cfg, crf_raw, address=args.address)), flush=True)
        print_logs_line()
        return 0
    from pipeline.segment import StorageDown

    try:
        manifest = run_segment(cfg, crf_raw, address=args.address, break_lease=args.break_lease)
    except (
        StorageDown
    ) as e:  # EX_TEMPFAIL as below: storage went down; the same command resumes once it is back
        print(f"deeplab segment: error: {e}", file=user_stream())  # not into the log file
        return 75
    print_summary(manifest)
    # EX_TEMPFAIL: every image has its row, but some failed for reasons a re-run may not meet (storage, memory).
    return 75 if manifest["counts"]["retryable"] else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo.run import run_demo

    given = {k: v for k, v in (("count", args.count), ("size", args.size)) if v is not None}
    return run_demo(workdir=args.workdir, **given)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.console.summary import print_logs_line
    from pipeline.metrics.evaluate import evaluate_output
    from pipeline.storage import StorageConfig

    storage = StorageConfig.from_env(endpoint_url=args.endpoint_url)
    if (
        not args.no_ray
    ):  # our init (no worker logs on the driver, progress bars off), not Ray Data's default one
        from pipeline.cluster.ray_init import init_ray

        init_ray(args.address)
    metrics = evaluate_output(
        args.masks, storage_cfg=storage, labels_uri=args.labels, use_ray=not args.no_ray
    )
    crf = metrics.get("crf") or {}
    print(f"images {metrics['num_images']}  errors {metrics['num_errors']}")
    print(
        f"mean IoU  raw {100 * (metrics['raw']['mean_iou'] or 0):.2f}  crf {100 * (crf.get('mean_iou') or 0):.2f}"
    )
    print(f"report: {args.masks.rstrip('/')}/report/")
    print_logs_line()
    return 0


def cmd_import_caffe(args: argparse.Namespace) -> int:
    from pipeline.model.weights import import_caffe
    from pipeline.storage import StorageConfig

    meta = import_caffe(
        args.caffemodel,
        variant=args.variant,
        output_uri=args.output,
        num_classes=args.num_classes,
        storage_cfg=StorageConfig.from_env(endpoint_url=args.endpoint_url),
    )
    print(
        f"wrote {args.output}: {meta['variant']}, {meta['num_classes']} classes, sha256:{meta['digest'][:12]}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deeplab", description=__doc__)
    _output_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="local Ray + local S3 + generated scenes + shipped model, end to end")
    p.add_argument("--workdir", default=None, help="where outputs and logs go (default: a new temp dir)")
    p.add_argument("--count", type=int, default=None, help="number of generated scenes (default 48)")
    p.add_argument("--size", default=None, help="scene size WxH (default 160x120, the shipped model's)")
    _output_flags(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("segment", help="segment a dataset into Parquet masks (+ metrics when labels exist)")
    _segment_args(p)
    _output_flags(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("evaluate", help="recompute metrics and the report from a segment output")
    p.add_argument("--masks", required=True, help="the segment job's OUTPUT prefix")
    p.add_argument("--labels", help="label prefix (default: each row's label_source)")
    p.add_argument("--endpoint-url")
    p.add_argument("--no-ray", action="store_true", help="single process")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, or start a local Ray)")
    _output_flags(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "import-caffe", help="convert a DeepLab v1 .caffemodel into a checkpoint (no Caffe needed)"
    )
    p.add_argument("caffemodel", help="path to the .caffemodel (v1 `layers` format)")
    p.add_argument("--variant", required=True, help="deeplab | deeplab-msc | deeplab-largefov | ...")
    p.add_argument("--output", required=True, help="checkpoint path or s3:// URI")
    p.add_argument("--num-classes", type=int, default=21)
    p.add_argument("--endpoint-url")
    p.set_defaults(func=cmd_import_caffe)

    for name, (_, _, text) in PASSTHROUGH.items():
        sub.add_parser(name, help=f"{text} (see deeplab {name} --help)")
    return parser


# Subcommands with their own argparse: `deeplab NAME ARGS...` calls module.func(ARGS).
PASSTHROUGH = {
    "make-scenes": ("pipeline.demo.scenes", "make_scenes_main", "generate a VOC-layout scene dataset"),
    "shard": ("pipeline.stages.shards", "shard_main", "pack a VOC-layout dataset into Parquet shards"),
    "train": ("jobs.train", "train_main", "train a DeepLab variant on Ray Train"),
    "submit": (
        "pipeline.cluster.submit",
        "submit_main",
        "submit a job to a Ray cluster (Job Submission API)",
    ),
    "jobs": ("pipeline.cluster.submit", "jobs_main", "status | logs | stop a submitted job"),
    "tune-crf": ("pipeline.tune.run", "tune_main", "cross-validate the CRF parameters on Ray Tune"),
    "export": (
        "pipeline.export.masks",
        "export_main",
        "write an output's masks as VOC PNGs or COCO RLE JSON",
    ),
    "inspect": (
        "pipeline.model.weights",
        "inspect_main",
        "show a checkpoint's variant, classes, provenance, digest",
    ),
}


# Commands whose output is routed (pipeline/console/logs.py): only our lines on the terminal, Ray's in a log file.
ROUTED = ("segment", "evaluate", "demo", "tune-crf", "export")
_FLAG_VERBOSE, _FLAG_QUIET, _FLAG_LOG = ("-v", "--verbose"), ("-q", "--quiet"), "--log-file"


def _output_flags(p: argparse.ArgumentParser) -> None:
    """For --help only: main() takes these out of argv before parsing (they go before or after the command)."""
    g = p.add_argument_group("output")
    g.add_argument(
        *_FLAG_VERBOSE, action="store_true", help="Ray's logs and warnings too, debug level, tracebacks"
    )
    g.add_argument(*_FLAG_QUIET, action="store_true", help="only the summary and errors (no progress)")
    g.add_argument(
        _FLAG_LOG,
        metavar="PATH",
        help="where Ray's output goes (default: <tmp>/deeplab-<uid>/logs/..., demo: WORKDIR)",
    )


def split_output_flags(argv: list[str]) -> tuple[list[str], dict]:
    """(argv without the output flags, {"verbose", "quiet", "log_file"}). Flags before the command count for every
    command; after it only for the routed ones (others may pass them on, e.g. ``submit``'s job arguments)."""
    opts: dict = {"verbose": False, "quiet": False, "log_file": None}
    rest: list[str] = []
    i, command = 0, None
    while i < len(argv):
        tok = argv[i]
        if tok == "--" or (command is not None and command not in ROUTED):
            rest.extend(argv[i:])
            break
        if tok in _FLAG_VERBOSE:
            opts["verbose"] = True
        elif tok in _FLAG_QUIET:
            opts["quiet"] = True
        elif tok == _FLAG_LOG and i + 1 < len(argv):
            opts["log_file"], i = argv[i + 1], i + 1
        elif tok.startswith(_FLAG_LOG + "="):
            opts["log_file"] = tok.split("=", 1)[1]
        else:
            if command is None and not tok.startswith("-"):
                command = tok
            rest.append(tok)
        i += 1
    return rest, opts


def main(argv: list[str] | None = None) -> int:
    from pipeline.console import logs

    argv = sys.argv[1:] if argv is None else argv
    rest, opts = split_output_flags(argv)
    verbose = opts["verbose"]
    if verbose and opts["quiet"]:
        print("deeplab: error: --verbose and --quiet exclude each other", file=sys.stderr)
        return 2
    if rest and rest[0] in PASSTHROUGH:
        import importlib

        module, func, _ = PASSTHROUGH[rest[0]]
        call = getattr(importlib.import_module(module), func)
        args = argparse.Namespace(verbose=verbose, command=rest[0], func=lambda _: int(call(rest[1:]) or 0))
    else:
        args = build_parser().parse_args(rest)
        args.verbose = verbose
    from pipeline.config import ConfigError
    from pipeline.segment import JobError
    from pipeline.storage import StorageError, redact

    try:
        if args.command in ROUTED:
            mode = logs.VERBOSE if verbose else logs.QUIET if opts["quiet"] else logs.NORMAL
            log_file = opts["log_file"]
            if args.command == "demo" and not verbose:  # the demo keeps its log beside its outputs
                import tempfile

                args.workdir = args.workdir or tempfile.mkdtemp(prefix="deeplab-demo-")
                log_file = log_file or str(Path(args.workdir) / "deeplab.log")
            with logs.command_output(mode, log_path=log_file, command=args.command):
                return args.func(args)
        logging.basicConfig(
            level=logging.DEBUG if verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
        if not verbose:
            for name in ("ray.data", "botocore.credentials"):
                logging.getLogger(name).setLevel(logging.WARNING)
        return args.func(args)
    except (ConfigError, JobError, StorageError) as e:
        if args.verbose:
            raise
        print(f"deeplab {args.command}: error: {redact(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deeplab {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - anything else is one line too; --verbose shows the traceback
        if args.verbose:
            raise
        print(
            f"deeplab {args.command}: error: {one_line(e)} (--verbose shows the traceback)", file=sys.stderr
        )
        return 2 if isinstance(_root_cause(e), OSError | ValueError | LookupError) else 1


def _root_cause(exc: BaseException) -> BaseException:
    """The exception a Ray task raised (RayTaskError keeps it as ``cause``), else ``exc``."""
    seen: set[int] = set()
    while getattr(exc, "cause", None) is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.cause
    return exc


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, secrets removed: what the user sees of an unexpected error."""
    from pipeline.storage import redact

    cause = _root_cause(exc)
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if lines and lines[0].startswith(
        "ray::"
    ):  # Ray's text of a task error: the last line names the exception
        text = lines[-1]
        return redact(text)[:500]
    return redact(f"{type(cause).__name__}: {text}" if text else type(cause).__name__)[:500]


if __name__ == "__main__":
    sys.exit(main())
