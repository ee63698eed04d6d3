"""Learning to Be a Transformer to Pinpoint Anomalies: a high-resolution Teacher-Student model for anomalib.

The public names are loaded on first use (PEP 562), so that importing the package, or running
its console script, does not import torch, timm or anomalib.

Example:
    >>> from anomalib_transformer_student import TransformerStudent
    >>> model = TransformerStudent(pretrained=False, image_size=224)
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .model import TransformerStudent, TransformerStudentModel

# Public name -> module that defines it.
_PUBLIC = {
    "TransformerStudent": "anomalib_transformer_student.model",
    "TransformerStudentModel": "anomalib_transformer_student.model",
}

__all__ = ["TransformerStudent", "TransformerStudentModel"]


def __getattr__(name: str) -> Any:
    """Import a public name's module the first time the name is asked for."""
    if name not in _PUBLIC:
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
