"""The constructor's option groups, and where the options of earlier versions went.

``TransformerStudent`` takes three groups of options: ``anomaly_map`` (:class:`AnomalyMapSettings`),
``tiling`` (:class:`TilingSettings`) and ``feature_cache`` (:class:`CacheSettings`). Up to 0.2 they
were flat constructor arguments (``tile_size``, ``topk_ratio``, ``cache_dir``, ...), and checkpoints of those
versions still pass them so: :meth:`ModelOptions.from_arguments` moves them into their groups.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..feature_cache.settings import CacheSettings, from_checkpoint
from ..training.settings import option_groups
from .anomaly_map import AnomalyMapSettings
from .tiling import TilingSettings

PAPER_MAP = AnomalyMapSettings()
NO_TILING = TilingSettings()
DEFAULT_CACHE = CacheSettings()
# The groups whose flat names are their fields' names.
GROUPS = {"anomaly_map": AnomalyMapSettings, "tiling": TilingSettings}
# Options that left the constructor (old checkpoints hold them), and where they went.
MOVED_OPTIONS = {
    "skip_corrupt_images": "the DataChecks callback: give the trainer DataChecks(skip_corrupt_images=True) "
    "(--trainer.callbacks+=anomalib_transformer_student.training.data_checks.DataChecks "
    "--trainer.callbacks.skip_corrupt_images true)",
}


@dataclass(frozen=True)
class ModelOptions:
    """The three option groups of ``TransformerStudent``, checked.

    Example:
        >>> options = ModelOptions.from_arguments(None, {"tile_size": 518}, False, {"topk_ratio": 0.01})
        >>> options.anomaly_map.topk_ratio, options.tiling.tile_size, options.feature_cache.enabled
        (0.01, 518, False)
    """

    anomaly_map: AnomalyMapSettings
    tiling: TilingSettings
    feature_cache: CacheSettings

    @classmethod
    def from_arguments(
        cls,
        anomaly_map: AnomalyMapSettings | dict[str, Any] | None,
        tiling: TilingSettings | dict[str, Any] | None,
        feature_cache: CacheSettings | dict[str, Any] | bool | None,
        legacy: dict[str, Any],
    ) -> ModelOptions:
        """The groups as the constructor receives them (instances, dicts or ``None``) and the flat names in ``legacy``.

        Raises:
            TypeError: For a flat name that belongs to no group.
            ValueError: For an option a group does not have, or a value it refuses.
        """
        if from_checkpoint():  # a 0.1 checkpoint's flat cache names (folder, budgets) describe its machine
            legacy = {name: value for name, value in legacy.items() if not name.startswith("cache_")}
        cache = CacheSettings.of(feature_cache)
        groups = option_groups({"anomaly_map": anomaly_map, "tiling": tiling, **legacy}, GROUPS, MOVED_OPTIONS)
        return cls(groups["anomaly_map"], groups["tiling"], cache)

    def hyperparameters(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """``anomaly_map``, ``tiling`` and ``feature_cache`` as plain dicts, as checkpoints hold them.

        Of ``feature_cache`` only what describes the model (``enabled``, ``dtype``): folder and budgets belong to
        the machine that loads the checkpoint.

        Plain data, so that a checkpoint's hyper-parameters load with ``torch.load(weights_only=True)``.
        """
        return asdict(self.anomaly_map), asdict(self.tiling), self.feature_cache.model_part()


__all__ = ["DEFAULT_CACHE", "GROUPS", "MOVED_OPTIONS", "NO_TILING", "PAPER_MAP", "ModelOptions"]
