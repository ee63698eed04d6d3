"""Random-number-generator state saved in checkpoints, so that a resumed run repeats the uninterrupted one.

Lightning restores the students, the optimiser and the epoch counters from a checkpoint, but
not the global random generators. anomalib's training dataloader shuffles with a
``RandomSampler`` that draws its seed from torch's global generator at the start of every
epoch, so a run resumed after epoch ``k`` would see other batches than an uninterrupted run
and end with other weights. Saving the generators' state with each checkpoint and restoring
it on resume makes the two runs identical (on CPU, bit for bit).

The state is stored as tensors, integers and tuples only, so that checkpoints still load with
``torch.load(weights_only=True)``, as anomalib loads them.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


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


__all__ = ["capture_rng_state", "restore_rng_state"]
