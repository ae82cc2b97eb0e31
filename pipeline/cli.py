"""The ``deeplab`` command: one subcommand per user task; each failure is one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import logging
import sys

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
        help="which error rows of an earlier run to process again (default retryable: storage, credentials, "
        "memory; all: also undecodable images and other permanent errors; none: keep every row)",
    )
    p.add_argument("--no-crf", action="store_true", help="skip the dense CRF (masks are the DCNN argmax)")
    p.add_argument("--no-evaluate", action="store_true", help="don't compute metrics at the end")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL or AWS)")
    p.add_argument(
        "--config", help="job YAML (keys: input, output, model, read, write, dcnn, crf, pools, ...)"
    )
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, or start a local Ray)")


def cmd_segment(args: argparse.Namespace) -> int:
    from pipeline.config import load_job_config_from_args
    from pipeline.segment import run_segment
    from pipeline.summary import print_summary

    cfg, crf_raw = load_job_config_from_args(args)
    if args.no_crf:
        crf_raw = {"enabled": False}
    if args.no_evaluate:
        cfg = cfg.__class__(**{**cfg.__dict__, "evaluate": False})
    from pipeline.segment import StorageDown

    try:
        manifest = run_segment(cfg, crf_raw, address=args.address)
    except (
        StorageDown
    ) as e:  # EX_TEMPFAIL as below: storage went down; the same command resumes once it is back
        print(f"deeplab segment: error: {e}", file=sys.stderr)
        return 75
    print_summary(manifest)
    # EX_TEMPFAIL: every image has its row, but some failed for reasons a re-run may not meet (storage, memory).
    return 75 if manifest["counts"]["retryable"] else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    given = {k: v for k, v in (("count", args.count), ("size", args.size)) if v is not None}
    return run_demo(workdir=args.workdir, **given)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.evaluate import evaluate_output
    from pipeline.storage import StorageConfig

    storage = StorageConfig.from_env(endpoint_url=args.endpoint_url)
    metrics = evaluate_output(
        args.masks, storage_cfg=storage, labels_uri=args.labels, use_ray=not args.no_ray
    )
    crf = metrics.get("crf") or {}
    print(f"images {metrics['num_images']}  errors {metrics['num_errors']}")
    print(
        f"mean IoU  raw {100 * (metrics['raw']['mean_iou'] or 0):.2f}  crf {100 * (crf.get('mean_iou') or 0):.2f}"
    )
    print(f"report: {args.masks.rstrip('/')}/report/")
    return 0


def cmd_import_caffe(args: argparse.Namespace) -> int:
    from pipeline.storage import StorageConfig
    from pipeline.weights import import_caffe

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
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="local Ray + local S3 + generated scenes + shipped model, end to end")
    p.add_argument("--workdir", default=None, help="where outputs and logs go (default: a new temp dir)")
    p.add_argument("--count", type=int, default=None, help="number of generated scenes (default 48)")
    p.add_argument("--size", default=None, help="scene size WxH (default 160x120, the shipped model's)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("segment", help="segment a dataset into Parquet masks (+ metrics when labels exist)")
    _segment_args(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("evaluate", help="recompute metrics and the report from a segment output")
    p.add_argument("--masks", required=True, help="the segment job's OUTPUT prefix")
    p.add_argument("--labels", help="label prefix (default: each row's label_source)")
    p.add_argument("--endpoint-url")
    p.add_argument("--no-ray", action="store_true", help="single process")
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
    "make-scenes": ("pipeline.scenes", "make_scenes_main", "generate a VOC-layout scene dataset"),
    "shard": ("pipeline.shards", "shard_main", "pack a VOC-layout dataset into Parquet shards"),
    "train": ("jobs.train", "train_main", "train a DeepLab variant on Ray Train"),
    "submit": ("pipeline.submit", "submit_main", "submit a job to a Ray cluster (Job Submission API)"),
    "jobs": ("pipeline.submit", "jobs_main", "status | logs | stop a submitted job"),
    "tune-crf": ("pipeline.tune", "tune_main", "cross-validate the CRF parameters on Ray Tune"),
    "export": ("pipeline.export", "export_main", "write an output's masks as VOC PNGs or COCO RLE JSON"),
    "inspect": (
        "pipeline.weights",
        "inspect_main",
        "show a checkpoint's variant, classes, provenance, digest",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verbose = bool(argv) and argv[0] in ("-v", "--verbose")  # before the subcommand
    rest = argv[1:] if verbose else argv
    if rest and rest[0] in PASSTHROUGH:
        import importlib

        module, func, _ = PASSTHROUGH[rest[0]]
        call = getattr(importlib.import_module(module), func)
        args = argparse.Namespace(verbose=verbose, command=rest[0], func=lambda _: int(call(rest[1:]) or 0))
    else:
        args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:  # our own progress lines replace Ray Data's per-operator logging
        for name in ("ray.data", "botocore.credentials"):
            logging.getLogger(name).setLevel(logging.WARNING)
    from pipeline.config import ConfigError
    from pipeline.segment import JobError
    from pipeline.storage import StorageError, redact

    try:
        return args.func(args)
    except (ConfigError, JobError, StorageError) as e:
        if args.verbose:
            raise
        print(f"deeplab {args.command}: error: {redact(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deeplab {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
