"""The one table of dtype names that settings accept, and what each means for torch and NumPy.

``teacher_precision`` takes any of them (``"float32"`` runs no autocast), ``feature_cache.dtype`` those a
cache file can store (:data:`CACHE_DTYPES`: NumPy has no bfloat16).

Example:
    >>> DTYPES["bfloat16"]
    torch.bfloat16
    >>> sorted(CACHE_DTYPES)
    ['float16', 'float32']
"""

from __future__ import annotations

import numpy as np
import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The NumPy type of each torch dtype that files store (bfloat16 has none).
NUMPY_DTYPES: dict[torch.dtype, type[np.floating]] = {torch.float16: np.float16, torch.float32: np.float32}
# ``feature_cache.dtype``'s choices: the dtypes a cache file can store.
CACHE_DTYPES: dict[str, torch.dtype] = {name: dtype for name, dtype in DTYPES.items() if dtype in NUMPY_DTYPES}

__all__ = ["CACHE_DTYPES", "DTYPES", "NUMPY_DTYPES"]
