"""Tiling accuracy: tiny spots on large images, inspected whole against tile by tile, at the same image_size.

Generates large images (1344 px by default) of a scikit-image texture at its native scale with tiny
spots (radius 1.5 to 3 px) as the only defects (``generate_large_image_dataset``), trains TransformerStudent
twice through anomalib's ``Engine`` at the same teacher ``image_size``: once inspecting each image whole
(resized to ``image_size``: a 3-px spot shrinks below one pixel) and once in ``tile_size = image_size``
tiles (native resolution, 9 tiles per 1344-px image at 448 px). Both are tested at full resolution with
``SizeEvaluator`` (image and pixel AUROC, AUPRO, and the defect-size ``SizeAUPRO`` table). Every defect is a
spot, so the size subsets Q1..Q4 split spots by area (Q1 the smallest quarter, Q4 all). The teacher-feature
cache is on (default), in a temporary folder. Not a test: nothing is asserted.

It also saves a picture (``--picture``) of one defective test image, its ground-truth spots and both
models' anomaly maps at full resolution.

The teacher has RANDOM weights (the machine this was written on is offline): the figures compare the two
geometries of one random feature extractor and say nothing about the pretrained method's accuracy.

Usage::

    python benchmarks/tiling_accuracy.py                                  # ViT-S/14, 448 px, ~5 min on 2 CPU cores
    python benchmarks/tiling_accuracy.py --teacher vit_base_patch14_reg4_dinov2.lvd142m --epochs 20
    python benchmarks/tiling_accuracy.py --data-size 2048 --image-size 518 --picture /tmp/tiling.png
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import markdown_row, markdown_rule

MODES = ("whole", "tiled")
TABLE_CELLS = (("Q1", 0.30), ("Q1", 0.05), ("Q4", 0.30), ("Q4", 0.05))


@dataclass
class RunResult:
    """What one model's fit and test gave."""

    mode: str
    metrics: dict[str, float]
    table: torch.Tensor  # (4, 4): Q1..Q4 x FPR limits
    seconds: float
    model: Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", default="gravel", help="texture: brick, grass or gravel")
    parser.add_argument("--data-size", type=int, default=1344, help="side of the generated images (px)")
    parser.add_argument("--image-size", type=int, default=448, help="teacher input side of both models (px)")
    parser.add_argument(
        "--tile-size", type=int, default=None, help="tile side of the tiled model (default: image size)"
    )
    parser.add_argument(
        "--teacher", default="vit_small_patch14_dinov2", help="timm ViT of the teacher (random weights)"
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=2, help="train batch size (images)")
    parser.add_argument("--n-train", type=int, default=10)
    parser.add_argument("--n-test-good", type=int, default=4)
    parser.add_argument("--n-test-defective", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--picture", type=Path, default=Path("docs/images/tiling_example.png"), help="PNG to write")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for data and runs (default: temporary)")
    return parser.parse_args(argv)


def train_and_test(mode: str, root: Path, workdir: Path, args: argparse.Namespace) -> RunResult:
    """Fit one model (``mode`` whole or tiled) and test it at full resolution with ``SizeEvaluator``."""
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from anomalib_transformer_student import TransformerStudent
    from anomalib_transformer_student.metrics import SizeEvaluator

    seed_everything(args.seed)
    start = time.perf_counter()
    model = TransformerStudent(
        teacher=args.teacher,
        pretrained=False,
        image_size=args.image_size,
        tiling={"tile_size": (args.tile_size or args.image_size) if mode == "tiled" else None},
        feature_cache={"dir": str(workdir / "feature_cache")},
        evaluator=SizeEvaluator(),
        visualizer=False,
    )
    datamodule = MVTecAD(
        root=root, category=args.category, train_batch_size=args.batch_size, eval_batch_size=2, num_workers=0
    )
    engine = Engine(
        max_epochs=args.epochs,
        default_root_dir=workdir / f"run_{mode}",
        logger=False,
        enable_progress_bar=False,
    )
    engine.fit(model, datamodule=datamodule)
    (results,) = engine.test(model, datamodule=datamodule, verbose=False)
    seconds = time.perf_counter() - start
    metrics = {name: float(value) for name, value in results.items()}
    return RunResult(mode, metrics, model.evaluator.size_aupro().last_table.cpu(), seconds, model)


def raw_map(model: Any, image: torch.Tensor) -> np.ndarray:
    """The model's raw anomaly map of one image ``(3, H, W)`` at its own size."""
    post_processor, model.post_processor = model.post_processor, None
    try:
        with torch.inference_mode():
            return model.eval()(image[None]).anomaly_map[0, 0].cpu().numpy()
    finally:
        model.post_processor = post_processor


