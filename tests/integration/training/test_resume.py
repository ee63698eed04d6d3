"""Interrupted training loses nothing, and seeded training is reproducible on CPU.

A run killed after an epoch (an exception raised in a callback) and resumed from its
``last.ckpt`` must end with the same student weights as an uninterrupted run of the same
length, with the teacher-feature cache on or off. The training dataloader shuffles, so this
needs the random generators' state saved in the checkpoint and restored on resume.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib.callbacks.checkpoint import ModelCheckpoint
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from anomalib_transformer_student import TransformerStudent

from ...factories import Interrupted, callbacks_with_interrupt, make_datamodule, make_engine, small_model

SEED = 7
EPOCHS = 3
STOP_AT_EPOCH = 1  # killed when epoch 1 starts: epoch 0 is in the checkpoint, epochs 1 and 2 come after resuming


def _model(workdir: Path, feature_cache: bool) -> TransformerStudent:
    # layers (1, 3): a 4-block teacher, cheap
    return small_model(layers=(1, 3), feature_cache={"enabled": feature_cache, "dir": str(workdir / "cache")})


def _fit(
    root: Path,
    workdir: Path,
    feature_cache: bool,
    epochs: int = EPOCHS,
    interrupt_at: int | None = None,
    ckpt_path: Path | None = None,
) -> tuple[TransformerStudent, Engine]:
    """A seeded run as a user would start it (seed, datamodule, model, engine), optionally interrupted or resumed."""
    seed_everything(SEED)
    datamodule = make_datamodule(root, batch_size=3, eval_batch_size=4)
    model = _model(workdir, feature_cache)
    checkpoint = ModelCheckpoint(dirpath=workdir / "checkpoints", save_last=True)
    engine = make_engine(workdir, max_epochs=epochs, callbacks=callbacks_with_interrupt([checkpoint], interrupt_at))
    engine.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return model, engine


def _students(model: TransformerStudent) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value.detach().clone()
        for name in ("forward_student", "backward_student")
        for key, value in getattr(model.model, name).state_dict().items()
    }


@pytest.mark.slow
@pytest.mark.parametrize("feature_cache", [False, True], ids=["cache-off", "cache-on"])
def test_interrupted_and_resumed_run_equals_uninterrupted(demo_root: Path, tmp_path: Path, feature_cache: bool) -> None:
    reference, reference_engine = _fit(demo_root, tmp_path / "uninterrupted", feature_cache)

    workdir = tmp_path / "interrupted"
    with pytest.raises(Interrupted):
        _fit(demo_root, workdir, feature_cache, interrupt_at=STOP_AT_EPOCH)
    last = workdir / "checkpoints" / "last.ckpt"
    assert last.exists()
    resumed, resumed_engine = _fit(demo_root, workdir, feature_cache, ckpt_path=last)

    assert resumed_engine.trainer.global_step == reference_engine.trainer.global_step > 0
    expected, actual = _students(reference), _students(resumed)
    for name, value in expected.items():
        torch.testing.assert_close(
            actual[name], value, rtol=0, atol=1e-6, msg=lambda text, name=name: f"{name}: {text}"
        )


@pytest.mark.slow
def test_seeded_runs_give_identical_students_on_cpu(demo_root: Path, tmp_path: Path) -> None:
    first, _ = _fit(demo_root, tmp_path / "first", feature_cache=False, epochs=1)
    second, _ = _fit(demo_root, tmp_path / "second", feature_cache=False, epochs=1)
    seed_everything(SEED)
    initial = _students(_model(tmp_path / "initial", feature_cache=False))
    trained, repeated = _students(first), _students(second)
    for name, value in trained.items():
        assert torch.equal(repeated[name], value), name
        assert not torch.equal(initial[name], value), f"{name} was not trained"
