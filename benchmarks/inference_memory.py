"""Resident memory of anomalib's Torch and OpenVINO inferencers over a long inference loop.

Trains a TransformerStudent for one epoch on generated data (random teacher unless
``--pretrained``), exports it for PyTorch and OpenVINO, then lets each inferencer predict
``--images`` image files one by one (cycling through the generated test images, read from disk
each time, as on a production line) and records the process's resident set size (RSS) every
``--every`` images. Each inferencer runs in a fresh process, so neither sees the other's memory.

The model is steady if RSS after the first ``--every`` images grows by no more than 5 % by the end.

Usage::

    python benchmarks/inference_memory.py [--image-size 224] [--teacher vit_small_patch14_dinov2] \
        [--images 1000] [--every 100] [--workdir DIR]
"""

import argparse
import gc
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import psutil
from common import generate_demo_data, in_fresh_process

MAX_GROWTH = 0.05


def prepare(workdir: Path, image_size: int, teacher: str, pretrained: bool) -> tuple[Path, Path, list[Path]]:
    """Train for one epoch, export to PyTorch and OpenVINO; return both models and the images to predict."""
    from anomalib.data import MVTecAD
    from anomalib.deploy import ExportType
    from anomalib.engine import Engine

    from anomalib_transformer_student import TransformerStudent

    root = generate_demo_data(workdir / "data", image_size=image_size, n_train=8, n_test_good=10, n_test_per_defect=4)
    datamodule = MVTecAD(root=root, category="brick", num_workers=0, train_batch_size=4, eval_batch_size=4)
    model = TransformerStudent(teacher=teacher, pretrained=pretrained, image_size=image_size, feature_cache=False)
    engine = Engine(max_epochs=1, default_root_dir=workdir / "results", logger=False, enable_progress_bar=False)
    engine.fit(model, datamodule=datamodule)
    size = (image_size, image_size)
    exported = {
        export_type: engine.export(model, export_type, export_root=workdir / export_type.value, input_size=size)
        for export_type in (ExportType.TORCH, ExportType.OPENVINO)
    }
    images = sorted((root / "brick" / "test").rglob("*.png"))
    return exported[ExportType.TORCH], exported[ExportType.OPENVINO], images


def measure(backend: str, model_path: Path, images: list[Path], count: int, every: int, workdir: Path) -> dict:
    """Predict ``count`` images with one inferencer; RSS in MiB after each ``every`` images, and the time per image."""
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.chdir(workdir)  # OpenVINOInferencer writes an openvino_cache/ folder into the working directory
    from anomalib.deploy import OpenVINOInferencer, TorchInferencer

    os.environ["TRUST_REMOTE_CODE"] = "1"  # TorchInferencer unpickles the model: ours, exported a moment ago

    inferencer = (
        TorchInferencer(model_path, device="cpu")
        if backend == "torch"
        else OpenVINOInferencer(model_path, device="CPU")
    )
    process = psutil.Process()
    rss = []
    start = time.perf_counter()
    for index in range(1, count + 1):
        prediction = inferencer.predict(images[index % len(images)])
        del prediction
        if index % every == 0:
            gc.collect()
            rss.append(process.memory_info().rss / 2**20)
    return {"backend": backend, "rss": rss, "ms_per_image": 1000 * (time.perf_counter() - start) / count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--teacher", default="vit_small_patch14_dinov2")
    parser.add_argument("--pretrained", action="store_true", help="load the teacher's pretrained weights")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--workdir", type=Path, help="keep data, models and caches here (default: a temporary folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as temporary:
        workdir = (args.workdir or Path(temporary)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        torch_model, openvino_model, images = prepare(workdir, args.image_size, args.teacher, args.pretrained)
        results = [
            in_fresh_process(measure, backend, path, images, args.images, args.every, workdir)
            for backend, path in (("torch", torch_model), ("openvino", openvino_model))
        ]

    print(f"\n{args.teacher}, {args.image_size} px, {args.images} images, RSS in MiB after every {args.every}:")
    print(f"{'images':>8} " + " ".join(f"{result['backend']:>10}" for result in results))
    for row, count in enumerate(range(args.every, args.images + 1, args.every)):
        print(f"{count:>8} " + " ".join(f"{result['rss'][row]:>10.1f}" for result in results))
    print(f"{'ms/image':>8} " + " ".join(f"{result['ms_per_image']:>10.1f}" for result in results))
    for result in results:
        first, peak = result["rss"][0], max(result["rss"])
        growth = (peak - first) / first
        verdict = "flat" if growth <= MAX_GROWTH else f"GROWS beyond {MAX_GROWTH:.0%}"
        print(
            f"{result['backend']}: {first:.1f} MiB after {args.every} images, peak {peak:.1f} MiB: "
            f"{growth:+.2%} ({verdict})"
        )


if __name__ == "__main__":
    main()
