"""Fidelity of each precision and compression against PyTorch FP32: maps, scores, labels and image AUROC.

Trains TransformerStudent on the package's generated demo data (one texture; as ``transformer-student demo``
trains: lr 1e-3, batch 1, validation once after the last epoch, which sets the normalisation statistics and
thresholds, here on half of the generated test images), then runs each of the other test images, one at a
time, through each variant:

- ``torch``: PyTorch FP32 (``TransformerStudent.forward``: pre-processing, model, post-processing), the
  reference;
- ``torch-bf16``: the same model with ``teacher_precision="bfloat16"`` (the teacher under bf16 autocast);
- OpenVINO exports made by ``to_openvino`` with a fixed ``input_size`` (``OPENVINO_VARIANTS`` in ``common.py``),
  each compiled with an explicit ``INFERENCE_PRECISION_HINT``: ``ov-fp32`` (f32), ``ov-bf16`` (FP32 IR in
  bf16, what OpenVINO chooses by itself on CPUs with bf16 units), ``ov-fp16`` (FP16 weights, f32), ``ov-int8`` and
  ``ov-int8-bf16`` (INT8 weight compression), ``ov-int8-ptq`` and ``ov-int8-ptq-bf16`` (INT8 post-training
  quantisation, calibrated on the validation images).

Each variant is compared with the reference on the normalised outputs (0.5 is the threshold): Pearson
correlation of the anomaly maps (all pixels of all test images pooled, and the lowest per-image value), the
largest difference of map pixels and of image scores, the share of images with the same label, and the image
AUROC against the ground truth minus the reference's. bf16 variants need a CPU with bf16 units (AVX512_BF16 or
AMX-BF16; elsewhere PyTorch falls back to float32 and OpenVINO's bf16 is emulated), and are skipped without them.
The first lines name the CPU and its relevant features.

The teacher has RANDOM weights (``pretrained=False``: these machines are offline): the figures measure how far
each variant's arithmetic moves the outputs of one trained model, not the method's accuracy; a pretrained
teacher's features differ, and so may the figures.

Usage::

    python benchmarks/precision_fidelity.py                          # ViT-S/14, 224 px, 100 images compared
    python benchmarks/precision_fidelity.py --teacher vit_base_patch14_reg4_dinov2.lvd142m   # the paper's ViT-B
    python benchmarks/precision_fidelity.py --image-size 448 --variants torch-bf16 ov-bf16 ov-int8-ptq-bf16
    python benchmarks/precision_fidelity.py --image-size 112 --epochs 1 --n-test-good 8 --n-test-per-defect 4  # quick
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    OPENVINO_VARIANTS,
    cpu_has_bf16_units,
    cpu_summary,
    generate_demo_data,
    markdown_row,
    markdown_rule,
)

VARIANTS = ("torch-bf16", *(name for name in OPENVINO_VARIANTS if name != "ov-int8-ptq-attention"))
BF16_VARIANTS = tuple(name for name in VARIANTS if name.endswith("bf16"))
LABELS = {"torch": "PyTorch FP32 (reference)", "torch-bf16": "PyTorch, teacher bf16"} | {
    name: variant.label for name, variant in OPENVINO_VARIANTS.items()
}
# The demo's training settings (``apps/demo.py``).
LEARNING_RATE = 1e-3
TRAIN_BATCH_SIZE = 1
# Share of the generated test images that validation takes (setting normalisation and thresholds) and the
# comparison leaves out: an adaptive threshold lies exactly on a validation image's score, whose label the
# slightest difference would flip.
VALIDATION_SHARE = 0.5

Prediction = dict[str, np.ndarray]  # "anomaly_map" (H, W), "pred_score" and "pred_label" scalars


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="vit_small_patch14_dinov2", help="timm ViT (random weights)")
    parser.add_argument("--image-size", type=int, default=224, help="side of the generated images and model input")
    parser.add_argument("--category", default="brick", help="demo texture: brick, grass or gravel")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--n-train", type=int, default=12)
    parser.add_argument("--n-test-good", type=int, default=80, help="half validate, half are compared")
    parser.add_argument(
        "--n-test-per-defect", type=int, default=40, help="per defect type (3 types); half validate, half are compared"
    )
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--threads", type=int, help="CPU threads (default: the libraries' own, all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="folder for data, runs and exports (default: temporary)")
    return parser.parse_args(argv)


def train(args: argparse.Namespace, workdir: Path) -> tuple[Any, Any]:
    """Generate the demo data and fit a model on it as the demo does; return the model and its datamodule."""
    from anomalib.callbacks.checkpoint import ModelCheckpoint
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from anomalib_transformer_student import TransformerStudent

    root = generate_demo_data(
        workdir / "data",
        image_size=args.image_size,
        n_train=args.n_train,
        n_test_good=args.n_test_good,
        n_test_per_defect=args.n_test_per_defect,
        category=args.category,
        seed=args.seed,
    )
    seed_everything(args.seed, verbose=False)
    datamodule = MVTecAD(
        root=root,
        category=args.category,
        train_batch_size=TRAIN_BATCH_SIZE,
        num_workers=0,
        val_split_mode="from_test",
        val_split_ratio=VALIDATION_SHARE,
        seed=args.seed,
    )
    model = TransformerStudent(
        teacher=args.teacher,
        pretrained=False,
        image_size=args.image_size,
        lr=LEARNING_RATE,
        feature_cache={"dir": str(workdir / "feature_cache")},
        visualizer=False,
    )
    engine = Engine(
        default_root_dir=workdir / "run",
        max_epochs=args.epochs,
        callbacks=[ModelCheckpoint(save_top_k=0)],
        check_val_every_n_epoch=args.epochs,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        logger=False,
        accelerator="cpu",
        devices=1,
    )
    engine.fit(model, datamodule=datamodule)
    return model.cpu().eval(), datamodule


def load_test_images(datamodule: Any) -> tuple[list[np.ndarray], np.ndarray]:
    """The test images (not the validation ones) as ``(1, 3, H, W)`` arrays in [0, 1], and labels (1: defective)."""
    from PIL import Image

    items = [datamodule.test_data[index] for index in range(len(datamodule.test_data))]
    images = [
        np.asarray(Image.open(item.image_path).convert("RGB"), dtype=np.float32).transpose(2, 0, 1)[None] / 255
        for item in items
    ]
    return images, np.array([int(item.gt_label) for item in items])


def torch_predictions(model: Any, images: list[np.ndarray], teacher_precision: str = "float32") -> list[Prediction]:
    """Predictions of the PyTorch model, its teacher run at ``teacher_precision``."""
    saved = model.model.teacher_precision
    model.model.teacher_precision = teacher_precision
    model.model._precision_noted = False
    try:
        with torch.inference_mode():
            outputs = [model(torch.from_numpy(image)) for image in images]
    finally:
        model.model.teacher_precision = saved
    return [
        {
            "anomaly_map": output.anomaly_map.squeeze().numpy(),
            "pred_score": output.pred_score.squeeze().numpy(),
            "pred_label": output.pred_label.squeeze().numpy(),
        }
        for output in outputs
    ]


def openvino_predictions(path: Path, hint: str, images: list[np.ndarray], threads: int | None) -> list[Prediction]:
    """Predictions of an exported IR compiled for the CPU with ``INFERENCE_PRECISION_HINT`` ``hint``."""
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": hint, **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    names = [output.get_any_name() for output in compiled.outputs]
    predictions = []
    for image in images:
        outputs = request.infer({0: image})
        by_name = {name: np.asarray(value) for name, value in zip(names, outputs.to_tuple(), strict=True)}
        predictions.append({key: by_name[key].squeeze() for key in ("anomaly_map", "pred_score", "pred_label")})
    return predictions


def export_variants(model: Any, datamodule: Any, variants: list[str], size: int, root: Path) -> dict[str, Path]:
    """Export each OpenVINO IR the variants need once (fixed ``input_size``); their paths by compression."""
    import nncf

    nncf.set_log_level(logging.WARNING)
    paths: dict[str, Path] = {}
    for name in variants:
        variant = OPENVINO_VARIANTS.get(name)
        if variant is None or str(variant.compression) in paths:
            continue
        calibration = datamodule if variant.compression == "int8_ptq" else None
        paths[str(variant.compression)] = model.to_openvino(
            root / str(variant.compression),
            input_size=(size, size),
            compression_type=variant.compression,
            datamodule=calibration,
        )
    return paths


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two arrays' values (1 where both are constant and equal)."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    if a.std() == 0 or b.std() == 0:
        return 1.0 if np.array_equal(a, b) else float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Image AUROC of ``scores`` against ``labels`` (1: defective)."""
    from torchmetrics.functional.classification import binary_auroc

    return float(binary_auroc(torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(labels)))


