r"""The measurements of ``benchmarks/gpu.sh`` on one CUDA GPU, printed as one Markdown table.

1. The CUDA tests: the tests whose names contain ``cuda`` (they skip without a GPU), run by pytest.
2. Inference latency at ``--size`` (1036 px by default), batch 1, of ours and of anomalib's L2BT in FP32, fp16 and
   bf16 (ours: ``teacher_precision``; L2BT: autocast around its forward), each in a fresh process
   (``measure_torch`` of ``inference_speed.py``: median of ``--runs`` after ``--warmup``; peak allocated memory).
3. Fit + test as users run them: anomalib's ``Engine(max_epochs=--epochs)`` with its default callbacks (validation
   and checkpoint after every epoch, Lightning's sanity check), ``fit`` then ``test``, on the package's generated
   demo data (one texture, images of ``--data-size`` px), ours and L2BT, each in a fresh process: wall times,
   image AUROC, peak GPU memory.
4. Tiled inference of one ``--image`` (2048 x 2448 by default) with ``tile_size = --size`` against the same image
   whole, FP32 and with the teacher in bf16 (``tiling_speed.py``'s timing: fastest of ``--runs``).

Teachers have RANDOM weights (speed does not depend on them; the AUROC of step 3 says nothing about the method).
``--device cpu`` with small sizes runs the same steps on a CPU, to check the script where no GPU is (the CUDA-only
variants are then replaced by the CPU ones: PyTorch FP32, teacher bf16, L2BT FP32)::

    python benchmarks/gpu.py --device cpu --size 112 --teacher vit_small_patch14_dinov2 --data-size 128 \\
        --image 256x320 --epochs 2 --runs 2 --skip-tests
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    build_l2bt,
    cpu_summary,
    generate_demo_data,
    in_fresh_process,
    markdown_row,
    markdown_rule,
    peak_cuda_mib,
    peak_rss_mib,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEACHER = "vit_base_patch14_reg4_dinov2.lvd142m"
CUDA_LATENCY_VARIANTS = ("cuda-fp32", "cuda-fp16", "cuda-bf16", "l2bt-cuda-fp32", "l2bt-cuda-fp16", "l2bt-cuda-bf16")
CPU_LATENCY_VARIANTS = ("torch", "torch-bf16", "l2bt")
CATEGORY = "brick"


def parse_size(text: str) -> tuple[int, int]:
    """``"2048x2448"`` as ``(2048, 2448)`` (height x width)."""
    height, _, width = text.lower().partition("x")
    return int(height), int(width or height)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--size", type=int, default=1036, help="model input side (px), also the tile size")
    parser.add_argument("--teacher", default=DEFAULT_TEACHER, help="timm ViT of ours (random weights)")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per latency")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of fit + test")
    parser.add_argument("--data-size", type=int, default=1024, help="side of the generated demo images (px)")
    parser.add_argument("--n-train", type=int, default=12, help="generated training images")
    parser.add_argument("--image", type=parse_size, default=(2048, 2448), help="tiled image, HxW (default 2048x2448)")
    parser.add_argument("--skip-tests", action="store_true", help="skip step 1 (the CUDA tests)")
    return parser.parse_args(argv)


def cuda_tests() -> str:
    """Run the tests named ``*cuda*``; pytest's summary line (e.g. ``2 passed``)."""
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", "cuda", "tests"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    print(result.stdout[-3000:], result.stderr[-2000:], sep="\n", flush=True)
    lines = [line.strip("= ") for line in result.stdout.splitlines() if line.strip()]
    summary = lines[-1] if lines else "no output"
    return summary if result.returncode in (0, 5) else f"FAILED: {summary}"  # 5: no test selected


def latency(variant: str, args: argparse.Namespace) -> dict[str, float]:
    """Median latency (s) and peak memory (MiB) of one variant of ``inference_speed.py``, in this process."""
    from inference_speed import measure_torch

    result = measure_torch(variant, args.teacher, args.size, args.warmup, args.runs, None)
    return {"seconds": statistics.median(result["times"]), "memory": result["memory"]}


