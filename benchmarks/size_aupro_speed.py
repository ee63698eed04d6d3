"""Time ``SizeAUPRO`` update + compute on full-resolution anomaly maps (default: 100 maps of 1024x1024).

Masks hold 0-6 elliptical defects per image with radii from 1 to 150 pixels (log-uniform), so region areas
span several orders of magnitude. Maps are uniform noise raised on each defect by a random amount that
grows with the defect's size, so small defects are found less well. Everything is seeded.

Usage::

    python benchmarks/size_aupro_speed.py [--num-images 100] [--size 1024] [--anomalib]

``--anomalib`` also times anomalib's ``AUPRO(fpr_limit=0.3)`` on the same data and prints the difference
to ``Q4`` at FPR 0.30 (slow and memory hungry at this scale).
"""

import argparse
import time
from types import SimpleNamespace

import numpy as np
import torch
from common import markdown_row, markdown_rule
from scipy import ndimage

from anomalib_transformer_student.metrics.size_aupro import FPR_LIMITS, SUBSETS, SizeAUPRO


def make_data(num_images: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    maps = rng.random((num_images, size, size), dtype=np.float32)
    masks = np.zeros((num_images, size, size), dtype=bool)
    yy, xx = np.ogrid[:size, :size]
    for i in range(num_images):
        for _ in range(rng.integers(0, 7)):
            ry, rx = np.exp(rng.uniform(np.log(1), np.log(150), size=2))
            cy, cx = rng.uniform(0, size, size=2)
            y0, y1 = max(int(cy - ry) - 1, 0), min(int(cy + ry) + 2, size)
            x0, x1 = max(int(cx - rx) - 1, 0), min(int(cx + rx) + 2, size)
            region = ((yy[y0:y1] - cy) / ry) ** 2 + ((xx[:, x0:x1] - cx) / rx) ** 2 <= 1
            masks[i, y0:y1, x0:x1] |= region
            # larger defects stand out more on average, as with real detectors
            maps[i, y0:y1, x0:x1][region] += rng.uniform(0.2, 1.0) * min(1.0, np.sqrt(ry * rx) / 30)
    return torch.from_numpy(maps), torch.from_numpy(masks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--anomalib", action="store_true", help="also time anomalib's AUPRO(fpr_limit=0.3)")
    args = parser.parse_args()

    maps, masks = make_data(args.num_images, args.size)
    batches = [
        SimpleNamespace(anomaly_map=maps[i : i + args.batch_size], gt_mask=masks[i : i + args.batch_size])
        for i in range(0, args.num_images, args.batch_size)
    ]
    metric = SizeAUPRO(fields=["anomaly_map", "gt_mask"])

    start = time.perf_counter()
    for batch in batches:
        metric.update(batch)
    update_s = time.perf_counter() - start
    start = time.perf_counter()
    robustness = metric.compute()
    compute_s = time.perf_counter() - start
    table = metric.table()

    num_regions = sum(int(ndimage.label(m, structure=np.ones((3, 3)))[1]) for m in masks.numpy())
    print("| images | resolution | regions | anomalous pixels | update (s) | compute (s) | total (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {args.num_images} | {args.size}x{args.size} | {num_regions} | {int(masks.sum())} "
        f"| {update_s:.2f} | {compute_s:.2f} | {update_s + compute_s:.2f} |"
    )
    print()
    print(markdown_row(["subset", *(f"FPR {limit:.2f}" for limit in FPR_LIMITS)]))
    print(markdown_rule("l" + "r" * len(FPR_LIMITS)))
    for name, row in zip(SUBSETS, table.tolist(), strict=True):
        print(markdown_row([name, *(f"{value:.4f}" for value in row)]))
    print(f"\nrobustness AUPRO(Q1)/AUPRO(Q4) at FPR 0.30: {float(robustness):.4f}")

    if args.anomalib:
        from anomalib.metrics.aupro import _AUPRO

        reference = _AUPRO(fpr_limit=0.3)
        start = time.perf_counter()
        for batch in batches:
            reference.update(batch.anomaly_map, batch.gt_mask.float())
        value = float(reference.compute())
        print(
            f"anomalib AUPRO(fpr_limit=0.3): {value:.6f} in {time.perf_counter() - start:.2f} s; "
            f"|difference to Q4 at 0.30| = {abs(value - float(table[3, 0])):.2e}"
        )


if __name__ == "__main__":
    main()
