"""The script a user would write (DeepLab + pydensecrf on one node) vs ``deeplab segment``, side by side in one run.

**The script** (``peer_script``, written as a user would, the deeplab-pytorch way): decode every image with Pillow,
run the project's network (the shipped demo checkpoint ``pipeline/assets/demo-largefov.pt`` through
``pipeline.model.weights`` / ``pipeline.stages.dcnn.predict_probs``) with torch on all cores, keep the probabilities in memory,
then pydensecrf per image (the paper's DeepLab-LargeFOV settings, all labels, 10 iterations, the stage's
normalisation) in a ``multiprocessing`` pool of one process per core, and write PNG masks.

**The job**: ``pipeline.segment.run_segment`` with the default configuration (what ``deeplab segment --input DIR
--output DIR --model CKPT`` runs) on a local Ray started before the clock, as a cluster would be.

Data (``--data``): ``scenes`` (generated 500x375 VOC scenes of the model's 6 classes) or ``photos`` (``--photos
DIR``: natural photos fitted, cropped, flipped and composited to N different 500x375 JPEGs). Prints images/s end to
end and streaming (the script: decode to last mask, without model load and pool start; the job: its manifest's
streaming rate), CPU seconds per image (every process each side starts), the script's time per phase, and the
share of mask pixels equal between the two.

    python bench/peer.py [--data scenes|photos] [--photos DIR] [--images 24] [--order peer-first|job-first]
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = ROOT / "pipeline" / "assets" / "demo-largefov.pt"
SIZE = (500, 375)  # (W, H)
CORES = os.cpu_count() or 1


def _bench_pipeline():
    """bench/pipeline.py (its CPU meter and local Ray start), loaded by path: its name clashes with the package."""
    spec = importlib.util.spec_from_file_location("bench_pipeline", ROOT / "bench" / "pipeline.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


# --- data --------------------------------------------------------------------------------------------------------


def write_photo_set(folder: Path, out: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` different 500x375 JPEGs from the photos in ``folder``: random crops (60-100 % of the side), mirror
    images, and every third one a two-photo composite cut at a random column."""
    from PIL import Image, ImageOps

    sources = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not sources:
        raise SystemExit(f"no .png/.jpg photos in {folder}")
    photos = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in sources]
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)

    def view(im: Image.Image) -> np.ndarray:
        scale = rng.uniform(0.6, 1.0)
        w, h = int(im.width * scale), int(im.height * scale)
        x0, y0 = int(rng.integers(0, im.width - w + 1)), int(rng.integers(0, im.height - h + 1))
        fitted = ImageOps.fit(im.crop((x0, y0, x0 + w, y0 + h)), SIZE, Image.Resampling.LANCZOS)
        return np.array(ImageOps.mirror(fitted) if rng.uniform() < 0.5 else fitted)

    paths = []
    for i in range(count):
        image = view(photos[i % len(photos)])
        if i % 3 == 2:
            other = view(photos[int(rng.integers(len(photos)))])
            cut = int(rng.integers(150, 350))
            image[:, cut:] = other[:, cut:]
        path = out / f"photo_{i:04d}.jpg"
        Image.fromarray(image).save(path, quality=90)
        paths.append(path)
    return paths


def write_scene_set(out: Path, count: int, num_classes: int, seed: int = 11) -> list[Path]:
    from pipeline.demo.scenes import write_voc_dataset

    write_voc_dataset(str(out), count=count, size=SIZE, num_classes=num_classes, seed=seed)
    return sorted((out / "JPEGImages").glob("*.jpg"))


# --- the script a user would write ---------------------------------------------------------------------------------


def _crf_one(item: tuple[str, np.ndarray, np.ndarray, str]) -> float:
    """pydensecrf, paper LargeFOV settings (w1 4, s_a 121, s_b 5, w2 3, s_g 3), 10 iterations; writes the PNG."""
    import pydensecrf.densecrf as dcrf
    from PIL import Image
    from pydensecrf.utils import unary_from_softmax

    name, image, probs, out_dir = item
    t0 = time.process_time()
    num_labels, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, num_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=3, compat=3, normalization=dcrf.NORMALIZE_AFTER)
    crf.addPairwiseBilateral(sxy=121, srgb=5, rgbim=image, compat=4, normalization=dcrf.NORMALIZE_AFTER)
    q = np.array(crf.inference(10)).reshape(num_labels, height, width)
    Image.fromarray(q.argmax(axis=0).astype(np.uint8)).save(Path(out_dir) / f"{name}.png")
    return time.process_time() - t0


def peer_script(paths: list[Path], out_dir: Path) -> dict:
    """Decode, DCNN over all images (torch, all cores), probabilities in memory, CRF pool, PNGs. Returns timings."""
    import torch
    from PIL import Image

    from pipeline.model.inference import predict_probs
    from pipeline.model.weights import load_checkpoint

    out_dir.mkdir(parents=True, exist_ok=True)
    t_start, c_start = time.monotonic(), time.process_time()
    torch.set_num_threads(CORES)
    model, _ = load_checkpoint(str(MODEL))
    pool = mp.get_context("fork").Pool(
        CORES
    )  # started before the clock of the streaming rate, like Ray's actors
    t0 = time.monotonic()
    images = [np.array(Image.open(p).convert("RGB")) for p in paths]
    t1 = time.monotonic()
    probs = predict_probs(model, images, batch_size=1, min_input_size=1)  # float32 (C, H, W) each
    t2 = time.monotonic()
    items = [(p.stem, im, pr, str(out_dir)) for p, im, pr in zip(paths, images, probs, strict=True)]
    crf_cpu = sum(pool.imap(_crf_one, items, chunksize=1))
    pool.close()
    pool.join()
    t3 = time.monotonic()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    n = len(paths)
    cpu = time.process_time() - c_start + children.ru_utime + children.ru_stime
    return {
        "images_per_s": n / (t3 - t_start),
        "stream_images_per_s": n / (t3 - t0),
        "cpu_s_per_image": cpu / n,
        "phase_s_per_image": {
            "decode": (t1 - t0) / n,
            "dcnn (wall, all cores)": (t2 - t1) / n,
            "crf (wall, pool)": (t3 - t2) / n,
            "crf core-s": crf_cpu / n,
        },
        "wall_s": t3 - t_start,
    }


