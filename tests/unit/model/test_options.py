"""Option groups (`anomaly_map`, `tiling`, `feature_cache`): dataclasses, dicts or dotted names; plain data saved."""

from __future__ import annotations

from pathlib import Path

import lightning
import pytest
import torch
from omegaconf import OmegaConf

from anomalib_transformer_student import TransformerStudent
from anomalib_transformer_student.feature_cache.settings import CacheSettings
from anomalib_transformer_student.model.anomaly_map import AnomalyMapSettings
from anomalib_transformer_student.model.tiling import TilingSettings
from anomalib_transformer_student.training.settings import positive_int

SMALL = {"teacher": "vit_small_patch14_dinov2", "pretrained": False, "image_size": 56, "layers": (1, 3)}


def _settings(model: TransformerStudent) -> tuple:
    generator = model.model.anomaly_map_generator
    tiling = model.tiling
    return (
        generator.topk_ratio,
        generator.blur_passes,
        None if tiling is None else (tiling.tile_size, tiling.overlap),
        model.model.teacher_batch_size,
    )


def _save(model: TransformerStudent, path: Path) -> Path:
    """A checkpoint as Lightning writes it (state dict, hyper-parameters, the module's own entries)."""
    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def test_a_group_as_dataclass_dict_dictconfig_or_dotted_names_configures_the_same_model() -> None:
    map_options = {"blur_kernel_sizes": [3], "blur_repeats": [2], "topk_ratio": 0.01}
    tile_options = {"tile_size": 112, "tile_overlap": 14, "tile_batch_size": 2}
    as_dataclasses = TransformerStudent(
        **SMALL, anomaly_map=AnomalyMapSettings(**map_options), tiling=TilingSettings(**tile_options)
    )
    as_dicts = TransformerStudent(**SMALL, anomaly_map=map_options, tiling=tile_options)
    as_dictconfigs = TransformerStudent(
        **SMALL, anomaly_map=OmegaConf.create(map_options), tiling=OmegaConf.create(tile_options)
    )
    # As ``get_model`` passes a jsonargparse Namespace: every option under its dotted name.
    dotted = {f"anomaly_map.{key}": value for key, value in map_options.items()}
    dotted.update({f"tiling.{key}": value for key, value in tile_options.items()})
    as_dotted_names = TransformerStudent(**SMALL, **dotted)
    expected = (0.01, [3, 3], (112, 14), 2)
    models = (as_dataclasses, as_dicts, as_dictconfigs, as_dotted_names)
    assert [_settings(model) for model in models] == [expected] * 4
    assert [model.hparams["tiling"] for model in models] == [tile_options] * 4
    assert not any("." in key for key in as_dotted_names.hparams)  # saved in their groups only


def test_a_dotted_option_wins_over_its_groups_value_and_keeps_the_others() -> None:
    model = TransformerStudent(**SMALL, tiling={"tile_size": 112, "tile_batch_size": 3}, **{"tiling.tile_size": 56})
    assert _settings(model)[2:] == ((56, 0), 3)


def test_hyper_parameters_stay_plain_data() -> None:
    model = TransformerStudent(**SMALL, tiling=TilingSettings(tile_size=112))
    for name in ("anomaly_map", "tiling"):
        assert type(model.hparams[name]) is dict


def test_new_checkpoint_loads_with_weights_only(tmp_path: Path) -> None:
    model = TransformerStudent(**SMALL, anomaly_map={"topk_ratio": 0.01}, tiling={"tile_size": 112})
    path = _save(model, tmp_path / "new.ckpt")
    torch.load(path, weights_only=True)  # nothing but plain data and tensors
    loaded = TransformerStudent.load_from_checkpoint(path, weights_only=True)
    assert _settings(loaded) == _settings(model)


def test_unknown_options_are_refused_naming_them() -> None:
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['tile_size'\]; the options of a group go in it"):
        TransformerStudent(**SMALL, tile_size=112)
    with pytest.raises(TypeError, match="skip_corrupt_images"):
        TransformerStudent(**SMALL, skip_corrupt_images=True)
    with pytest.raises(TypeError, match=r"'tiles\.tile_size'"):
        TransformerStudent(**SMALL, **{"tiles.tile_size": 112})
    with pytest.raises(ValueError, match=r"tiling has no option 'size'; its options are \['tile_size'"):
        TransformerStudent(**SMALL, tiling={"size": 112})
    with pytest.raises(ValueError, match=r"tiling has no option 'size'"):
        TransformerStudent(**SMALL, **{"tiling.size": 112})
    with pytest.raises(TypeError, match=r"feature_cache=False cannot be combined with feature_cache\.dtype"):
        TransformerStudent(**SMALL, feature_cache=False, **{"feature_cache.dtype": "float32"})


@pytest.mark.parametrize("value", [0, -1, True, 2.0])
def test_teacher_batch_size_is_checked_wherever_it_is_set(value: object) -> None:
    model = TransformerStudent(**SMALL)
    with pytest.raises(ValueError, match="teacher_batch_size must be a positive integer"):
        model.model.teacher_batch_size = value
    with pytest.raises(ValueError, match="tile_batch_size must be a positive integer"):
        TilingSettings(tile_size=112, tile_batch_size=value)
    model.model.teacher_batch_size = None  # every batch whole
    assert positive_int("n", 3) == 3


def _cache(model: TransformerStudent) -> tuple:
    settings = model.feature_caching.settings
    evaluation = model.feature_caching._caches["evaluation"]
    return (settings.enabled, str(settings.directory), settings.dtype, settings.memory_budget_mb,
            settings.disk_budget_mb, evaluation.dtype)  # fmt: skip


def test_the_cache_options_are_one_group(tmp_path: Path) -> None:
    settings = {"dir": str(tmp_path), "dtype": "float32", "memory_budget_mb": 0, "disk_budget_mb": 64}
    as_dataclass = TransformerStudent(**SMALL, feature_cache=CacheSettings(**settings))
    as_dict = TransformerStudent(**SMALL, feature_cache=settings)
    as_dotted_names = TransformerStudent(**SMALL, **{f"feature_cache.{key}": value for key, value in settings.items()})
    expected = (None, str(tmp_path), "float32", 0, 64, "float32")
    assert _cache(as_dataclass) == _cache(as_dict) == _cache(as_dotted_names) == expected
    assert as_dict.hparams["feature_cache"] == {"enabled": None, "dtype": "float32"}  # the model, not the machine
    assert as_dotted_names.hparams["feature_cache"] == as_dict.hparams["feature_cache"]
    assert _cache(TransformerStudent(**SMALL, feature_cache=False))[0] is False
    with pytest.raises(TypeError, match="cache_dir"):
        TransformerStudent(**SMALL, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"feature_cache has no option \['size'\]"):
        TransformerStudent(**SMALL, feature_cache={"size": 1})
    with pytest.raises(ValueError, match=r"feature_cache\.dtype must be one of"):
        TransformerStudent(**SMALL, feature_cache={"dtype": "bfloat16"})
