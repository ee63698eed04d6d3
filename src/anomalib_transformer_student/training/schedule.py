"""The paper's training schedule by default: 50 epochs, and a note when the batch size is not the paper's 4.

Without ``--trainer.max_epochs`` (or ``Engine(max_epochs=...)``) Lightning trains 1000 epochs, and a
model cannot see whether the user set the trainer's limit: anomalib's Engine lets a model's
``trainer_arguments`` override the user's options. So the default is applied when the fit starts,
where Lightning's own default is visible: a fit whose epoch limit is Lightning's default of 1000
(no step or time limit) trains the paper's 50 epochs instead.

Precedence, highest first: the model's ``max_epochs`` (``--model.max_epochs``, imposed on the
trainer), the trainer's (``--trainer.max_epochs``), the paper's 50. Since an explicit
``--trainer.max_epochs 1000`` cannot be told from no setting, pass ``--model.max_epochs 1000`` to
train that long.

:class:`PaperSchedule`, a callback that ``TransformerStudent.configure_callbacks`` adds, applies both.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from lightning.pytorch import Callback

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer

logger = logging.getLogger(__name__)

PAPER_EPOCHS = 50
PAPER_BATCH_SIZE = 4
# What Lightning trains when neither max_epochs, max_steps nor max_time is given.
LIGHTNING_DEFAULT_EPOCHS = 1000


def apply_paper_epochs(trainer: Trainer) -> bool:
    """Train :data:`PAPER_EPOCHS` if the trainer's epoch limit is only Lightning's default; return whether it did.

    Call it when fitting starts (Lightning has resolved its limits by then, and the loop has not run).
    """
    loop = trainer.fit_loop
    if loop.max_epochs != LIGHTNING_DEFAULT_EPOCHS or trainer.max_steps != -1:
        return False
    loop.max_epochs = PAPER_EPOCHS
    logger.info(
        "No epoch count was given: training the paper's %d epochs (not Lightning's %d). Set another with "
        "--trainer.max_epochs N or --model.max_epochs N (the model's setting wins).",
        PAPER_EPOCHS,
        LIGHTNING_DEFAULT_EPOCHS,
    )
    return True


def note_batch_size(batch_size: int | None) -> None:
    """Log once per fit when the training batch size is not the paper's 4 (MVTec AD's default is 32)."""
    if batch_size is not None and batch_size != PAPER_BATCH_SIZE:
        logger.info(
            "Training batch size is %d; the paper trains with %d (--data.train_batch_size %d). Fewer, larger "
            "batches mean fewer optimiser steps per epoch for the same 50 epochs.",
            batch_size,
            PAPER_BATCH_SIZE,
            PAPER_BATCH_SIZE,
        )


class PaperSchedule(Callback):
    """The paper's 50 epochs unless an epoch count was given, and a note when the batch size is not its 4.

    The callback has no settings, so when Lightning puts the module's instance in the place of one given to
    the trainer (it does so for callbacks of the same type), nothing is lost.

    Example:
        >>> from types import SimpleNamespace
        >>> trainer = SimpleNamespace(fit_loop=SimpleNamespace(max_epochs=LIGHTNING_DEFAULT_EPOCHS), max_steps=-1)
        >>> PaperSchedule().on_fit_start(trainer, None)
        >>> trainer.fit_loop.max_epochs
        50
    """

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Train :data:`PAPER_EPOCHS` if the trainer's epoch limit is only Lightning's default."""
        del pl_module
        apply_paper_epochs(trainer)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Note a training batch size other than the paper's."""
        del pl_module
        note_batch_size(getattr(trainer.train_dataloader, "batch_size", None))


__all__ = [
    "LIGHTNING_DEFAULT_EPOCHS",
    "PAPER_BATCH_SIZE",
    "PAPER_EPOCHS",
    "PaperSchedule",
    "apply_paper_epochs",
    "note_batch_size",
]