def save_picture(path: Path, image_path: Path, mask_path: Path, results: list[RunResult]) -> int:
    """Save image, ground truth and each model's map side by side (downscaled); return the file's size."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from PIL import Image
    from scipy import ndimage

    image = np.asarray(Image.open(image_path).convert("RGB"), dtype=np.float32) / 255
    mask = np.asarray(Image.open(mask_path)) > 0
    maps = {result.mode: raw_map(result.model, torch.from_numpy(image).permute(2, 0, 1)) for result in results}
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    centres = ndimage.center_of_mass(mask, labels, range(1, count + 1))
    zoom = 48  # half side of the close-up around the first spot, in image pixels
    y0, x0 = (round(float(c)) for c in centres[0])
    top, left = max(0, y0 - zoom), max(0, x0 - zoom)
    panels = len(maps) + 2
    figure, axes = plt.subplots(1, panels, figsize=(3.0 * panels, 3.5), dpi=100)
    axes[0].imshow(image)
    axes[0].set_title(f"{image.shape[0]} x {image.shape[1]} test image\n(spots circled)", fontsize=9)
    close = image[top : top + 2 * zoom, left : left + 2 * zoom]
    axes[1].imshow(close, interpolation="nearest")
    axes[1].contour(mask[top : top + 2 * zoom, left : left + 2 * zoom], levels=[0.5], colors="red", linewidths=1)
    axes[1].set_title(f"close-up {2 * zoom} px: mask outline\n({int(mask.sum())} defect px in all)", fontsize=9)
    for axis, (mode, anomaly_map) in zip(axes[2:], maps.items(), strict=True):
        low, high = np.percentile(anomaly_map, [5, 99.9])  # the zero-padded blur darkens the border
        axis.imshow(anomaly_map, cmap="jet", vmin=low, vmax=high)
        axis.set_title(f"{mode} model: anomaly map\n(raw, own colour scale)", fontsize=9)
    for axis in (axes[0], *axes[2:]):
        for cy, cx in centres:
            axis.add_patch(plt.Circle((cx, cy), image.shape[0] / 40, fill=False, color="white", linewidth=1.2))
    for axis in axes:
        axis.set_axis_off()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    compact_png(path)
    return path.stat().st_size


def compact_png(path: Path, colours: int = 256) -> None:
    """Rewrite a PNG with a palette of ``colours`` (the picture stays well under 400 KB)."""
    from PIL import Image

    with Image.open(path) as picture:
        palette = picture.convert("RGB").quantize(colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    palette.save(path, optimize=True)


def print_report(results: list[RunResult], args: argparse.Namespace, tiles: int) -> None:
    """Print the Markdown tables: the summary row per model, then each full SizeAUPRO table."""
    from anomalib_transformer_student.metrics import FPR_LIMITS, SUBSETS

    tile = args.tile_size or args.image_size
    print(
        f"\nTeacher {args.teacher} with RANDOM weights (offline machine): these figures compare the two geometries "
        "and say nothing about the pretrained method's accuracy."
    )
    print(
        f"{args.category}, {args.data_size} x {args.data_size} px images, spots of radius 1.5-3 px only; "
        f"{args.n_train} training images, {args.n_test_good} good + {args.n_test_defective} defective test images; "
        f"image_size {args.image_size} for both; tiled: tile_size {tile} ({tiles} tiles per image); "
        f"{args.epochs} epochs, batch size {args.batch_size}, feature cache on; "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads.\n"
    )
    cells = [f"{subset}@{limit:.2f}" for subset, limit in TABLE_CELLS]
    print(markdown_row(["model", "image AUROC", "pixel AUROC", "AUPRO@0.30", *cells, "fit + test (s)"]))
    print(markdown_rule("l" + "r" * (4 + len(cells))))
    for result in results:
        values = [result.table[SUBSETS.index(s), FPR_LIMITS.index(limit)] for s, limit in TABLE_CELLS]
        row = [
            result.mode,
            *(
                f"{result.metrics.get(name, float('nan')):.3f}"
                for name in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")
            ),
            *(f"{float(value):.3f}" for value in values),
            f"{result.seconds:.0f}",
        ]
        print(markdown_row(row))
    print("\nFull SizeAUPRO tables (rows: defect-size subsets, columns: FPR limits):\n")
    for result in results:
        print(markdown_row([result.mode, *(f"FPR {limit:.2f}" for limit in FPR_LIMITS)]))
        print(markdown_rule("l" + "r" * len(FPR_LIMITS)))
        for index, subset in enumerate(SUBSETS):
            print(markdown_row([subset, *(f"{float(value):.3f}" for value in result.table[index])]))
        print()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from anomalib_transformer_student.apps.demo_data import LargeImageSpec, generate_large_image_dataset

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as temporary:
        workdir = args.workdir or Path(temporary)
        spec = LargeImageSpec(
            categories=(args.category,),
            image_size=args.data_size,
            n_train=args.n_train,
            n_test_good=args.n_test_good,
            n_test_per_defect=args.n_test_defective,
            seed=args.seed,
        )
        root = generate_large_image_dataset(workdir / "data", spec)
        results = [train_and_test(mode, root, workdir, args) for mode in MODES]
        tiles = results[1].model.tiling.count(args.data_size, args.data_size)
        print_report(results, args, tiles)
        folder = root / args.category
        size = save_picture(
            args.picture,
            folder / "test" / "spot" / "000.png",
            folder / "ground_truth" / "spot" / "000_mask.png",
            results,
        )
    print(f"Picture: {args.picture} ({size / 1024:.0f} KiB). Wall time in all: {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
