"""Two-process training (DDP, gloo on CPU) through the anomalib CLI, with the teacher-feature cache on."""

from __future__ import annotations

from pathlib import Path

import pytest
from anomalib.data import MVTecAD
from lightning.pytorch import seed_everything

from anomalib_transformer_student import TransformerStudent
from anomalib_transformer_student.apps.demo_data import DemoDatasetSpec, generate_demo_dataset
from anomalib_transformer_student.training.feature_cache import image_key

from ...factories import make_datamodule, make_engine
from ...helpers import checkpoints, data_args, listed_keys, run_cli

pytestmark = pytest.mark.slow

N_TRAIN = 8
MODEL = {"teacher": "vit_small_patch14_dinov2", "pretrained": False, "image_size": 112}


def fit_with_two_processes(dataset: Path, workdir: Path, model: dict | None = None) -> tuple[Path, str]:
    """Train three epochs on two CPU processes with the anomalib CLI (cached features go to disk)."""
    args = [
        "fit",
        "--model", "TransformerStudent",
        *(f"--model.{name}={str(value).lower()}" for name, value in (model or MODEL).items()),
        "--model.feature_cache.dir", str(workdir / "cache"),
        *data_args(dataset),
        "--data.train_batch_size", "2",
        "--trainer.max_epochs", "3",
        "--trainer.accelerator", "cpu",
        "--trainer.strategy", "ddp",
        "--trainer.devices", "2",
        "--seed_everything", "0",
        "--default_root_dir", str(workdir / "results"),
    ]  # fmt: skip
    finished = run_cli(args, cwd=workdir, timeout=300)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    (checkpoint,) = checkpoints(workdir / "results")
    return checkpoint, finished.stdout + finished.stderr


def datamodule(dataset: Path) -> MVTecAD:
    """In this process, the batches of the two-process run."""
    return make_datamodule(dataset, batch_size=2, eval_batch_size=4)


def test_two_processes_pass_each_image_through_the_teacher_once_and_test_like_one(tmp_path: Path) -> None:
    spec = DemoDatasetSpec(categories=("brick",), image_size=96, n_train=N_TRAIN, n_test_good=2, n_test_per_defect=2)
    dataset = generate_demo_dataset(tmp_path / "data", spec)
    (tmp_path / "ddp").mkdir()

    ddp_checkpoint, output = fit_with_two_processes(dataset, tmp_path / "ddp")
    assert "distributed_backend=gloo" in output
    assert "All distributed processes registered" in output

    # Each process cached the images its shard gave it, in its own file; together they cover the set, each image
    # once: Lightning's sampler reshuffles the shards every epoch, and a process finds the images another one
    # computed in that one's file (every computed image is stored, so two entries would mean two teacher passes).
    # The other fingerprint folder holds the evaluation images' features.
    expected = {image_key(path) for path in (dataset / "brick" / "train" / "good").iterdir()}
    folders = sorted((tmp_path / "ddp" / "cache").iterdir())
    indexes = [{rank: listed_keys(folder / f"rank{rank}.log") for rank in (0, 1)} for folder in folders]
    (training,) = [index for index in indexes if index[0] | index[1] <= expected]
    assert all(training.values())
    assert training[0] | training[1] == expected
    assert len(training[0]) + len(training[1]) == N_TRAIN
    assert "2 processes train together: cached features go to disk" in output

    (ddp_metrics,) = make_engine(tmp_path / "ddp").test(
        TransformerStudent(**MODEL),
        datamodule=datamodule(dataset),
        ckpt_path=ddp_checkpoint,
    )

    seed_everything(0)
    single = TransformerStudent(**MODEL, feature_cache={"dir": str(tmp_path / "single")})
    single_engine = make_engine(tmp_path / "single", max_epochs=3)
    single_engine.fit(single, datamodule=datamodule(dataset))
    (single_metrics,) = single_engine.test(single, datamodule=datamodule(dataset))

    assert ddp_metrics.keys() == single_metrics.keys()
    # Pixel AUROC over some 70 000 pixels is steady; image AUROC over 8 test images moves in steps of 1/12.
    assert abs(ddp_metrics["pixel_AUROC"] - single_metrics["pixel_AUROC"]) < 0.02, (ddp_metrics, single_metrics)


def test_a_dinov3_teacher_trains_on_two_processes(tmp_path: Path) -> None:
    """DINOv3 (rotary position embeddings, 16-px patches) in DDP: every training image cached once across ranks."""
    spec = DemoDatasetSpec(categories=("brick",), image_size=64, n_train=4, n_test_good=1, n_test_per_defect=1)
    dataset = generate_demo_dataset(tmp_path / "data", spec)
    (tmp_path / "ddp").mkdir()
    dinov3 = {"teacher": "vit_small_patch16_dinov3", "pretrained": False, "image_size": 64}
    _, output = fit_with_two_processes(dataset, tmp_path / "ddp", model=dinov3)
    assert "All distributed processes registered" in output
    expected = {image_key(path) for path in (dataset / "brick" / "train" / "good").iterdir()}
    cached = [
        listed_keys(folder / f"rank{rank}.log") for folder in (tmp_path / "ddp" / "cache").iterdir() for rank in (0, 1)
    ]
    training = [entries for entries in cached if entries and entries <= expected]
    assert set().union(*training) == expected
    assert sum(len(entries) for entries in training) == len(expected)
