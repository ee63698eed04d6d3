"""Checks of user settings that the model and training share.

:func:`positive_int` is the one check of a count (a batch size, a number of tiles), :func:`one_of` of a choice
among names (a dtype, a purpose), :func:`settings_group` of a group of options (a frozen dataclass, given as
an instance, a mapping of its fields or ``None``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

Group = TypeVar("Group")


def positive_int(name: str, value: Any, example: int = 8) -> int:
    """``value`` if it is a positive integer (``bool`` is not), else a ``ValueError`` naming the setting ``name``.

    Example:
        >>> positive_int("tile_batch_size", 4)
        4
        >>> positive_int("tile_batch_size", 0)
        Traceback (most recent call last):
        ValueError: tile_batch_size must be a positive integer, got 0; e.g. tile_batch_size=8.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        msg = f"{name} must be a positive integer, got {value!r}; e.g. {name}={example}."
        raise ValueError(msg)
    return value


def one_of(name: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``, else a ``ValueError`` naming the setting ``name`` and the choices.

    Example:
        >>> one_of("dtype", "float32", ("float16", "float32"))
        'float32'
        >>> one_of("dtype", "int8", ("float16", "float32"))
        Traceback (most recent call last):
        ValueError: dtype must be one of ['float16', 'float32'], got 'int8'.
    """
    choices = list(choices)
    if value not in choices:
        msg = f"{name} must be one of {choices}, got {value!r}."
        raise ValueError(msg)
    return value


def settings_group(kind: type[Group], value: Group | Mapping[str, Any] | None, name: str) -> Group:
    """The settings group ``kind`` (a dataclass) from an instance, a mapping of its fields, or ``None`` (defaults).

    Raises:
        ValueError: For a mapping with names that are not fields of ``kind``, naming the setting ``name``
            and the fields it has; ``TypeError`` for anything else.

    Example:
        >>> @dataclasses.dataclass(frozen=True)
        ... class Map:
        ...     topk_ratio: float = 0.001
        >>> settings_group(Map, {"topk_ratio": 0.01}, "anomaly_map")
        Map(topk_ratio=0.01)
        >>> settings_group(Map, {"top_k": 1}, "anomaly_map")
        Traceback (most recent call last):
        ValueError: anomaly_map has no option 'top_k'; its options are ['topk_ratio'].
    """
    if value is None:
        return kind()
    if isinstance(value, kind):
        return value
    if isinstance(value, Mapping):
        fields = [field.name for field in dataclasses.fields(kind)]
        unknown = [key for key in value if key not in fields]
        if unknown:
            msg = f"{name} has no option {', '.join(repr(key) for key in unknown)}; its options are {fields}."
            raise ValueError(msg)
        return kind(**value)
    msg = f"{name} must be a {kind.__name__} or a dict of its options, got {type(value).__name__}."
    raise TypeError(msg)


__all__ = ["one_of", "positive_int", "settings_group"]
