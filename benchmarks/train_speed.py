"""Training speed: TransformerStudent (teacher-feature cache) against anomalib's own L2BT.

Both models train through anomalib's Engine on the same generated images, at the same image
size, batch size and number of epochs, with random teacher weights on both sides (speed does
not depend on the weights; anomalib's L2BT would otherwise download them). Each model trains in
its own process, so that peak memory is its own. One run of the largest epoch count gives the
times of the smaller ones: the wall time from the start of ``Engine.fit`` to the end of that
epoch (one checkpoint is written at the very end, for both). No validation runs.

A second table splits one evaluation forward of TransformerStudent into pre-processing,
teacher, students and map post-processing (upsampling, the eight-pass box blur and the top-k
score at the original resolution), next to the same map post-processing done as the reference
does it (bilinear upsampling, eight ``conv2d`` passes, crop).

Usage::

    python benchmarks/train_speed.py                                   # 448 px, ViT-B/14, 10 and 50 epochs
    python benchmarks/train_speed.py --image-size 1036 --accelerator gpu   # the paper's resolution
    python benchmarks/train_speed.py --image-size 224 --teacher vit_small_patch14_dinov2 --epochs 10 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (
    build_l2bt,
    generate_demo_data,
    markdown_row,
    markdown_rule,
    peak_cuda_mib,
    peak_rss_mib,
    synchronize_cuda,
    time_runs,
)
from torch.nn import functional

DEFAULT_TEACHER = "vit_base_patch14_reg4_dinov2.lvd142m"
RESULT_PREFIX = "RESULT "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=448, help="model input side (multiple of 14)")
    parser.add_argument("--epochs", type=int, nargs="+", default=[10, 50], help="epoch counts to report")
    parser.add_argument("--images", type=int, default=8, help="training images")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--teacher", default=DEFAULT_TEACHER, help="timm ViT for both models")
    parser.add_argument(
        "--data-size", type=int, default=None, help="side of the generated images (default: image size)"
    )
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu")
    parser.add_argument("--num-workers", type=int, default=0, help="data loader workers")
    parser.add_argument(
        "--models", nargs="+", default=["TransformerStudent", "L2BT"], choices=["TransformerStudent", "L2BT"]
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="folder for data and results (default: a temporary one)"
    )
    parser.add_argument(
        "--project",
        type=int,
        nargs="*",
        default=[],
        help="also project these epoch counts from the measured first and later epochs (for slow settings)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each inference part")
    parser.add_argument("--worker", choices=["train", "inference"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process, and peak CUDA memory if used."""
    peak = {"rss_mb": peak_rss_mib()}
    if torch.cuda.is_available():
        peak["cuda_mb"] = peak_cuda_mib()
    return peak


def build_model(name: str, args: argparse.Namespace, cache_dir: Path):
    """TransformerStudent, or anomalib's L2BT with the same (randomly initialised) teacher architecture."""
    if name == "TransformerStudent":
        from anomalib_transformer_student import TransformerStudent

        return TransformerStudent(
            teacher=args.teacher, pretrained=False, image_size=args.image_size, cache_dir=str(cache_dir)
        )
    return build_l2bt(args.image_size, backbone=args.teacher)


