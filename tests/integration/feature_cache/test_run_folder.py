"""Processes sharing one cache folder: two trainings at once, and a writer killed by SIGKILL at any moment.

Run as a script, this file is one of the two trainings (see :func:`main`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import Callback, seed_everything

from anomalib_transformer_student import TransformerStudent
from anomalib_transformer_student.apps.demo_data import DemoDatasetSpec, generate_demo_dataset
from anomalib_transformer_student.feature_cache.run_folder import CacheRoot

CATEGORIES = ("brick", "grass")
EPOCHS = 3
N_TRAIN = 6


class Barrier(Callback):
    """Hold training until every process has reached it, so that the caches open (and fill) at the same time."""

    def __init__(self, folder: Path, name: str, names: Sequence[str]) -> None:
        self.folder, self.name, self.names = folder, name, names

    def on_train_start(self, trainer, pl_module) -> None:
        (self.folder / self.name).touch()
        deadline = time.monotonic() + 120
        while not all((self.folder / name).exists() for name in self.names):
            assert time.monotonic() < deadline, "the other training never started"
            time.sleep(0.005)


def fit(root: Path, category: str, workdir: Path, cache_dir: Path | None, barrier: Barrier | None = None) -> dict:
    """Train on ``category`` with the cache in ``cache_dir`` (or without a cache); return the students' weights."""
    seed_everything(0)
    model = TransformerStudent(
        teacher="vit_small_patch14_dinov2",
        pretrained=False,
        image_size=56,
        feature_cache={
            "enabled": cache_dir is not None,
            "dir": None if cache_dir is None else str(cache_dir),
            "dtype": "float32",
            "memory_budget_mb": 0,
        },
    )
    engine = Engine(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        check_val_every_n_epoch=EPOCHS + 1,
        num_sanity_val_steps=0,
        default_root_dir=workdir,
        callbacks=[] if barrier is None else [barrier],
    )
    datamodule = MVTecAD(root=root, category=category, train_batch_size=2, eval_batch_size=2, num_workers=0)
    engine.fit(model, datamodule=datamodule)
    return {name: value.clone() for name, value in model.model.state_dict().items() if "student" in name}


def main(root: str, category: str, workdir: str, cache_dir: str, barrier: str) -> None:
    """One of the concurrent trainings: fit, then save the students' weights to ``workdir/students.pt``."""
    weights = fit(Path(root), category, Path(workdir), Path(cache_dir), Barrier(Path(barrier), category, CATEGORIES))
    torch.save(weights, Path(workdir) / "students.pt")


def test_two_trainings_at_once_share_the_cache_folder_safely(tmp_path: Path) -> None:
    spec = DemoDatasetSpec(categories=CATEGORIES, image_size=64, n_train=N_TRAIN, n_test_good=1, n_test_per_defect=1)
    root = generate_demo_dataset(tmp_path / "data", spec)
    cache, barrier = tmp_path / "cache", tmp_path / "barrier"
    barrier.mkdir()
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    trainings = {}
    for category in CATEGORIES:
        workdir = tmp_path / category
        workdir.mkdir()
        command = [sys.executable, __file__, str(root), category, str(workdir), str(cache), str(barrier)]
        trainings[category] = subprocess.Popen(
            command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    for training in trainings.values():
        output, _ = training.communicate(timeout=300)
        assert training.returncode == 0, output[-3000:]

    # Each trained on its own features: its weights agree with an uncached run of its category to 1e-5. The
    # float32 cache hands back what the teacher computed in epoch 1; the uncached run recomputes it on other
    # batches, whose float32 sums round differently, and Adam's normalised steps carry that to about 1e-6 on a
    # few weights (3e-7 measured in one process, 1e-6 across processes). Features of another image move
    # weights by 1e-4 and more (lr per step; brick and grass end 2e-3 apart).
    for category in CATEGORIES:
        weights = torch.load(tmp_path / category / "students.pt")
        reference = fit(root, category, tmp_path / f"{category}-uncached", cache_dir=None)
        torch.testing.assert_close(weights, reference, atol=1e-5, rtol=0, msg=lambda text, c=category: f"{c}: {text}")

    # Each removed its own run folder at its end.
    assert [path.name for path in cache.iterdir()] == [".tsfc-budget.lock"]


WRITER = """
import sys, torch
from anomalib_transformer_student.feature_cache.run_folder import CacheRoot
from anomalib_transformer_student.feature_cache.store import FeatureStore
root = CacheRoot(sys.argv[1])
store = FeatureStore(root, root.create_run({"purpose": "training"}), memory_budget_mb=0)
print("open", flush=True)
index = 0
while True:
    store.put(f"k{index}", torch.randn(2, 64, 96))
    index += 1
"""


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.3])
def test_a_writer_killed_by_sigkill_leaves_a_folder_the_next_run_removes(tmp_path: Path, delay: float) -> None:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], env=environment, stdout=subprocess.PIPE)
    assert writer.stdout.readline().strip() == b"open"
    time.sleep(delay)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    (killed,) = tmp_path.glob("tsfc-*")
    root = CacheRoot(tmp_path)
    run = root.create_run({"purpose": "training"})
    assert [path.name for path in tmp_path.glob("tsfc-*")] == [run.name]
    assert not killed.exists()
    run.remove()
    root.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
