"""The one table of dtype names ``teacher_precision`` accepts (``"float32"`` runs no autocast).

Example:
    >>> DTYPES["bfloat16"]
    torch.bfloat16
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

__all__ = ["DTYPES"]
