"""One optimiser step over a batch too large to backpropagate at once, a chunk at a time.

With tiling, a batch of images is many tiles, and the teacher's and students' tokens of all of them
would not fit in memory together. Under Lightning's manual optimisation, :func:`step_in_chunks`
backpropagates each chunk's loss, weighted by its share of the batch, and steps once: the gradients
are those of one loss over the whole batch, with one chunk's tokens alive at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from lightning.pytorch import LightningModule


def chunks(count: int, size: int | None) -> list[range]:
    """Positions ``0 .. count - 1`` in consecutive chunks of at most ``size`` (``None``: one chunk).

    A batch's tiles pass through the teacher and the students chunk by chunk, so that only one
    chunk's tokens are alive at a time.

    Example:
        >>> chunks(10, 4)
        [range(0, 4), range(4, 8), range(8, 10)]
        >>> chunks(3, None)
        [range(0, 3)]
    """
    size = count if size is None else size
    return [range(start, min(start + size, count)) for start in range(0, count, max(size, 1))]


def step_in_chunks(
    module: LightningModule, count: int, chunk_size: int | None, loss_of: Callable[[range], torch.Tensor]
) -> torch.Tensor:
    """Zero the gradients, backpropagate ``loss_of(part)`` for each chunk of ``count`` entries, step once.

    Args:
        module: A Lightning module with ``automatic_optimization = False`` and one optimiser.
        count: Entries (tiles) in the batch.
        chunk_size: Entries per chunk; ``None`` for all at once.
        loss_of: The mean loss of the entries ``part`` (a range of positions in the batch).

    Returns:
        The batch's mean loss, detached.
    """
    optimizer = module.optimizers()
    optimizer.zero_grad()
    total = torch.zeros((), device=module.device)
    for part in chunks(count, chunk_size):
        loss = len(part) / count * loss_of(part)
        module.manual_backward(loss)
        total += loss.detach()
    optimizer.step()
    return total


__all__ = ["chunks", "step_in_chunks"]