def train_worker(args: argparse.Namespace, workdir: Path) -> dict:
    from anomalib.callbacks.checkpoint import ModelCheckpoint
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from lightning.pytorch import Callback, seed_everything

    seed_everything(0)
    epochs = max(args.epochs)
    start = [0.0]
    epoch_ends: list[float] = []

    class EpochClock(Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            synchronize_cuda()
            epoch_ends.append(time.perf_counter() - start[0])

    model = build_model(args.model, args, workdir / "cache")
    datamodule = MVTecAD(
        root=workdir / "data",
        category="brick",
        train_batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        num_workers=args.num_workers,
    )
    engine = Engine(
        max_epochs=epochs,
        accelerator=args.accelerator,
        devices=1,
        default_root_dir=workdir / "results" / args.model,
        logger=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[
            EpochClock(),
            ModelCheckpoint(dirpath=workdir / "results" / args.model, filename="model", every_n_epochs=epochs),
        ],
    )
    start[0] = time.perf_counter()
    engine.fit(model, datamodule=datamodule)
    synchronize_cuda()
    return {"epoch_ends": epoch_ends, "fit_s": time.perf_counter() - start[0], **peak_memory_mb()}


def timed(function, repeats: int) -> tuple[float, object]:
    """Median seconds of ``function()`` over ``repeats`` runs after one warm-up, and its last result."""
    last: list[object] = []

    def call() -> None:
        last[:] = [function()]

    times = time_runs(call, 1, repeats, synchronize_cuda)
    return statistics.median(times), last[0]


@torch.no_grad()
def forward_parts(model, transform, original_size: tuple[int, int], repeats: int) -> dict[str, float]:
    """Median seconds of each part of one evaluation forward of an image of ``original_size``."""
    from anomalib_transformer_student.model.anomaly_map import patch_discrepancy, square_padding

    device = next(model.parameters()).device
    raw = torch.rand(1, 3, *original_size, device=device)
    pre_s, images = timed(lambda: transform(raw), repeats)
    teacher_s, (shallow, deep) = timed(lambda: model.teacher_features(images), repeats)
    students_s, (predicted_shallow, predicted_deep) = timed(
        lambda: (model.backward_student(deep), model.forward_student(shallow)), repeats
    )
    tokens = (shallow, deep, predicted_shallow, predicted_deep)
    side, top, left = square_padding(original_size)
    map_s, _ = timed(
        lambda: model.anomaly_map_generator(
            *tokens, grid_size=model.teacher.grid_size, output_size=(side, side), original_size=original_size
        ),
        repeats,
    )

    def reference_map() -> torch.Tensor:
        patch_map = patch_discrepancy(predicted_shallow, shallow) * patch_discrepancy(predicted_deep, deep)
        anomaly_map = functional.interpolate(
            patch_map.reshape(1, 1, *model.teacher.grid_size), size=(side, side), mode="bilinear"
        )
        for kernel_size, repeats in ((5, 5), (7, 3)):
            weight = torch.ones(1, 1, kernel_size, kernel_size, device=device) / kernel_size**2
            for _ in range(repeats):
                anomaly_map = functional.conv2d(anomaly_map, weight, padding=kernel_size // 2)
        anomaly_map = anomaly_map[..., top : top + original_size[0], left : left + original_size[1]]
        return torch.topk(anomaly_map.flatten(1), k=max(1, int(0.001 * anomaly_map[0, 0].numel()))).values.mean()

    reference_s, _ = timed(reference_map, repeats)
    return {
        "pre-processing": pre_s,
        "teacher": teacher_s,
        "students": students_s,
        "map post-processing": map_s,
        "reference map post-processing (conv2d)": reference_s,
    }


def inference_worker(args: argparse.Namespace, workdir: Path) -> dict:
    use_cuda = args.accelerator in {"gpu", "cuda", "auto"} and torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    lightning_model = build_model("TransformerStudent", args, workdir / "cache").eval().to(device)
    model = lightning_model.model
    data_size = args.data_size or args.image_size
    rows = {
        f"{height}x{width}": forward_parts(
            model, lightning_model.pre_processor.transform, (height, width), args.repeats
        )
        for height, width in sorted({(data_size, data_size), (1000, 1500)})
    }
    return {"inference": rows, "device": str(device)}


def run_worker(kind: str, model: str | None, args: argparse.Namespace, workdir: Path) -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--workdir", str(workdir)]
    command += [
        "--image-size",
        str(args.image_size),
        "--images",
        str(args.images),
        "--batch-size",
        str(args.batch_size),
    ]
    command += ["--teacher", args.teacher, "--accelerator", args.accelerator, "--num-workers", str(args.num_workers)]
    command += ["--epochs", *map(str, args.epochs), "--repeats", str(args.repeats)]
    if args.data_size:
        command += ["--data-size", str(args.data_size)]
    if model:
        command += ["--model", model]
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in finished.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if finished.returncode != 0 or not lines:
        sys.exit(f"{kind} worker for {model} failed:\n{finished.stdout[-3000:]}\n{finished.stderr[-5000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def print_training_table(results: dict[str, dict], args: argparse.Namespace) -> None:
    models = list(results)
    print(
        f"\nTraining wall time, {args.images} images of {args.data_size or args.image_size} px, model input "
        f"{args.image_size} px, batch {args.batch_size}, teacher {args.teacher} (random weights)\n"
    )
    header = ["epochs", *(f"{name} (s)" for name in models)]
    if len(models) == 2:
        header.append(f"{models[1]} / {models[0]}")
    print(markdown_row(header))
    print(markdown_rule("r" * len(header)))

    def print_row(label: str, times: list[float]) -> None:
        """One row: each model's seconds, then the second's over the first's where there are two."""
        row = [label, *(f"{seconds:.1f}" for seconds in times)]
        if len(models) == 2:
            row.append(f"{times[1] / times[0]:.1f}x")
        print(markdown_row(row))

    for epochs in sorted(args.epochs):
        print_row(str(epochs), [results[name]["epoch_ends"][epochs - 1] for name in models])
    for epochs in args.project:
        # The first epoch (setup and teacher), then the mean of the later ones for each further epoch.
        times = []
        for name in models:
            ends = results[name]["epoch_ends"]
            times.append(ends[0] + (epochs - 1) * (ends[-1] - ends[0]) / max(1, len(ends) - 1))
        print_row(f"{epochs} (projected)", times)
    print()
    for name in models:
        result = results[name]
        memory = f"peak RSS {result['rss_mb']:.0f} MB"
        if "cuda_mb" in result:
            memory += f", peak CUDA {result['cuda_mb']:.0f} MB"
        first = result["epoch_ends"][0]
        later = (result["epoch_ends"][-1] - first) / max(1, len(result["epoch_ends"]) - 1)
        print(
            f"{name}: {memory}; first epoch ends at {first:.1f} s, later epochs {later:.2f} s each; "
            f"whole fit {result['fit_s']:.1f} s"
        )


def print_inference_table(result: dict) -> None:
    print(f"\nOne evaluation forward of TransformerStudent, batch 1, on {result['device']} (median, ms)\n")
    sizes = list(result["inference"])
    print(markdown_row(["part", *(f"original {size}" for size in sizes)]))
    print(markdown_rule("l" + "r" * len(sizes)))
    parts = list(next(iter(result["inference"].values())))
    for part in parts:
        cells = []
        for size in sizes:
            row = result["inference"][size]
            total = sum(seconds for name, seconds in row.items() if not name.startswith("reference"))
            share = row[part] / total * 100
            cells.append(f"{row[part] * 1000:.1f} ({share:.1f} %)")
        print(markdown_row([part, *cells]))
    print("\nShares are of pre-processing + teacher + students + map post-processing.")


def main() -> None:
    args = parse_args()
    if args.worker:
        workdir = args.workdir
        result = train_worker(args, workdir) if args.worker == "train" else inference_worker(args, workdir)
        print(RESULT_PREFIX + json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as temporary:
        workdir = args.workdir or Path(temporary)
        generate_demo_data(
            workdir / "data",
            image_size=args.data_size or args.image_size,
            n_train=args.images,
            n_test_good=1,
            n_test_per_defect=1,
        )
        print("Command: python " + " ".join(sys.argv))
        results = {}
        for name in args.models:
            results[name] = run_worker("train", name, args, workdir)
            print(f"{name}: fit took {results[name]['fit_s']:.1f} s", flush=True)
        print_training_table(results, args)
        print_inference_table(run_worker("inference", None, args, workdir))


if __name__ == "__main__":
    main()
