"""Checks of user settings that the model and training share, and the groups options come in.

:func:`positive_int` is the one check of a count (a batch size, a number of tiles), :func:`one_of` of a choice
among names (a dtype, a purpose).

:func:`option_groups` turns what a user, a YAML file or a checkpoint passes for groups of options into
frozen dataclasses: each group as an instance, a plain dict or ``None``, and its options also under their
flat names (the fields' names, as checkpoints written before the group hold them). A module adds a group in
three steps (``TransformerStudent``'s ``anomaly_map`` and ``tiling`` show them, in ``model/options.py``):

1. a frozen dataclass whose fields are the options, with defaults (checked in ``__post_init__``);
2. a constructor argument of that type defaulting to a module-level instance, plus the group in a
   ``GROUPS`` table (name -> dataclass);
3. at the start of the constructor, ``option_groups({...the groups..., **legacy}, GROUPS, MOVED_OPTIONS)``
   (``**legacy``: the constructor's var-keyword argument, through which Lightning passes a checkpoint's old
   flat names), and each group rebound to ``dataclasses.asdict(group)`` before ``AnomalibModule.__init__``
   saves the hyper-parameters, so that checkpoints hold plain data (``weights_only=True`` loads them).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

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


def option_groups(
    options: Mapping[str, Any], groups: Mapping[str, type], moved: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Each group of ``groups`` (name -> dataclass) built from ``options``: the group's value and its flat names.

    A group's value is an instance, a dict or ``None`` (see :func:`settings_group`). Its options may also come
    under their flat names (the names of its fields), as checkpoints of versions before the group hold them:
    they fill the fields the group leaves at their defaults, so a value given in the group wins.

    Options named in ``moved`` (name -> where it went) left the constructor: they are dropped, with a warning
    saying where they went when set (to anything but ``False``/``None``), so that old checkpoints still load.

    Raises:
        TypeError: For a name in ``options`` that is neither a group nor one of their fields.

    Example:
        >>> @dataclasses.dataclass(frozen=True)
        ... class Tiles:
        ...     tile_size: int | None = None
        ...     tile_overlap: int = 0
        >>> option_groups({"tiles": {"tile_overlap": 14}, "tile_size": 518}, {"tiles": Tiles})
        {'tiles': Tiles(tile_size=518, tile_overlap=14)}
    """
    unused = dict(options)
    for name, destination in (moved or {}).items():
        if unused.pop(name, None) not in (None, False):
            logger.warning("%s is ignored: the option moved to %s.", name, destination)
    built = {}
    for name, kind in groups.items():
        group = settings_group(kind, unused.pop(name, None), name)
        defaults = kind()
        flat = {field.name: unused.pop(field.name) for field in dataclasses.fields(kind) if field.name in unused}
        flat = {key: value for key, value in flat.items() if getattr(group, key) == getattr(defaults, key)}
        built[name] = dataclasses.replace(group, **flat) if flat else group
    if unused:
        msg = f"unexpected option(s) {sorted(unused)}; the groups of options are {sorted(groups)}."
        raise TypeError(msg)
    return built


__all__ = ["one_of", "option_groups", "positive_int", "settings_group"]
