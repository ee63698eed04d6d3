r"""Thresholds from good images on MVTec AD 2-like data: anomalib's fallback against quantiles of good images.

Generates a tree in MVTec AD 2's layout (``train/good``, ``validation/good``, ``test_public/{good,bad}``,
``test_public/ground_truth/bad/<name>_mask.png``, one image in each private test set) of large, elongated
images (sheet_metal's 4:1 aspect, 1056 x 264 px by default) of scikit-image's gravel texture at its native
scale, mirror-tiled, whose only defects are spots of radius 1.5 to 3 px with exact masks; the validation set
holds good images only, as MVTec AD 2's does. It fits TransformerStudent in ``tile_size = image_size`` tiles
(native resolution) through anomalib's ``Engine`` and ``MVTecAD2`` datamodule, and records the raw
(not post-processed) scores and maps of the last validation and of the test.

Each row then sets thresholds from the same validation outputs through a post-processor's own validation hooks,
and thresholds the test outputs with its forward (the exported graph's post-processing):

- anomalib's ``PostProcessor``: F1-adaptive, which on good-only validation falls back to the highest
  validation score and the highest validation pixel;
- ``QuantilePostProcessor`` at each pair of ``--image-quantiles`` and ``--pixel-quantiles``;
- for reference, anomalib's F1-adaptive thresholds fitted on the test set itself (not available in practice).

Image F1 is over the test images; SegF1 is the pixel F1 over all test pixels of the thresholded maps. The
"good flagged" columns give the share of good test images and of good test pixels above the thresholds (the
false-positive rates the quantiles aim at). Not a test: nothing is asserted.

The teacher has RANDOM weights (the machine this was written on is offline): the figures compare thresholds
of one random feature extractor's maps and say nothing about the pretrained method's accuracy.

``--generate-only DIR`` writes the tree and stops (e.g. at sheet_metal's real 4224 x 1056 px, for the
measurement with ``anomalib train --config configs/mvtecad2.yaml`` in docs/how-to/mvtecad2.md).

Usage::

    python benchmarks/mvtecad2_thresholds.py    # ViT-S/14, 224-px tiles: 7.5 CPU-minutes (17 min on 2 busy cores)
    python benchmarks/mvtecad2_thresholds.py --width 2112 --height 528 --image-size 448
    python benchmarks/mvtecad2_thresholds.py --generate-only /tmp/mvtec_ad_2 --width 4224 --height 1056 \
        --n-train 2 --n-val 2 --n-test-good 1 --n-test-bad 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import markdown_row, markdown_rule, peak_rss_mib

CATEGORY = "sheet_metal"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1056, help="image width (px)")
    parser.add_argument("--height", type=int, default=264, help="image height (px)")
    parser.add_argument("--image-size", type=int, default=224, help="teacher input side = tile side (px)")
    parser.add_argument("--teacher", default="vit_small_patch14_dinov2", help="timm ViT of the teacher (random)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n-train", type=int, default=16)
    parser.add_argument("--n-val", type=int, default=40, help="good validation images")
    parser.add_argument("--n-test-good", type=int, default=20)
    parser.add_argument("--n-test-bad", type=int, default=20)
    parser.add_argument("--image-quantiles", type=float, nargs="+", default=[0.9, 0.95, 0.99])
    parser.add_argument("--pixel-quantiles", type=float, nargs="+", default=[0.999, 0.9999, 0.99999])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="folder for data and runs (default: temporary)")
    parser.add_argument("--generate-only", type=Path, default=None, metavar="DIR", help="write the tree and stop")
    return parser.parse_args(argv)


def _mosaic(texture: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """``height`` x ``width`` of the texture at its native scale, mirror-tiled, from a random offset."""
    rows, columns = texture.shape[:2]
    top, left = int(rng.integers(0, 2 * rows)), int(rng.integers(0, 2 * columns))
    padding = ((0, max(0, top + height - rows)), (0, max(0, left + width - columns)), (0, 0))
    tiled = np.pad(texture, padding, mode="symmetric")
    return np.ascontiguousarray(tiled[top : top + height, left : left + width])


def _spots(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A mask of 1 to 3 disks of radius 1.5 to 3 px, apart from each other, anywhere but the outer 5 px."""
    from skimage import draw

    mask = np.zeros((height, width), dtype=bool)
    centres: list[np.ndarray] = []
    for _ in range(int(rng.integers(1, 4))):
        centre = np.array([rng.integers(5, height - 5), rng.integers(5, width - 5)])
        if all(np.abs(centre - other).max() > 10 for other in centres):
            mask[draw.disk(tuple(centre), rng.uniform(1.5, 3.0), shape=mask.shape)] = True
            centres.append(centre)
    return mask


