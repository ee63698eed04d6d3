"""The one check of the cache's options, and what a checkpoint may set."""

from __future__ import annotations

import pytest

from anomalib_transformer_student.feature_cache.settings import CacheSettings, loading_checkpoint


@pytest.mark.parametrize(
    "value", [{"dtype": "bfloat16"}, {"memory_budget_mb": -1}, {"disk_budget_mb": True}, {"enabled": "yes"}]
)
def test_bad_values_are_refused_naming_the_option(value: dict) -> None:
    with pytest.raises(ValueError, match=f"feature_cache.{next(iter(value))}"):
        CacheSettings.of(value)


def test_unknown_options_are_refused_by_users_and_dropped_from_checkpoints() -> None:
    with pytest.raises(ValueError, match="no option \\['shared'\\]"):
        CacheSettings.of({"shared": True})
    crafted = {"enabled": True, "dtype": "float32", "dir": "~", "disk_budget_mb": 0, "shared": True}
    with loading_checkpoint():
        assert CacheSettings.of(crafted) == CacheSettings(enabled=True, dtype="float32")
        assert CacheSettings.of(CacheSettings(dir="/x", memory_budget_mb=0)) == CacheSettings()
    assert CacheSettings.of({"dir": "/x"}).dir == "/x"


def test_a_checkpoint_keeps_only_what_describes_the_model() -> None:
    assert CacheSettings(dir="/data", dtype="float32", disk_budget_mb=1).model_part() == {
        "enabled": None,
        "dtype": "float32",
    }
