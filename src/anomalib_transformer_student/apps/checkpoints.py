"""Loading a user's checkpoint in the ``transformer-student`` commands, with one clear error when it cannot be.

torch refuses a file that is not a checkpoint, a truncated one and one whose pickle asks for code
(``weights_only`` loading) with ``UnpicklingError`` or ``RuntimeError`` and advice meant for programmers;
:func:`load_model` turns these into :class:`CheckpointLoadError`, which the command line reports in one line
with exit status 2.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..model import TransformerStudent


class CheckpointLoadError(ValueError):
    """A checkpoint file that cannot be loaded as a TransformerStudent (not a checkpoint, truncated, refused)."""


def _reason(error: BaseException) -> str:
    if isinstance(error, pickle.UnpicklingError):
        return "not a PyTorch checkpoint, or it holds objects that torch's safe loader refuses"
    if isinstance(error, EOFError):
        return "the file ends early (truncated)"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first_line[:200]}"


def load_model(path: str | os.PathLike[str], **kwargs: Any) -> TransformerStudent:
    """``TransformerStudent.load_from_checkpoint(path, **kwargs)``, an unloadable file raising one clear error.

    The package's own errors (a teacher mismatch, missing weights) and ``OSError`` pass unchanged.

    Raises:
        CheckpointLoadError: ``path`` is not a loadable checkpoint; the message names the file and why.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile(suffix=".ckpt") as handle:
        ...     _ = handle.write(b"not a checkpoint") and handle.flush()
        ...     load_model(handle.name)
        Traceback (most recent call last):
        ...
        anomalib_transformer_student.apps.checkpoints.CheckpointLoadError: Cannot load checkpoint '...': not a ...
    """
    from ..model import TransformerStudent
    from .cli import is_user_error

    failure: Exception | None = None
    with warnings.catch_warnings(record=True) as noticed:  # torch's notes on a refused file: the error says it all
        warnings.simplefilter("always")
        try:
            model = TransformerStudent.load_from_checkpoint(path, **{"weights_only": True, **kwargs})
        except Exception as error:
            failure = error
    if failure is None:
        for notice in noticed:
            warnings.warn_explicit(notice.message, notice.category, notice.filename, notice.lineno)
        return model
    if is_user_error(failure) and not isinstance(failure, pickle.UnpicklingError):
        raise failure
    msg = (
        f"Cannot load checkpoint '{Path(path)}': {_reason(failure)}. Give a checkpoint that anomalib wrote for "
        "TransformerStudent (anomalib train / Engine.fit: weights/lightning/model.ckpt)."
    )
    raise CheckpointLoadError(msg) from failure


__all__ = ["CheckpointLoadError", "load_model"]
