"""Factories shared by the tests: the small model, the engine, the datamodule, a teacher-call counter, an interrupt.

Each factory holds the settings most tests share; a test passes only what it changes, so that what differs
from one test to the next is what the test is about.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import Callback, Trainer

from anomalib_transformer_student import TransformerStudent

from .helpers import SMALL_TEACHER

# Quiet, single-process CPU runs that start training at once (no sanity validation).
ENGINE_DEFAULTS: dict[str, Any] = {
    "accelerator": "cpu",
    "devices": 1,
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
}


def small_model(image_size: int = 56, **arguments: Any) -> TransformerStudent:
    """A TransformerStudent on the small random DINOv2 teacher (no download); ``arguments`` as the constructor's."""
    return TransformerStudent(**{"teacher": SMALL_TEACHER, "pretrained": False, "image_size": image_size, **arguments})


def make_engine(root: Path, max_epochs: int = 1, **arguments: Any) -> Engine:
    """An anomalib ``Engine`` writing under ``root``: :data:`ENGINE_DEFAULTS`, overridden by ``arguments``."""
    return Engine(max_epochs=max_epochs, default_root_dir=root, **{**ENGINE_DEFAULTS, **arguments})


def make_trainer(**arguments: Any) -> Trainer:
    """A bare Lightning ``Trainer`` (no anomalib callbacks, no checkpoints): :data:`ENGINE_DEFAULTS`, ``arguments``."""
    return Trainer(**{**ENGINE_DEFAULTS, "enable_checkpointing": False, **arguments})


def make_datamodule(
    root: Path, category: str = "brick", batch_size: int = 4, eval_batch_size: int | None = None, **arguments: Any
) -> MVTecAD:
    """anomalib's ``MVTecAD`` on a generated tree, in this process (no workers); eval batches as train unless given."""
    return MVTecAD(
        root=root,
        category=category,
        train_batch_size=batch_size,
        eval_batch_size=batch_size if eval_batch_size is None else eval_batch_size,
        num_workers=0,
        **arguments,
    )


class TeacherCalls:
    """Counts what reaches a model's teacher: the batch size of every call (``batches``) and their sum (``images``).

    A forward hook on ``model.model.teacher``, picklable with the model (unlike a lambda). :meth:`remove` takes it
    off (an export traces the teacher, and a hook reading the batch size would fix it in the graph); as a context
    manager it is removed on exit.
    """

    def __init__(self, model: TransformerStudent) -> None:
        self.batches: list[int] = []
        self._handle = model.model.teacher.register_forward_hook(self._record)

    def _record(self, _module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], _outputs: object) -> None:
        self.batches.append(len(inputs[0]))

    @property
    def images(self) -> int:
        """Images (or tiles) the teacher has seen so far."""
        return sum(self.batches)

    def reset(self) -> None:
        """Count from zero again."""
        self.batches.clear()

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> TeacherCalls:
        return self

    def __exit__(self, *_exception: object) -> None:
        self.remove()


class Interrupted(Exception):
    """Stands for a killed process."""


class InterruptAtEpoch(Callback):
    """Raise :class:`Interrupted` when the given epoch starts, after the previous epoch's checkpoint was written."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: Trainer, pl_module: TransformerStudent) -> None:
        if trainer.current_epoch == self.epoch:
            raise Interrupted


def callbacks_with_interrupt(callbacks: Sequence[Callback], interrupt_at: int | None) -> list[Callback]:
    """``callbacks``, followed by an :class:`InterruptAtEpoch` when ``interrupt_at`` is given."""
    return [*callbacks, *([] if interrupt_at is None else [InterruptAtEpoch(interrupt_at)])]


@dataclass(frozen=True)
class Trained:
    """A model fitted once for the tests that only read it: its engine, datamodule and a saved checkpoint."""

    engine: Engine
    model: TransformerStudent
    datamodule: MVTecAD
    checkpoint: Path


def train_small(data_root: Path, workdir: Path, epochs: int = 2, image_size: int = 112) -> Trained:
    """Fit :func:`small_model` on ``data_root``'s brick (seeded) and save its checkpoint alone in a folder."""
    torch.manual_seed(0)
    datamodule = make_datamodule(data_root)
    model = small_model(image_size=image_size)
    engine = make_engine(workdir / "results", max_epochs=epochs)
    engine.fit(model, datamodule=datamodule)
    checkpoint = workdir / "checkpoint" / "brick.ckpt"
    checkpoint.parent.mkdir(parents=True)
    engine.trainer.save_checkpoint(checkpoint)
    return Trained(engine, model, datamodule, checkpoint)