def compare(predictions: list[Prediction], reference: list[Prediction], labels: np.ndarray) -> dict[str, float]:
    """The fidelity figures of ``predictions`` against ``reference`` (see the module docstring)."""

    def stacked(outputs: list[Prediction], key: str) -> np.ndarray:
        return np.stack([np.asarray(output[key], dtype=np.float64) for output in outputs])

    maps, reference_maps = stacked(predictions, "anomaly_map"), stacked(reference, "anomaly_map")
    scores, reference_scores = stacked(predictions, "pred_score"), stacked(reference, "pred_score")
    same_labels = stacked(predictions, "pred_label").astype(bool) == stacked(reference, "pred_label").astype(bool)
    return {
        "pearson": pearson(maps, reference_maps),
        "lowest_pearson": min(pearson(a, b) for a, b in zip(maps, reference_maps, strict=True)),
        "map_difference": float(np.abs(maps - reference_maps).max()),
        "score_difference": float(np.abs(scores - reference_scores).max()),
        "label_agreement": float(same_labels.mean()),
        "auroc": auroc(scores, labels),
        "auroc_difference": auroc(scores, labels) - auroc(reference_scores, labels),
    }


def timed(function: Callable[..., list[Prediction]], *args: Any) -> tuple[list[Prediction], float]:
    """``function(*args)`` and the mean seconds per image it took."""
    start = time.perf_counter()
    predictions = function(*args)
    return predictions, (time.perf_counter() - start) / max(1, len(predictions))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import openvino as ov

    variants = list(args.variants)
    bf16 = cpu_has_bf16_units()
    if not bf16:
        skipped = [name for name in variants if name in BF16_VARIANTS]
        variants = [name for name in variants if name not in BF16_VARIANTS]
        if skipped:
            print(f"Skipped (this CPU has no bf16 units: AVX512_BF16 or AMX-BF16): {', '.join(skipped)}")
    print(f"CPU: {cpu_summary()}; {torch.get_num_threads()} threads")
    capabilities = " ".join(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    print(f"OpenVINO {ov.__version__} (CPU capabilities: {capabilities}); torch {torch.__version__}")
    print(
        f"teacher {args.teacher} with RANDOM weights (offline): the figures measure how far each variant's arithmetic "
        "moves one trained model's outputs, not the method's accuracy"
    )
    with tempfile.TemporaryDirectory() as directory:
        workdir = args.workdir or Path(directory)
        start = time.perf_counter()
        model, datamodule = train(args, workdir)
        trained = time.perf_counter() - start
        images, labels = load_test_images(datamodule)
        print(
            f"demo data '{args.category}', {args.image_size} px: {args.n_train} training images; {len(images)} test "
            f"images compared ({int(labels.sum())} defective), {len(datamodule.val_data)} others validated "
            f"(thresholds); {args.epochs} epochs, lr {LEARNING_RATE}, batch {TRAIN_BATCH_SIZE} ({trained:.0f} s); "
            "every image alone (batch 1) at the model's input size\n"
        )
        reference, seconds = timed(torch_predictions, model, images)
        rows = {"torch": (compare(reference, reference, labels), seconds)}
        if "torch-bf16" in variants:
            predictions, seconds = timed(torch_predictions, model, images, "bfloat16")
            rows["torch-bf16"] = (compare(predictions, reference, labels), seconds)
        paths = export_variants(model, datamodule, variants, args.image_size, workdir / "exports")
        for name in variants:
            if name in OPENVINO_VARIANTS:
                variant = OPENVINO_VARIANTS[name]
                path = paths[str(variant.compression)]
                predictions, seconds = timed(openvino_predictions, path, variant.hint, images, args.threads)
                rows[name] = (compare(predictions, reference, labels), seconds)
            print(f"  {LABELS[name]}: done", flush=True)
    print_table(rows)


def print_table(rows: dict[str, tuple[dict[str, float], float]]) -> None:
    """One Markdown row per variant, compared with PyTorch FP32."""
    header = [
        "variant",
        "map Pearson",
        "lowest per-image map Pearson",
        "largest map difference",
        "largest score difference",
        "label agreement",
        "image AUROC",
        "AUROC difference",
        "ms per image (indicative)",
    ]
    print("\n" + markdown_row(header))
    print(markdown_rule("l" + "r" * (len(header) - 1)))
    for name, (figures, seconds) in rows.items():
        cells = [
            LABELS[name],
            f"{figures['pearson']:.5f}",
            f"{figures['lowest_pearson']:.5f}",
            f"{figures['map_difference']:.4f}",
            f"{figures['score_difference']:.4f}",
            f"{100 * figures['label_agreement']:.1f} %",
            f"{figures['auroc']:.4f}",
            f"{figures['auroc_difference']:+.4f}",
            f"{seconds * 1e3:.0f}",
        ]
        print(markdown_row(cells))
    worst = min(figures["label_agreement"] for figures, _ in rows.values())
    print(f"\nlowest label agreement: {100 * worst:.1f} %; maps and scores are normalised (0.5 is the threshold)")


if __name__ == "__main__":
    main()
