"""Build-time check of the image's torch (infra/Dockerfile): the wheel matches the CUDA the image was built for.

    python infra/check_torch.py TORCH_INDEX      # "cpu", or a PyTorch CUDA index such as "cu128"

A CUDA image whose pip resolved a CPU wheel (or another CUDA's) would build fine and fail only on the first GPU
node, as "torch sees no CUDA device". This fails the build instead. Exit 0 when torch.version.cuda is what the
index promises (None for "cpu", "12.8" for "cu128"), 1 otherwise; the image's own CUDA_VERSION (set by NVIDIA's
CUDA base images) must have the same major version as torch's CUDA, which needs a driver at least that new.
"""

from __future__ import annotations

import os
import re
import sys


def expected_cuda(torch_index: str) -> str | None:
    """ "cpu" -> None, "cu128" -> "12.8", "cu118" -> "11.8"; anything else is a usage error."""
    if torch_index == "cpu":
        return None
    m = re.fullmatch(r"cu(\d+)(\d)", torch_index)
    if not m:
        raise ValueError(f"TORCH_INDEX must be 'cpu' or 'cuXYZ' (e.g. cu128), got {torch_index!r}")
    return f"{m.group(1)}.{m.group(2)}"


def check(torch_index: str, torch_cuda: str | None, image_cuda: str | None) -> list[str]:
    """Problems found (empty = fine)."""
    want = expected_cuda(torch_index)
    problems = []
    if torch_cuda != want:
        problems.append(
            f"TORCH_INDEX={torch_index} promises torch built for CUDA {want}, but torch.version.cuda is {torch_cuda}"
        )
    if want is not None and image_cuda and image_cuda.split(".")[0] != want.split(".")[0]:
        problems.append(
            f"the base image has CUDA {image_cuda}, torch is built for CUDA {want}: use a matching base"
        )
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    import torch

    try:
        problems = check(argv[0], torch.version.cuda, os.environ.get("CUDA_VERSION"))
    except ValueError as e:
        print(f"check_torch: {e}", file=sys.stderr)
        return 2
    print(
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, image CUDA {os.environ.get('CUDA_VERSION')}"
    )
    for p in problems:
        print(f"check_torch: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