def fit_and_test(name: str, root: Path, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``Engine(max_epochs).fit`` then ``.test`` of ours or L2BT, anomalib's default callbacks; times and memory."""
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from anomalib_transformer_student import TransformerStudent

    seed_everything(0, verbose=False)
    if name == "ours":
        model = TransformerStudent(
            teacher=args.teacher, pretrained=False, image_size=args.size, feature_cache={"dir": str(workdir / "cache")}
        )
    else:  # L2BT's own teacher, or the same architecture as ours where another is asked for
        model = build_l2bt(args.size, backbone=None if args.teacher == DEFAULT_TEACHER else args.teacher)
    datamodule = MVTecAD(root=root, category=CATEGORY, num_workers=4 if args.device == "cuda" else 0)
    engine = Engine(
        max_epochs=args.epochs,
        default_root_dir=workdir / name,
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        enable_progress_bar=False,
    )
    start = time.perf_counter()
    engine.fit(model, datamodule=datamodule)
    fit = time.perf_counter() - start
    start = time.perf_counter()
    (metrics,) = engine.test(model, datamodule=datamodule, verbose=False)
    test = time.perf_counter() - start
    memory = peak_cuda_mib() if args.device == "cuda" else peak_rss_mib()
    return {"fit": fit, "test": test, "auroc": float(metrics["image_AUROC"]), "memory": memory}


def tiled_inference(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Fastest forward of one ``args.image`` whole and in tiles, FP32 and with the teacher in bf16."""
    from tiling_speed import build_models, fastest_seconds

    options = argparse.Namespace(
        teacher=args.teacher,
        image_size=args.size,
        tile_batch_size=8,
        device=args.device,
        warmup=args.warmup,
        runs=args.runs,
    )
    torch.manual_seed(0)
    whole, tiled = build_models(options)
    images = torch.rand(1, 3, *args.image, device=args.device)
    results = {"tiles": {"count": float(tiled.tiling.count(*args.image))}}
    for precision in ("float32", "bfloat16"):
        for name, model in (("whole", whole), ("tiled", tiled)):
            model.model.teacher_precision = precision
            seconds, teacher_seconds = fastest_seconds(model, images, options)
            results[f"{name} {precision}"] = {"seconds": seconds, "teacher": teacher_seconds}
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit(
            "gpu.py: no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False). Run it on a machine "
            "with an NVIDIA GPU, its driver and a CUDA build of torch, or pass --device cpu to check the script."
        )
    device = torch.cuda.get_device_name() if cuda else f"CPU {cpu_summary()}"
    print(f"device: {device}; torch {torch.__version__}; teacher {args.teacher} (random weights)", flush=True)
    rows: list[list[str]] = []

    if not args.skip_tests:
        rows.append(["CUDA tests", "pytest -k cuda tests", cuda_tests()])

    variants = CUDA_LATENCY_VARIANTS if cuda else CPU_LATENCY_VARIANTS
    reference = None
    for variant in variants:
        result = in_fresh_process(latency, variant, args)
        reference = reference or result["seconds"]
        model = "L2BT" if variant.startswith("l2bt") else "ours"
        precision = variant.rsplit("-", 1)[-1] if "-" in variant else "fp32"
        rows.append(
            [
                f"latency, {args.size} px, batch 1",
                f"{model}, {precision.upper() if precision == 'fp32' else precision}",
                f"{result['seconds'] * 1e3:.1f} ms ({1 / result['seconds']:.1f} images/s; "
                f"{result['seconds'] / reference:.2f} of ours FP32); peak {result['memory']:.0f} MiB",
            ]
        )
        print(rows[-1], flush=True)

    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory)
        root = generate_demo_data(
            workdir / "data",
            image_size=args.data_size,
            n_train=args.n_train,
            n_test_good=4,
            n_test_per_defect=3,
            category=CATEGORY,
        )
        for name in ("ours", "L2BT"):
            result = in_fresh_process(fit_and_test, name, root, workdir, args)
            rows.append(
                [
                    f"fit + test, {args.size} px, {args.epochs} epochs",
                    f"{name}: Engine defaults (validation, checkpoint every epoch); {args.n_train} train, 13 test "
                    f"images of {args.data_size} px",
                    f"fit {result['fit']:.1f} s, test {result['test']:.1f} s; image AUROC {result['auroc']:.3f} "
                    f"(random teacher); peak {result['memory']:.0f} MiB",
                ]
            )
            print(rows[-1], flush=True)

    tiled = in_fresh_process(tiled_inference, args)
    height, width = args.image
    for key, result in tiled.items():
        if key == "tiles":
            continue
        how, precision = key.split()
        setting = f"{int(tiled['tiles']['count'])} tiles of {args.size} px" if how == "tiled" else "whole"
        rows.append(
            [
                f"{height} x {width} image, batch 1",
                f"{setting}, teacher {precision}",
                f"{result['seconds'] * 1e3:.1f} ms (teacher {result['teacher'] * 1e3:.1f} ms)",
            ]
        )

    print(f"\n{device}; torch {torch.__version__}; teacher {args.teacher} with random weights\n")
    print(markdown_row(["measurement", "setting", "result"]))
    print(markdown_rule("lll"))
    for row in rows:
        print(markdown_row(row))
    print(f"\nwall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