def generate_mvtecad2_tree(root: Path, args: argparse.Namespace) -> Path:
    """Write one category (``sheet_metal``) in MVTec AD 2's layout under ``root``; return ``root``."""
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(args.seed)
    texture = np.repeat(data.gravel()[..., None], 3, axis=2)
    folder = root / CATEGORY
    counts = {"train/good": args.n_train, "validation/good": args.n_val, "test_public/good": args.n_test_good,
              "test_public/bad": args.n_test_bad, "test_private": 1, "test_private_mixed": 1}  # fmt: skip
    for split, count in counts.items():
        (folder / split).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image = _mosaic(texture, args.height, args.width, rng)
            name = f"{index:03d}_regular.png"
            if split == "test_public/bad":
                mask = _spots(args.height, args.width, rng)
                colour = rng.integers(0, 256, size=3)
                if np.abs(colour - image[mask].mean(axis=0)).max() < 90:
                    colour = 255 - colour
                image[mask] = (0.15 * image[mask] + 0.85 * colour).astype(np.uint8)
                masks = folder / "test_public" / "ground_truth" / "bad"
                masks.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8) * 255).save(masks / f"{index:03d}_regular_mask.png")
            Image.fromarray(image).save(folder / split / name)
    return root


@dataclass
class Recorded:
    """Raw outputs of the last validation and of the test (CPU tensors), and the stages' wall times."""

    validation: list[Any] = field(default_factory=list)
    test: list[Any] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def recorder(recorded: Recorded) -> Any:
    """A callback that keeps raw outputs; it runs before the model's post-processor (trainer callbacks come first)."""
    from types import SimpleNamespace

    from lightning.pytorch import Callback

    def keep(outputs: Any) -> SimpleNamespace:
        fields = ("pred_score", "anomaly_map", "gt_label", "gt_mask")
        values = {name: getattr(outputs, name, None) for name in fields}
        return SimpleNamespace(**{k: None if v is None else v.detach().cpu().clone() for k, v in values.items()})

    class Recorder(Callback):
        def on_validation_epoch_start(self, *args: Any) -> None:
            recorded.validation.clear()

        def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, *args: Any) -> None:
            recorded.validation.append(keep(outputs))

        def on_test_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, *args: Any) -> None:
            recorded.test.append(keep(outputs))

        def on_train_epoch_start(self, *args: Any) -> None:
            self.started = time.perf_counter()

        def on_train_epoch_end(self, trainer: Any, *args: Any) -> None:
            key = "first epoch" if trainer.current_epoch == 0 else "later epochs"
            recorded.seconds[key] = recorded.seconds.get(key, 0.0) + time.perf_counter() - self.started

        def on_test_start(self, *args: Any) -> None:
            self.started = time.perf_counter()

        def on_test_end(self, *args: Any) -> None:
            recorded.seconds["test"] = time.perf_counter() - self.started

    return Recorder()


def fit_and_test(root: Path, workdir: Path, args: argparse.Namespace) -> tuple[Recorded, Any]:
    """Fit on the tree (validation every epoch), test on test_public; return the raw outputs and the model."""
    from anomalib.data import MVTecAD2
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from anomalib_transformer_student import TransformerStudent

    seed_everything(args.seed)
    recorded = Recorded()
    model = TransformerStudent(
        teacher=args.teacher,
        pretrained=False,
        image_size=args.image_size,
        tiling={"tile_size": args.image_size},
        lr=args.lr,
        feature_cache={"dir": str(workdir / "feature_cache")},
        evaluator=False,
        visualizer=False,
    )
    datamodule = MVTecAD2(root=root, category=CATEGORY, train_batch_size=2, eval_batch_size=2, num_workers=0)
    engine = Engine(
        max_epochs=args.epochs,
        default_root_dir=workdir / "run",
        logger=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        callbacks=[recorder(recorded)],
    )
    engine.fit(model, datamodule=datamodule)
    engine.test(model, datamodule=datamodule, verbose=False)
    return recorded, model


@dataclass
class Row:
    """One way of setting the thresholds, and what it gave on the test set."""

    name: str
    image_threshold: float
    pixel_threshold: float
    image_f1: float
    seg_f1: float
    seg_precision: float
    seg_recall: float
    good_images_flagged: float
    good_pixels_flagged: float


def _f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return f1, precision, recall


