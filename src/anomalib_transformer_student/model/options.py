"""The constructor's option groups, in every form anomalib and jsonargparse hand them over.

``TransformerStudent`` takes three groups of options: ``anomaly_map`` (:class:`AnomalyMapSettings`),
``tiling`` (:class:`TilingSettings`) and ``feature_cache`` (:class:`CacheSettings`), each as its
dataclass, a dict (or ``DictConfig``) of its options, or ``None`` for the defaults.

A jsonargparse ``Namespace`` flattens nested groups: passed on with ``**`` (as anomalib's ``get_model`` does
with the ``Namespace`` of its ``tools/inference/lightning_inference.py``), the options arrive under dotted
names, ``tiling.tile_size=518``. :func:`regroup_dotted` puts them back into their groups.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ..feature_cache.settings import CacheSettings
from ..training.settings import settings_group
from .anomaly_map import AnomalyMapSettings
from .tiling import TilingSettings

PAPER_MAP = AnomalyMapSettings()
NO_TILING = TilingSettings()
DEFAULT_CACHE = CacheSettings()


def regroup_dotted(groups: Mapping[str, Any], dotted: Mapping[str, Any]) -> dict[str, Any]:
    """``groups`` (name -> value as given) with the options named ``group.option`` in ``dotted`` merged in.

    A group given as a dataclass or a dict keeps its other options; a dotted option wins over the group's value.

    Raises:
        TypeError: For a name that is not ``group.option`` of one of ``groups``, or dotted options of a group
            given as something else than a dataclass, a dict or ``None`` (``feature_cache=False``).

    Example:
        >>> regroup_dotted({"tiling": {"tile_overlap": 14}}, {"tiling.tile_size": 518})
        {'tiling': {'tile_overlap': 14, 'tile_size': 518}}
        >>> regroup_dotted({"tiling": None}, {"tile_size": 518})
        Traceback (most recent call last):
        TypeError: unexpected argument(s) ['tile_size']; the options of a group go in it, e.g. \
tiling={'tile_size': 518}, or dotted, tiling.tile_size=518; the groups are ['tiling'].
    """
    merged = dict(groups)
    unknown = [name for name in dotted if name.partition(".")[0] not in groups or "." not in name]
    if unknown:
        msg = (
            f"unexpected argument(s) {sorted(unknown)}; the options of a group go in it, e.g. "
            f"tiling={{'tile_size': 518}}, or dotted, tiling.tile_size=518; the groups are {sorted(groups)}."
        )
        raise TypeError(msg)
    for name, value in dotted.items():
        group, _, option = name.partition(".")
        current = merged[group]
        if dataclasses.is_dataclass(current) and not isinstance(current, type):
            current = asdict(current)
        elif current is None:
            current = {}
        elif not isinstance(current, Mapping):
            msg = f"{group}={current!r} cannot be combined with {name}; give {group} as a dict of its options."
            raise TypeError(msg)
        merged[group] = {**current, option: value}
    return merged


@dataclass(frozen=True)
class ModelOptions:
    """The three option groups of ``TransformerStudent``, checked.

    Example:
        >>> options = ModelOptions.from_arguments(None, {"tile_size": 518}, False, {"anomaly_map.topk_ratio": 0.01})
        >>> options.anomaly_map.topk_ratio, options.tiling.tile_size, options.feature_cache.enabled
        (0.01, 518, False)
    """

    anomaly_map: AnomalyMapSettings
    tiling: TilingSettings
    feature_cache: CacheSettings

    @classmethod
    def from_arguments(
        cls,
        anomaly_map: AnomalyMapSettings | Mapping[str, Any] | None,
        tiling: TilingSettings | Mapping[str, Any] | None,
        feature_cache: CacheSettings | Mapping[str, Any] | bool | None,
        dotted: Mapping[str, Any],
    ) -> ModelOptions:
        """The groups as the constructor receives them, with the ``dotted`` options merged in (:func:`regroup_dotted`).

        Raises:
            TypeError: For a name in ``dotted`` that is no ``group.option``.
            ValueError: For an option a group does not have, or a value it refuses.
        """
        given = regroup_dotted({"anomaly_map": anomaly_map, "tiling": tiling, "feature_cache": feature_cache}, dotted)
        cache = CacheSettings.of(given["feature_cache"])
        return cls(
            settings_group(AnomalyMapSettings, given["anomaly_map"], "anomaly_map"),
            settings_group(TilingSettings, given["tiling"], "tiling"),
            cache,
        )

    def hyperparameters(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """``anomaly_map``, ``tiling`` and ``feature_cache`` as plain dicts, as checkpoints hold them.

        Of ``feature_cache`` only what describes the model (``enabled``, ``dtype``): folder and budgets belong to
        the machine that loads the checkpoint.

        Plain data, so that a checkpoint's hyper-parameters load with ``torch.load(weights_only=True)``.
        """
        return asdict(self.anomaly_map), asdict(self.tiling), self.feature_cache.model_part()


__all__ = ["DEFAULT_CACHE", "NO_TILING", "PAPER_MAP", "ModelOptions", "regroup_dotted"]
