"""Option groups (``anomaly_map``, ``tiling``): given as dataclasses, dicts or old flat names; plain in checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning
import pytest
import torch

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


def _save(model: TransformerStudent, path: Path, hyper_parameters: dict | None = None) -> Path:
    """A checkpoint as Lightning writes it (state dict, hyper-parameters, the module's own entries)."""
    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams) if hyper_parameters is None else hyper_parameters,
        "pytorch-lightning_version": lightning.__version__,
    }
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def test_a_group_as_dataclass_dict_or_flat_names_configures_the_same_model() -> None:
    as_dataclasses = TransformerStudent(
        **SMALL,
        anomaly_map=AnomalyMapSettings(blur_kernel_sizes=(3,), blur_repeats=(2,), topk_ratio=0.01),
        tiling=TilingSettings(tile_size=112, tile_overlap=14, tile_batch_size=2),
    )
    as_dicts = TransformerStudent(
        **SMALL,
        anomaly_map={"blur_kernel_sizes": [3], "blur_repeats": [2], "topk_ratio": 0.01},
        tiling={"tile_size": 112, "tile_overlap": 14, "tile_batch_size": 2},
    )
    as_flat_names = TransformerStudent(
        **SMALL, blur_kernel_sizes=[3], blur_repeats=[2], topk_ratio=0.01, tile_size=112, tile_overlap=14,
        tile_batch_size=2,
    )  # fmt: skip
    expected = (0.01, [3, 3], (112, 14), 2)
    assert _settings(as_dataclasses) == _settings(as_dicts) == _settings(as_flat_names) == expected
    assert as_dataclasses.hparams["tiling"] == {"tile_size": 112, "tile_overlap": 14, "tile_batch_size": 2}
    assert "tile_size" not in as_flat_names.hparams  # saved in its group only
    assert as_flat_names.hparams["tiling"] == as_dataclasses.hparams["tiling"]


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


def test_checkpoint_with_the_old_flat_names_keeps_its_settings(tmp_path: Path) -> None:
    model = TransformerStudent(
        **SMALL, anomaly_map={"topk_ratio": 0.01}, tiling={"tile_size": 112, "tile_batch_size": 3}
    )
    flat = {key: value for key, value in model.hparams.items() if key not in ("anomaly_map", "tiling")}
    flat.update(model.hparams["anomaly_map"], **model.hparams["tiling"], skip_corrupt_images=False)
    path = _save(model, tmp_path / "flat.ckpt", hyper_parameters=flat)
    loaded = TransformerStudent.load_from_checkpoint(path)
    assert _settings(loaded) == _settings(model) == (0.01, [5] * 5 + [7] * 3, (112, 0), 3)
    # An override in the new group wins over the checkpoint's flat names; the others still hold.
    overridden = TransformerStudent.load_from_checkpoint(path, tiling={"tile_batch_size": 5})
    assert _settings(overridden) == (0.01, [5] * 5 + [7] * 3, (112, 0), 5)


def test_unknown_options_and_retired_ones() -> None:
    with pytest.raises(TypeError, match="tile_sise"):
        TransformerStudent(**SMALL, tile_sise=112)
    with pytest.raises(ValueError, match=r"tiling has no option 'size'; its options are \['tile_size'"):
        TransformerStudent(**SMALL, tiling={"size": 112})


def test_skip_corrupt_images_on_the_model_is_ignored_with_a_pointer(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        TransformerStudent(**SMALL, skip_corrupt_images=True)
    assert "DataChecks(skip_corrupt_images=True)" in caplog.text


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
    expected = (None, str(tmp_path), "float32", 0, 64, "float32")
    assert _cache(as_dataclass) == _cache(as_dict) == expected
    assert as_dict.hparams["feature_cache"] == {"enabled": None, "dtype": "float32"}  # the model, not the machine
    assert _cache(TransformerStudent(**SMALL, feature_cache=False))[0] is False
    with pytest.raises(TypeError, match="cache_dir"):
        TransformerStudent(**SMALL, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"feature_cache has no option \['size'\]"):
        TransformerStudent(**SMALL, feature_cache={"size": 1})
    with pytest.raises(ValueError, match=r"feature_cache\.dtype must be one of"):
        TransformerStudent(**SMALL, feature_cache={"dtype": "bfloat16"})


def test_a_checkpoint_with_the_old_flat_cache_names_loads_with_this_machines_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    model = TransformerStudent(**SMALL, feature_cache=False)
    flat = {key: value for key, value in model.hparams.items() if key != "feature_cache"}
    flat.update(feature_cache=False, cache_dir=str(tmp_path), cache_dtype="float32", cache_memory_budget_mb=0.0)
    path = _save(model, tmp_path / "flat.ckpt", hyper_parameters=flat)
    loaded = TransformerStudent.load_from_checkpoint(path, weights_only=True)
    default = str(tmp_path / "xdg" / "anomalib_transformer_student" / "teacher_features")
    assert _cache(loaded) == (False, default, "float16", 4096.0, 20480.0, "float32")
