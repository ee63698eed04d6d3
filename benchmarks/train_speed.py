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

With ``--as-users-run`` it measures instead what ``anomalib train`` gives users: ``Engine(max_epochs=E)``
with anomalib's default callbacks (validation after every epoch on the test images, anomalib's
``ModelCheckpoint`` after every epoch, Lightning's sanity check), ``engine.fit`` then ``engine.test``, on
MVTec-AD-like data (24 training images, 12 evaluation images, half good, half defective, 512 px,
resized by the models), batch size 4 (the paper's) and 2 CPU threads. TransformerStudent's random
teacher is saved to a temporary ``.safetensors`` file and passed as ``teacher_weights`` (with
``pretrained=True``), as users with timm's weights have a re-fetchable teacher: its checkpoints before
the last epoch leave the frozen teacher out. It prints the wall times of fit and test, the images the
teacher saw, the peak RSS (each model in a fresh process), the first and later epochs (and from them a
projection to more epochs, labelled as such), and the time the data pipeline (reading, decoding and
resizing the images) takes next to a cached epoch.

Usage::

    python benchmarks/train_speed.py --as-users-run                    # 448 px, 10 epochs, fit + test
    python benchmarks/train_speed.py --as-users-run --image-size 1036 --epochs 2   # projected to 10 and 50
    python benchmarks/train_speed.py                                   # 448 px, ViT-B/14, 10 and 50 epochs
    python benchmarks/train_speed.py --image-size 1036 --accelerator gpu   # the paper's resolution
    python benchmarks/train_speed.py --image-size 224 --teacher vit_small_patch14_dinov2 --epochs 10 50
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (
    build_l2bt,
    count_forward_images,
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
USERS_DATA_SIZE = 512  # side of the generated images in --as-users-run (MVTec AD's are 700 to 1024 px)
DEFECT_TYPES = 3  # of the demo generator: stain, scratch, spot


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=448, help="model input side (multiple of 14)")
    parser.add_argument(
        "--as-users-run",
        action="store_true",
        help="Engine with anomalib's default callbacks (validation and checkpoint every epoch), fit then test",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        nargs="+",
        default=None,
        help="epoch counts to report (default 10 and 50; with --as-users-run: the epochs to run, default 10)",
    )
    parser.add_argument("--images", type=int, default=8, help="training images")
    parser.add_argument("--train-images", type=int, default=24, help="training images (--as-users-run)")
    parser.add_argument(
        "--eval-images", type=int, default=12, help="evaluation images, half good, half defective (--as-users-run)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (--as-users-run)")
    parser.add_argument(
        "--l2bt-epochs",
        type=int,
        default=None,
        help="epochs of L2BT alone (--as-users-run; default --epochs): 1 is enough for its projection, since "
        "it runs the teacher on every image in every epoch (for slow settings such as 1036 px on a CPU)",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--teacher", default=DEFAULT_TEACHER, help="timm ViT for both models")
    parser.add_argument(
        "--data-size",
        type=int,
        default=None,
        help=f"side of the generated images (default: image size; with --as-users-run {USERS_DATA_SIZE})",
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
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here (--as-users-run)")
    parser.add_argument("--worker", choices=["train", "inference", "users"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = [10] if args.as_users_run else [10, 50]
    if args.data_size is None and args.as_users_run:
        args.data_size = USERS_DATA_SIZE
    if args.as_users_run and max(args.epochs) < 2 and args.worker is None:
        parser.error("--as-users-run needs --epochs 2 or more (TransformerStudent's later epochs give the projection)")
    return args


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
            teacher=args.teacher, pretrained=False, image_size=args.image_size, feature_cache={"dir": str(cache_dir)}
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
    epochs = args.epochs
    if kind == "users" and model == "L2BT" and args.l2bt_epochs:
        epochs = [args.l2bt_epochs]
    command += ["--epochs", *map(str, epochs), "--repeats", str(args.repeats)]
    command += ["--train-images", str(args.train_images), "--eval-images", str(args.eval_images)]
    command += ["--threads", str(args.threads)]
    if args.as_users_run:
        command.append("--as-users-run")
    if args.data_size:
        command += ["--data-size", str(args.data_size)]
    if model:
        command += ["--model", model]
    # Nothing may reach the network (or the user's Hugging Face cache) in a benchmark.
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    finished = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
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


# --- --as-users-run: anomalib's defaults, fit then test ---------------------------------------------------------


def save_random_teacher(teacher: str, path: Path) -> Path:
    """Save a randomly initialised ``teacher`` (timm's layout, native input size) as ``.safetensors``; return ``path``.

    TransformerStudent loads it as its ``teacher_weights``: a source it can re-fetch, so that its checkpoints
    before the last epoch leave the frozen teacher out, as with timm's pretrained weights. Written by the
    parent process, so that building this extra ViT does not count in a worker's peak memory.
    """
    from safetensors.torch import save_file

    from anomalib_transformer_student.model.teacher import create_backbone

    torch.manual_seed(0)
    state = {name: tensor.contiguous() for name, tensor in create_backbone(teacher).state_dict().items()}
    save_file(state, str(path))
    return path


def build_users_model(name: str, args: argparse.Namespace, workdir: Path):
    """The model as a user builds it: TransformerStudent with a re-fetchable (random) teacher, or L2BT."""
    if name == "TransformerStudent":
        from anomalib_transformer_student import TransformerStudent

        return TransformerStudent(
            teacher=args.teacher,
            pretrained=True,
            teacher_weights=str(workdir / "teacher.safetensors"),
            image_size=args.image_size,
            feature_cache={"dir": str(workdir / "cache" / name)},
        )
    return build_l2bt(args.image_size, backbone=args.teacher)


def running_stage(module: torch.nn.Module) -> str:
    """The Lightning stage ``module`` runs in now: ``sanity_check``, ``train``, ``validate``, ``test``, ..."""
    trainer = getattr(module, "_trainer", None)
    stage = None if trainer is None else trainer.state.stage
    return "other" if stage is None else str(stage.value)


def make_epoch_clock():
    """A Lightning callback that times each training epoch of a fit and each checkpoint write.

    Times are seconds since ``clock.fit_start`` (set just before ``engine.fit``). Each epoch records its
    start, the start and end of its validation and the end of its training epoch; anomalib's
    ``ModelCheckpoint`` saves after that (Lightning runs checkpoint callbacks last), so every
    ``trainer.save_checkpoint`` is timed too, with the size of the file it wrote.
    """
    from lightning.pytorch import Callback

    class EpochClock(Callback):
        def __init__(self) -> None:
            self.fit_start = time.perf_counter()
            self.epochs: list[dict[str, float]] = []
            self.saves: list[dict[str, float]] = []
            self._wrapped: set[int] = set()

        def now(self) -> float:
            synchronize_cuda()
            return time.perf_counter() - self.fit_start

        def setup(self, trainer, pl_module, stage: str) -> None:
            del pl_module, stage
            if id(trainer) in self._wrapped:
                return
            self._wrapped.add(id(trainer))
            save = trainer.save_checkpoint

            def timed_save(filepath, *args, **kwargs):
                start = self.now()
                save(filepath, *args, **kwargs)
                end = self.now()
                size = Path(filepath).stat().st_size if Path(filepath).is_file() else 0
                self.saves.append({"start": start, "end": end, "mb": size / 2**20})

            trainer.save_checkpoint = timed_save

        def _in_fit(self, trainer) -> bool:
            return trainer.state.fn == "fit" and not trainer.sanity_checking and bool(self.epochs)

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.epochs.append({"start": self.now()})

        def on_validation_start(self, trainer, pl_module) -> None:
            if self._in_fit(trainer):
                self.epochs[-1]["val_start"] = self.now()

        def on_validation_end(self, trainer, pl_module) -> None:
            if self._in_fit(trainer):
                self.epochs[-1]["val_end"] = self.now()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.epochs[-1]["train_epoch_end"] = self.now()

        def epoch_spans(self, fit_end: float) -> list[dict[str, float]]:
            """Seconds of each epoch: ``span`` (to its checkpoint's end), ``train``, ``validate``, ``checkpoint``."""
            spans = []
            for index, epoch in enumerate(self.epochs):
                limit = self.epochs[index + 1]["start"] if index + 1 < len(self.epochs) else fit_end
                saves = [save for save in self.saves if epoch["start"] <= save["start"] < limit]
                end = max([epoch.get("train_epoch_end", epoch["start"])] + [save["end"] for save in saves])
                val_start = epoch.get("val_start", end)
                val_end = epoch.get("val_end", val_start)
                spans.append(
                    {
                        "end": end,
                        "span": end - epoch["start"],
                        "train": val_start - epoch["start"],
                        "validate": val_end - val_start,
                        "checkpoint": sum(save["end"] - save["start"] for save in saves),
                        "checkpoint_mb": saves[-1]["mb"] if saves else 0.0,
                    }
                )
            return spans

    return EpochClock()


@torch.no_grad()
def data_pipeline_seconds(datamodule, pre_processor, repeats: int) -> dict[str, float]:
    """Median seconds of one pass over the training and the evaluation images, as the epochs of a fit read them.

    ``*_read_decode``: iterating the datamodule's dataloader alone (reading, decoding, the dataset's own
    transforms, collation); ``*_resize``: the model's pre-processing transform on those batches (square pad,
    bicubic resize, normalisation), which TransformerStudent applies to every batch, cached or not.
    """
    transform = pre_processor.transform
    seconds: dict[str, list[float]] = {}
    for split, make_loader in (("train", datamodule.train_dataloader), ("eval", datamodule.val_dataloader)):
        for _ in range(repeats):
            read = resize = 0.0
            tick = time.perf_counter()
            for batch in make_loader():
                loaded = time.perf_counter()
                read += loaded - tick
                transform(batch.image)
                tick = time.perf_counter()
                resize += tick - loaded
            seconds.setdefault(f"{split}_read_decode", []).append(read)
            seconds.setdefault(f"{split}_resize", []).append(resize)
    return {name: statistics.median(values) for name, values in seconds.items()}


def users_worker(args: argparse.Namespace, workdir: Path) -> dict:
    """Fit then test one model through ``Engine`` with anomalib's default callbacks; times, teacher images, memory."""
    torch.set_num_threads(args.threads)
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    seed_everything(0)
    epochs = max(args.epochs)
    model = build_users_model(args.model, args, workdir)
    teacher_images = count_forward_images(model.model.teacher, lambda: running_stage(model))
    datamodule = MVTecAD(
        root=workdir / "data",
        category="brick",
        train_batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        num_workers=args.num_workers,
    )
    clock = make_epoch_clock()
    # Only what a user passes: the epochs, plus a results folder out of the way and one device. No options
    # that turn anomalib's per-epoch validation or checkpoint off.
    engine = Engine(
        max_epochs=epochs,
        accelerator=args.accelerator,
        devices=1,
        default_root_dir=workdir / "results" / args.model,
        callbacks=[clock],
    )
    clock.fit_start = time.perf_counter()
    engine.fit(model, datamodule=datamodule)
    synchronize_cuda()
    fit_s = time.perf_counter() - clock.fit_start
    fit_images = dict(teacher_images)
    start = time.perf_counter()
    engine.test(model, datamodule=datamodule)
    synchronize_cuda()
    test_s = time.perf_counter() - start
    test_images = {stage: count - fit_images.get(stage, 0) for stage, count in teacher_images.items()}
    memory = peak_memory_mb()  # before the data-pipeline timing below
    return {
        "fit_s": fit_s,
        "test_s": test_s,
        "epochs": clock.epoch_spans(fit_s),
        "fit_teacher_images": fit_images,
        "test_teacher_images": {stage: count for stage, count in test_images.items() if count},
        "train_images": len(datamodule.train_data),
        "eval_images": len(datamodule.test_data),
        "data_pipeline": data_pipeline_seconds(datamodule, model.pre_processor, args.repeats),
        "threads": torch.get_num_threads(),
        **memory,
    }


def later_epoch(result: dict) -> dict:
    """An epoch that is neither the first (setup, teacher) nor the last (final checkpoint): seconds of its parts.

    The mean of epochs 2 to E-1. With two epochs, the second with its checkpoint write replaced by the
    first's (the last checkpoint of a fit holds TransformerStudent's teacher, the earlier ones do not). With
    one epoch (L2BT only, see ``--l2bt-epochs``), that epoch: it starts after setup and the sanity check, and
    L2BT runs its teacher on every image in every epoch.
    """
    epochs = result["epochs"]
    parts = ("span", "train", "validate", "checkpoint", "checkpoint_mb")
    if len(epochs) >= 3:
        middle = epochs[1:-1]
        label = f"mean of epochs 2-{len(epochs) - 1}" if len(middle) > 1 else "epoch 2"
        return {"label": label, **{part: statistics.mean(epoch[part] for epoch in middle) for part in parts}}
    if len(epochs) == 2:
        first, second = epochs
        return {
            "label": "epoch 2, with epoch 1's checkpoint write",
            **{part: second[part] for part in ("train", "validate")},
            "span": second["span"] - second["checkpoint"] + first["checkpoint"],
            "checkpoint": first["checkpoint"],
            "checkpoint_mb": first["checkpoint_mb"],
        }
    return {"label": "epoch 1 (teacher on every image in every epoch)", **{part: epochs[0][part] for part in parts}}


def projected_total(result: dict, epochs: int) -> float:
    """Fit of ``epochs`` epochs plus test: the measured fit, plus (or minus) later epochs, plus the measured test."""
    return result["fit_s"] + (epochs - len(result["epochs"])) * later_epoch(result)["span"] + result["test_s"]


def describe_images(counts: dict[str, int]) -> str:
    """``"44 (sanity 8, train 24, validate 12)"``: the total and each stage's images."""
    total = sum(counts.values())
    parts = ", ".join(f"{stage.replace('_check', '')} {count}" for stage, count in counts.items())
    return f"{total} ({parts})" if len(counts) > 1 else str(total)


def print_table(
    models: list[str], rows: list[tuple[str, list[float], str, bool]], headers: list[str] | None = None
) -> None:
    """A Markdown table of (label, one number per model, format, with ratio) rows; ours / L2BT last where both ran."""
    ratio = models == ["TransformerStudent", "L2BT"]
    print(markdown_row(["", *(headers or models), *(["ours / L2BT"] if ratio else [])]))
    print(markdown_rule("l" + "r" * (len(models) + ratio)))
    for label, values, number_format, with_ratio in rows:
        cells = [format(value, number_format) for value in values]
        if ratio:
            cells.append(f"{values[0] / values[1]:.2f}" if with_ratio and values[1] else "-")
        print(markdown_row([label, *cells]))
    print()


def print_users_tables(results: dict[str, dict], args: argparse.Namespace) -> None:
    models = list(results)
    first = results[models[0]]
    epochs = {name: len(results[name]["epochs"]) for name in models}
    same_epochs = len(set(epochs.values())) == 1
    runs = " and ".join(f"Engine(max_epochs={epochs[name]}) for {name}" for name in models)
    if same_epochs:
        runs = f"Engine(max_epochs={epochs[models[0]]})"
    print(
        f"\n## As users run it: {runs} with anomalib's default callbacks, fit then test\n\n"
        f"{first['train_images']} training images and {first['eval_images']} evaluation images (half good, half "
        f"defective) of {args.data_size} px, resized by the models to {args.image_size} px; batch size "
        f"{args.batch_size}; teacher {args.teacher}. BOTH TEACHERS HAVE RANDOM WEIGHTS (TransformerStudent's are "
        f"loaded from a local .safetensors file with pretrained=True, as users load timm's, so that its "
        f"per-epoch checkpoints leave the frozen teacher out). {first['threads']} CPU threads; "
        f"{args.num_workers} dataloader workers. Validation on the evaluation images and anomalib's checkpoint "
        f"after every epoch, Lightning's sanity check, then test. Peak RSS of each model in a fresh process.\n"
    )
    rows = [
        ("epochs run", [epochs[name] for name in models], "d", False),
        ("fit (s)", [results[name]["fit_s"] for name in models], ".1f", same_epochs),
        ("test (s)", [results[name]["test_s"] for name in models], ".1f", True),
        (
            "total, fit + test (s)",
            [results[name]["fit_s"] + results[name]["test_s"] for name in models],
            ".1f",
            same_epochs,
        ),
        ("peak RSS (MiB)", [results[name]["rss_mb"] for name in models], ".0f", True),
    ]
    if "cuda_mb" in first:
        rows.append(("peak CUDA (MiB)", [results[name].get("cuda_mb", 0.0) for name in models], ".0f", True))
    print_table(models, rows)

    print("Images through the teacher (counted at its forward; sanity = Lightning's sanity check):\n")
    print(markdown_row(["", *models]))
    print(markdown_rule("l" + "r" * len(models)))
    print(markdown_row(["fit", *(describe_images(results[name]["fit_teacher_images"]) for name in models)]))
    print(markdown_row(["test", *(describe_images(results[name]["test_teacher_images"]) or "0" for name in models)]))
    print()

    later = {name: later_epoch(results[name]) for name in models}
    print("Epochs of the fit (s; an epoch is its training, its validation and its checkpoint write):\n")
    for name in models:
        spans = ", ".join(f"{epoch['span']:.1f}" for epoch in results[name]["epochs"])
        print(f"- {name}: each epoch {spans}; later epoch = {later[name]['label']}")
    print()
    rows = [
        (
            "first epoch, counted from the start of fit",
            [results[name]["epochs"][0]["end"] for name in models],
            ".2f",
            True,
        ),
        ("later epoch", [later[name]["span"] for name in models], ".2f", True),
        ("later epoch: training", [later[name]["train"] for name in models], ".2f", True),
        ("later epoch: validation", [later[name]["validate"] for name in models], ".2f", True),
        ("later epoch: checkpoint write", [later[name]["checkpoint"] for name in models], ".2f", True),
        ("last epoch", [results[name]["epochs"][-1]["span"] for name in models], ".2f", same_epochs),
        ("checkpoint of a later epoch (MB)", [later[name]["checkpoint_mb"] for name in models], ".0f", True),
        (
            "checkpoint of the last epoch (MB)",
            [results[name]["epochs"][-1]["checkpoint_mb"] for name in models],
            ".0f",
            True,
        ),
    ]
    print_table(models, rows)

    counts = sorted({10, 50, *args.project, *epochs.values()})
    print(
        "Fit + test for N epochs (s). PROJECTED unless marked measured: measured fit + (N - epochs run) x "
        "later epoch + measured test:\n"
    )
    rows = []
    for count in counts:
        measured = [name for name in models if epochs[name] == count]
        label = f"{count} epoch{'s' if count != 1 else ''}" + (
            " (measured)"
            if len(measured) == len(models)
            else f" (measured: {', '.join(measured)})"
            if measured
            else " (PROJECTED)"
        )
        rows.append((label, [projected_total(results[name], count) for name in models], ".1f", True))
    print_table(models, rows)
    print_data_pipeline(results, args)


def print_data_pipeline(results: dict[str, dict], args: argparse.Namespace) -> None:
    """The data pipeline's seconds per epoch, and their share of each model's later epoch."""
    models = list(results)
    print(
        f"Data pipeline per epoch (s; {args.data_size} px files, model input {args.image_size} px; the dataloader "
        f"and the pre-processor alone, median of {args.repeats} passes):\n"
    )
    print(markdown_row(["", *models]))
    print(markdown_rule("l" + "r" * len(models)))
    labels = {
        "train_read_decode": "training images: read + decode (dataloader)",
        "train_resize": "training images: pad + resize + normalise (pre-processor)",
        "eval_read_decode": "evaluation images: read + decode (dataloader)",
        "eval_resize": "evaluation images: pad + resize + normalise (pre-processor)",
    }
    for key, label in labels.items():
        print(markdown_row([label, *(f"{results[name]['data_pipeline'][key]:.2f}" for name in models)]))

    def share_row(label: str, keys: tuple[str, ...], part: str) -> None:
        cells = []
        for name in models:
            seconds = sum(results[name]["data_pipeline"][key] for key in keys)
            whole = later_epoch(results[name])[part]
            cells.append(f"{seconds:.2f} of {whole:.2f} = {seconds / whole * 100:.0f} %")
        print(markdown_row([label, *cells]))

    training = ("train_read_decode", "train_resize")
    share_row("share: training images' read + decode + resize / training part of a later epoch", training, "train")
    share_row("share: training images' read + decode + resize / whole later epoch", training, "span")
    share_row("share: all images' read + decode + resize / whole later epoch", tuple(labels), "span")
    print(
        "\nanomalib copies L2BT's top-level Resize into its datasets (images are resized while loading, in the "
        "dataloader); TransformerStudent's nested Resize runs on each batch (pre-processor), cached epoch or not."
    )


def users_main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        good = args.eval_images // 2
        per_defect = max(1, round((args.eval_images - good) / DEFECT_TYPES))
        generate_demo_data(
            workdir / "data",
            image_size=args.data_size,
            n_train=args.train_images,
            n_test_good=good,
            n_test_per_defect=per_defect,
        )
        if "TransformerStudent" in args.models:
            save_random_teacher(args.teacher, workdir / "teacher.safetensors")
        print("Command: python " + " ".join(sys.argv), flush=True)
        results = {}
        for name in sorted(args.models, key=["TransformerStudent", "L2BT"].index):
            results[name] = run_worker("users", name, args, workdir)
            print(f"{name}: fit {results[name]['fit_s']:.1f} s, test {results[name]['test_s']:.1f} s", flush=True)
        if args.json:
            args.json.write_text(json.dumps({"args": vars(args), "results": results}, default=str, indent=1))
        print_users_tables(results, args)


def main() -> None:
    args = parse_args()
    if args.worker:
        workers = {"train": train_worker, "inference": inference_worker, "users": users_worker}
        result = workers[args.worker](args, args.workdir)
        print(RESULT_PREFIX + json.dumps(result))
        return
    if args.as_users_run:
        users_main(args)
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
        for name in sorted(args.models, key=["TransformerStudent", "L2BT"].index):
            results[name] = run_worker("train", name, args, workdir)
            print(f"{name}: fit took {results[name]['fit_s']:.1f} s", flush=True)
        print_training_table(results, args)
        print_inference_table(run_worker("inference", None, args, workdir))


if __name__ == "__main__":
    main()