def evaluate(name: str, post_processor: Any, thresholds_from: list[Any], test: list[Any]) -> Row:
    """Set ``post_processor``'s thresholds from ``thresholds_from`` via its validation hooks; threshold ``test``."""
    from anomalib.data import InferenceBatch

    if hasattr(post_processor, "on_validation_epoch_start"):
        post_processor.on_validation_epoch_start(None, None)
    for batch in thresholds_from:
        post_processor.on_validation_batch_end(None, None, batch)
    post_processor.on_validation_epoch_end(None, None)

    image = {"tp": 0, "fp": 0, "fn": 0}
    pixel = {"tp": 0, "fp": 0, "fn": 0}
    good_images = flagged_images = good_pixels = flagged_pixels = 0
    for batch in test:
        with torch.no_grad():
            out = post_processor(InferenceBatch(pred_score=batch.pred_score, anomaly_map=batch.anomaly_map))
        labels, truth = out.pred_label.reshape(-1).bool(), batch.gt_label.reshape(-1).bool()
        image["tp"] += int((labels & truth).sum())
        image["fp"] += int((labels & ~truth).sum())
        image["fn"] += int((~labels & truth).sum())
        masks, gt = out.pred_mask.reshape(batch.gt_mask.shape).bool(), batch.gt_mask.bool()
        pixel["tp"] += int((masks & gt).sum())
        pixel["fp"] += int((masks & ~gt).sum())
        pixel["fn"] += int((~masks & gt).sum())
        good = ~truth
        good_images += int(good.sum())
        flagged_images += int((labels & good).sum())
        good_pixels += int(gt[good].numel())
        flagged_pixels += int(masks[good].sum())
    image_f1 = _f1(**image)[0]
    seg_f1, seg_precision, seg_recall = _f1(**pixel)
    return Row(
        name,
        float(post_processor.image_threshold),
        float(post_processor.pixel_threshold),
        image_f1,
        seg_f1,
        seg_precision,
        seg_recall,
        flagged_images / max(1, good_images),
        flagged_pixels / max(1, good_pixels),
    )


def threshold_rows(recorded: Recorded, args: argparse.Namespace) -> list[Row]:
    from anomalib.post_processing import PostProcessor

    from anomalib_transformer_student.model.post_processing import QuantilePostProcessor

    rows = [evaluate("anomalib PostProcessor (fallback: max)", PostProcessor(), recorded.validation, recorded.test)]
    for image_q, pixel_q in zip(args.image_quantiles, args.pixel_quantiles, strict=True):
        post_processor = QuantilePostProcessor(image_quantile=image_q, pixel_quantile=pixel_q)
        name = f"QuantilePostProcessor({image_q}, {pixel_q})"
        rows.append(evaluate(name, post_processor, recorded.validation, recorded.test))
    reference = "anomalib PostProcessor fitted on the test set (reference)"
    return [*rows, evaluate(reference, PostProcessor(), recorded.test, recorded.test)]


def print_report(rows: list[Row], recorded: Recorded, model: Any, args: argparse.Namespace) -> None:
    tiles = model.tiling.layout(args.height, args.width)
    test_images = sum(len(batch.pred_score) for batch in recorded.test)
    pixels = sum(int(batch.gt_mask.sum()) for batch in recorded.test)
    print(
        f"\nTeacher {args.teacher} with RANDOM weights (offline machine): these figures compare thresholds of one "
        "random feature extractor's maps and say nothing about the pretrained method's accuracy."
    )
    print(
        f"{args.width} x {args.height} px images (MVTec AD 2 layout, anomalib's MVTecAD2 datamodule), spots of radius "
        f"1.5-3 px only ({pixels} defect pixels in all); {args.n_train} training, {args.n_val} good validation, "
        f"{args.n_test_good} good + {args.n_test_bad} defective test images; image_size = tile_size "
        f"{args.image_size} ({tiles.count if tiles else 1} tiles per image); {args.epochs} epochs, lr {args.lr}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads."
    )
    times = ", ".join(f"{key} {value:.0f} s" for key, value in recorded.seconds.items())
    print(f"Wall times: {times} ({recorded.seconds.get('test', 0) / max(1, test_images):.2f} s per test image).\n")
    header = ["thresholds", "image thr.", "pixel thr.", "image F1", "SegF1", "pixel precision", "pixel recall",
              "good images flagged", "good pixels flagged"]  # fmt: skip
    print(markdown_row(header))
    print(markdown_rule("l" + "r" * (len(header) - 1)))
    for row in rows:
        cells = [f"{row.image_threshold:.4g}", f"{row.pixel_threshold:.4g}", f"{row.image_f1:.3f}",
                 f"{row.seg_f1:.3f}", f"{row.seg_precision:.3f}", f"{row.seg_recall:.3f}",
                 f"{row.good_images_flagged:.1%}", f"{row.good_pixels_flagged:.4%}"]  # fmt: skip
        print(markdown_row([row.name, *cells]))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if len(args.image_quantiles) != len(args.pixel_quantiles):
        msg = "--image-quantiles and --pixel-quantiles pair up: give as many of each."
        raise SystemExit(msg)
    if args.generate_only is not None:
        root = generate_mvtecad2_tree(args.generate_only, args)
        print(f"Wrote {root / CATEGORY} ({args.width} x {args.height} px).")
        return
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as temporary:
        workdir = args.workdir or Path(temporary)
        root = generate_mvtecad2_tree(workdir / "data", args)
        recorded, model = fit_and_test(root, workdir, args)
        rows = threshold_rows(recorded, args)
        print_report(rows, recorded, model, args)
    print(f"\nPeak memory {peak_rss_mib():.0f} MiB; wall time in all: {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
