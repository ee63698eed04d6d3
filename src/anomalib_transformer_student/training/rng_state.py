"""Random-number-generator state saved in checkpoints, so that a resumed run repeats the uninterrupted one.

Lightning restores the students, the optimiser and the epoch counters from a checkpoint, but
not the global random generators. anomalib's training dataloader shuffles with a
``RandomSampler`` that draws its seed from torch's global generator at the start of every
epoch, so a run resumed after epoch ``k`` would see other batches than an uninterrupted run
and end with other weights. Saving the generators' state with each checkpoint and restoring
it on resume makes the two runs identical (on CPU, bit for bit): :class:`RandomGeneratorState`, a
callback that ``TransformerStudent.configure_callbacks`` adds, keeps that state with the checkpoint
(``checkpoint["callbacks"]``) through Lightning's ``state_dict``/``load_state_dict``.

The state is stored as tensors, integers and tuples only, so that checkpoints still load with
``torch.load(weights_only=True)``, as anomalib loads them.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from lightning.pytorch import Callback

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer


def capture_rng_state() -> dict[str, Any]:
    """The state of Python's, NumPy's, torch's and (when present) every CUDA device's global generator.

    Example:
        >>> state = capture_rng_state()
        >>> first = torch.rand(3)
        >>> restore_rng_state(state)
        >>> torch.equal(first, torch.rand(3))
        True
    """
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global generators to a state from :func:`capture_rng_state`.

    CUDA states are restored when the number of visible devices is the same as when they were saved.
    """
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class RandomGeneratorState(Callback):
    """Save the global random generators' state with every checkpoint; restore it when a fit resumes from one.

    Only a resumed fit restores it: testing or predicting from a checkpoint leaves the generators alone.
    The callback has no settings, so when Lightning puts the module's instance in the place of one given to
    the trainer (it does so for callbacks of the same type), nothing is lost.

    Example:
        >>> callback = RandomGeneratorState()
        >>> state = callback.state_dict()
        >>> first = torch.rand(3)
        >>> callback._fitting = True
        >>> callback.load_state_dict(state)
        >>> torch.equal(first, torch.rand(3))
        True
    """

    def __init__(self) -> None:
        self._fitting = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Note whether this run fits (Lightning sets up before it restores a checkpoint)."""
        del trainer, pl_module
        self._fitting = stage == "fit"

    def state_dict(self) -> dict[str, Any]:
        """The generators' state now (see :func:`capture_rng_state`)."""
        return capture_rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the generators when a fit resumes."""
        if self._fitting:
            restore_rng_state(state_dict)


__all__ = ["RandomGeneratorState", "capture_rng_state", "restore_rng_state"]
