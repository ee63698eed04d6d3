r"""Peak memory of one evaluation step on thin images: pad-and-resize as matrix products against padding first.

Without tiling, every image is edge-padded to a square and resized to the teacher's input. Padding first (as
anomalib's ``SquarePad`` followed by a ``Resize`` does, as this package did before ``SquareResize``) builds the
whole square: a 20000 x 500 strip becomes 20000 x 20000 x 3 floats. ``SquareResize`` folds the padding into the
resize weights and never builds it. Each case runs in a fresh process (peak resident memory only grows); the
teacher is a random ViT-S/14 at 56 px, so the figures are those of the pre-processing and the map.

    python benchmarks/thin_image_memory.py                      # 6000 x 2 and 20000 x 500
    python benchmarks/thin_image_memory.py --sizes 50000x1000
"""

from __future__ import annotations

import argparse
import resource

import torch
from common import cpu_summary, in_fresh_process, markdown_row, markdown_rule


def peak_growth_mib(height: int, width: int, pad_first: bool) -> float:
    """MiB by which one evaluation step on a ``height`` x ``width`` image raises this process's peak memory."""
    from anomalib_transformer_student import TransformerStudent
    from anomalib_transformer_student.model.pre_processing import legacy_square_resize_transform

    model = TransformerStudent(teacher="vit_small_patch14_dinov2", pretrained=False, image_size=56, layers=(0, 1))
    model.eval()
    if pad_first:
        model.pre_processor.transform = legacy_square_resize_transform(56)
    image = torch.rand(1, 3, height, width)
    with torch.no_grad():
        model._predict(torch.rand(1, 3, 8, 8))  # allocations of the first call, outside the measurement
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        model._predict(image)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["6000x2", "20000x500"], help="HEIGHTxWIDTH of each image")
    args = parser.parse_args()
    print(f"CPU: {cpu_summary()}\n")
    print(markdown_row(["image (H x W)", "SquareResize (matrices)", "pad first, then resize"]))
    print(markdown_rule("lrr"))
    for size in args.sizes:
        height, width = (int(side) for side in size.lower().split("x"))
        grown = [in_fresh_process(peak_growth_mib, height, width, pad_first) for pad_first in (False, True)]
        print(markdown_row([f"{height} x {width}", *(f"{mib:.0f} MiB" for mib in grown)]))


if __name__ == "__main__":
    main()
