"""The feature cache's options, checked once: :class:`CacheSettings`.

A checkpoint describes the model, not the machine that trained it: only ``enabled`` and ``dtype``
(:data:`MODEL_KEYS`) are saved with it, and while :func:`loading_checkpoint` is active any other key a
checkpoint holds (a folder, budgets: possibly crafted) is dropped, so the loading machine's defaults apply.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

NUMPY_DTYPES: dict[str, type[np.floating]] = {"float16": np.float16, "float32": np.float32}
MODEL_KEYS = ("enabled", "dtype")
_FROM_CHECKPOINT: ContextVar[bool] = ContextVar("feature_cache_from_checkpoint", default=False)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/anomalib_transformer_student/teacher_features`` (``~/.cache/...`` by default)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "anomalib_transformer_student" / "teacher_features"


def from_checkpoint() -> bool:
    """Whether :func:`loading_checkpoint` is active."""
    return _FROM_CHECKPOINT.get()


@contextlib.contextmanager
def loading_checkpoint() -> Iterator[None]:
    """While active, :meth:`CacheSettings.of` keeps only the :data:`MODEL_KEYS` of what it is given."""
    token = _FROM_CHECKPOINT.set(True)
    try:
        yield
    finally:
        _FROM_CHECKPOINT.reset(token)


def _budget(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and 0 <= value < 2**40


@dataclass(frozen=True)
class CacheSettings:
    """``TransformerStudent``'s ``feature_cache`` options.

    ``enabled``: ``None`` caches unless the stage's images are augmented, ``True`` even then, ``False`` never;
    ``dtype`` of training entries (evaluation's are float32); ``dir``, where each run makes its folder (default
    :func:`default_cache_dir`); ``memory_budget_mb`` per process; ``disk_budget_mb`` for the whole folder.

    Example:
        >>> CacheSettings.of(False).enabled, CacheSettings.of({"dtype": "float32"}).dtype
        (False, 'float32')
        >>> with loading_checkpoint():
        ...     CacheSettings.of({"dir": "/home", "disk_budget_mb": 0}).dir is None
        True
    """

    enabled: bool | None = None
    dtype: Literal["float16", "float32"] = "float16"
    dir: str | None = None
    memory_budget_mb: float = 4096.0
    disk_budget_mb: float = 20480.0

    def __post_init__(self) -> None:
        if self.enabled not in (None, True, False) or self.dtype not in NUMPY_DTYPES:
            name, wanted = (
                ("enabled", "true, false or null") if self.dtype in NUMPY_DTYPES else ("dtype", list(NUMPY_DTYPES))
            )
            msg = f"feature_cache.{name} must be one of {wanted}, got {getattr(self, name)!r}."
            raise ValueError(msg)
        for name in ("memory_budget_mb", "disk_budget_mb"):
            if not _budget(getattr(self, name)):
                msg = f"feature_cache.{name} must be a number >= 0, got {getattr(self, name)!r}."
                raise ValueError(msg)

    @classmethod
    def of(cls, value: CacheSettings | Mapping[str, Any] | bool | None) -> CacheSettings:
        """The settings from an instance, a dict of its options, or ``enabled`` alone (a bool or ``None``)."""
        if value is None or isinstance(value, bool):
            return cls(enabled=value)
        if isinstance(value, cls):
            return cls(value.enabled, value.dtype) if from_checkpoint() else value
        if not isinstance(value, Mapping):
            msg = f"feature_cache must be a CacheSettings, a dict of its options or a bool, got {value!r}."
            raise TypeError(msg)
        if from_checkpoint():
            return cls(**{key: value[key] for key in MODEL_KEYS if key in value})
        known = [field.name for field in fields(cls)]
        unknown = sorted(set(value) - set(known))
        if unknown:
            msg = f"feature_cache has no option {unknown}; its options are {known}."
            raise ValueError(msg)
        return cls(**value)

    def model_part(self) -> dict[str, Any]:
        """What a checkpoint keeps: the :data:`MODEL_KEYS`."""
        return {key: getattr(self, key) for key in MODEL_KEYS}

    @property
    def directory(self) -> Path:
        """The cache folder."""
        return Path(self.dir).expanduser() if self.dir else default_cache_dir()
