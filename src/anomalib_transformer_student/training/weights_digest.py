"""One digest of a set of tensors (the teacher's weights), and one memo of it per model.

The feature caches' fingerprints and the checkpoints that leave the teacher out both name the
teacher's weights by this digest; the memo spares hashing the frozen teacher (about 350 MB for
ViT-B) at every epoch and every validation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of tensors by name, shape, dtype and value, in key order.

    Example:
        >>> state_digest({"w": torch.zeros(2)}) == state_digest({"w": torch.zeros(2)})
        True
        >>> state_digest({"w": torch.zeros(2)}) == state_digest({"w": torch.ones(2)})
        False
    """
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class DigestMemo:
    """:func:`state_digest`, taken again only when the tensors changed.

    The tensors' storage and version counter (bumped by every in-place change, ``load_state_dict``
    among them) tell whether the state is still the one last hashed. Keep one memo per model.

    Example:
        >>> memo, weights = DigestMemo(), {"w": torch.zeros(2)}
        >>> first = memo(weights)
        >>> memo(weights) == first, memo.hashed
        (True, 1)
        >>> _ = weights["w"].add_(1)
        >>> memo(weights) == first, memo.hashed
        (False, 2)
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._digest = ""
        self.hashed = 0

    def __call__(self, state: Mapping[str, torch.Tensor]) -> str:
        """The digest of ``state``."""
        key = tuple(
            (name, tensor.data_ptr(), tensor._version, tuple(tensor.shape), tensor.dtype, str(tensor.device))
            for name, tensor in state.items()
        )
        if key != self._key:
            self._key, self._digest = key, state_digest(state)
            self.hashed += 1
        return self._digest