# --- the job -----------------------------------------------------------------------------------------------------


def run_job(input_dir: Path, output_dir: Path, bp) -> dict:
    from pipeline.config import load_job_config
    from pipeline.segment import run_segment

    cfg, crf_raw = load_job_config(
        input=str(input_dir), output=str(output_dir), model=str(MODEL), evaluate=False
    )
    bp.start_local_ray()  # a running cluster is not part of the job's time
    meter = bp.CPUMeter()
    meter.start()
    t0 = time.monotonic()
    manifest = run_segment(cfg, crf_raw)
    wall = time.monotonic() - t0
    cpu = meter.stop()
    run = manifest["run"]
    n = run["processed"]
    return {
        "images_per_s": n / wall,
        "stream_images_per_s": run["images_per_s"],
        "cpu_s_per_image": cpu / n,
        "stage_s_per_image": {k: v / n for k, v in run["stage_s"].items()},
        "status": manifest["counts"]["status"],
        "wall_s": wall,
    }


def job_masks(output_dir: Path) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    from pipeline.export.masks import decode_mask
    from pipeline.schema import SOURCE

    masks = {}
    for part in sorted((output_dir / "masks").glob("*.parquet")):
        for row in pq.ParquetFile(part).read(columns=[SOURCE, "mask_png"]).to_pylist():
            if row["mask_png"] is not None:
                masks[Path(row[SOURCE]).stem] = decode_mask(row["mask_png"])
    return masks


def agreement(peer_dir: Path, masks: dict[str, np.ndarray]) -> tuple[float, int, int]:
    from PIL import Image

    same = total = missing = 0
    for png in sorted(peer_dir.glob("*.png")):
        if png.stem not in masks:
            missing += 1
            continue
        mine = np.array(Image.open(png))
        same += int((mine == masks[png.stem]).sum())
        total += mine.size
    return 100.0 * same / max(total, 1), total // (SIZE[0] * SIZE[1]), missing


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=("scenes", "photos"), default="scenes")
    p.add_argument("--photos", type=Path, default=None, help="folder of photos (for --data photos)")
    p.add_argument("--images", type=int, default=24, help="number of images (default 24; the bar is at ~200)")
    p.add_argument("--order", choices=("peer-first", "job-first"), default="peer-first")
    p.add_argument(
        "--keep", type=Path, default=None, help="work in this folder and keep it (default: a temp dir)"
    )
    args = p.parse_args(argv)
    if args.data == "photos" and args.photos is None:
        p.error("--data photos needs --photos DIR")

    work = args.keep or Path(tempfile.mkdtemp(prefix="peer-"))
    try:
        if args.data == "photos":
            paths = write_photo_set(args.photos, work / "input", args.images)
            job_input = work / "input"
        else:
            paths = write_scene_set(work / "input", args.images, num_classes=6)
            job_input = work / "input"
        bp = _bench_pipeline()
        print(
            f"{len(paths)} {args.data} at {SIZE[0]}x{SIZE[1]}, {CORES} cores, model {MODEL.name}", flush=True
        )
        results = {}
        order = ["peer", "job"] if args.order == "peer-first" else ["job", "peer"]
        for side in order:
            t0 = time.monotonic()
            if side == "peer":
                results[side] = peer_script(paths, work / "peer-masks")
            else:
                results[side] = run_job(job_input, work / "job-output", bp)
            print(f"  {side}: {time.monotonic() - t0:.1f} s, {results[side]}", flush=True)
        same, compared, missing = agreement(work / "peer-masks", job_masks(work / "job-output"))
        peer, job = results["peer"], results["job"]
        print("\n| side | images/s end to end | images/s streaming | CPU s per image |")
        print("|---|---|---|---|")
        print(
            f"| script (pool of {CORES}) | {peer['images_per_s']:.2f} | {peer['stream_images_per_s']:.2f} "
            f"| {peer['cpu_s_per_image']:.3f} |"
        )
        print(
            f"| `deeplab segment` | {job['images_per_s']:.2f} ({job['images_per_s'] / peer['images_per_s']:.2f}x) "
            f"| {job['stream_images_per_s']:.2f} ({job['stream_images_per_s'] / peer['stream_images_per_s']:.2f}x) "
            f"| {job['cpu_s_per_image']:.3f} |"
        )
        print(
            f"masks equal: {same:.4f} % of the pixels of {compared} images ({missing} missing)   bar >= 99.9 %"
        )
        print(f"script per image: { {k: round(v, 4) for k, v in peer['phase_s_per_image'].items()} }")
        print(
            f"job stage seconds per image: { {k: round(v, 4) for k, v in job['stage_s_per_image'].items()} }"
        )
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
