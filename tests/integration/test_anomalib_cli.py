"""The unmodified `anomalib` console script knows TransformerStudent: train, test, predict, benchmark.

Tests of what the CLI parses and runs, beyond the console script's first train, test and benchmark, run anomalib's
CLI in this process (:func:`~tests.helpers.anomalib_cli`).
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ..helpers import SMALL_MODEL_ARGS, anomalib_cli, checkpoints, data_args, printed_config, run_cli

pytestmark = pytest.mark.slow
CONFIGS = Path(__file__).parents[2] / "configs"


@pytest.fixture(scope="module")
def trained(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint written by `anomalib train --model TransformerStudent` (short name)."""
    workdir = tmp_path_factory.mktemp("cli_train")
    result = run_cli(
        ["train", "--model", "TransformerStudent", *SMALL_MODEL_ARGS, *data_args(demo_root),
         "--trainer.max_epochs", "1", "--default_root_dir", str(workdir / "results")],
        cwd=workdir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "image_AUROC" in result.stdout + result.stderr
    found = checkpoints(workdir / "results")
    assert found, "anomalib train wrote no checkpoint"
    return found[0]


def test_train_with_short_name_writes_checkpoint(trained: Path) -> None:
    assert trained.stat().st_size > 1_000_000  # teacher and students are in it


def test_train_with_full_class_path(demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # anomalib's CLI in this process (the short name above runs the console script)
    anomalib_cli(
        ["train", "--model", "anomalib_transformer_student.TransformerStudent", *SMALL_MODEL_ARGS,
         *data_args(demo_root), "--trainer.max_epochs", "1", "--default_root_dir", str(tmp_path / "results")]
    )  # fmt: skip
    assert checkpoints(tmp_path / "results")


def test_test_from_checkpoint_with_the_size_metric_config(trained: Path, demo_root: Path, tmp_path: Path) -> None:
    """The checkpoint was trained with anomalib's default metrics and is tested with those of the config."""
    result = run_cli(
        ["test", "--model", "TransformerStudent", *SMALL_MODEL_ARGS, "--config", str(CONFIGS / "size_aupro.yaml"),
         *data_args(demo_root), "--ckpt_path", str(trained), "--default_root_dir", str(tmp_path / "results")],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    logged = dict(re.findall(r"│\s+(\w+)\s+│\s+([-\d.e]+)\s+│", result.stdout + result.stderr))
    assert {"image_AUROC", "pixel_AUROC", "pixel_AUPRO", "pixel_SizeAUPRO", "pixel_q1_SizeAUPRO"} <= set(logged)
    assert 0.0 <= float(logged["pixel_q1_SizeAUPRO"]) <= 1.0


def test_predict_from_checkpoint(
    trained: Path, demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = demo_root / "brick" / "test" / "stain"
    monkeypatch.chdir(tmp_path)
    anomalib_cli(
        ["predict", "--model", "TransformerStudent", *SMALL_MODEL_ARGS,
         "--data", str(images), "--ckpt_path", str(trained), "--default_root_dir", str(tmp_path / "results")]
    )  # fmt: skip
    written = list((tmp_path / "results").rglob("*.png"))
    assert len(written) == len(list(images.glob("*.png")))


def test_predict_in_tiles_with_the_tiling_config(
    trained: Path, demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The tiling config, its sizes overridden on the command line: 112-px images in 56-px tiles (2 x 2)."""
    images = demo_root / "brick" / "test" / "stain"
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="anomalib_transformer_student")  # as anomalib's console script logs
    anomalib_cli(
        ["predict", "--config", str(CONFIGS / "transformer_student_tiled.yaml"), *SMALL_MODEL_ARGS,
         "--model.tiling.tile_size", "56", "--model.tiling.tile_overlap", "0", "--data", str(images),
         "--ckpt_path", str(trained),
         "--default_root_dir", str(tmp_path / "results")]
    )  # fmt: skip
    assert "inspected in 56-px tiles" in caplog.text
    written = list((tmp_path / "results").rglob("*.png"))
    assert len(written) == len(list(images.glob("*.png")))


def test_benchmark_pipeline_runs(demo_root: Path, tmp_path: Path) -> None:
    config = yaml.safe_load((CONFIGS / "benchmark.yaml").read_text())
    config["accelerator"] = ["cpu"]
    config["benchmark"]["model"]["init_args"] = {
        "pretrained": False, "teacher": "vit_small_patch14_dinov2", "image_size": 112, "max_epochs": 1,
    }  # fmt: skip
    data_init = config["benchmark"]["data"]["init_args"]
    data_init.update({"root": str(demo_root), "num_workers": 0, "category": {"grid": ["brick"]}})
    config_path = tmp_path / "benchmark.yaml"
    config_path.write_text(yaml.safe_dump(config))
    result = run_cli(["benchmark", "--config", str(config_path)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "TransformerStudent" in output
    assert "image_AUROC" in output


def test_models_listed_by_anomalib() -> None:
    listed = subprocess.run(
        [sys.executable, "-c", "from anomalib.models import list_models; print(sorted(list_models('pascal')))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "TransformerStudent" in listed.stdout


def test_option_groups_on_the_command_line_and_in_print_config(demo_root: Path) -> None:
    """``--model.<group>.<option>`` sets one option of a group; ``--print_config`` shows the groups nested."""
    config = printed_config(
        ["fit", "--model", "TransformerStudent", *SMALL_MODEL_ARGS, *data_args(demo_root),
         "--model.tiling.tile_size", "112", "--model.anomaly_map.topk_ratio", "0.01",
         "--model.feature_cache.dtype", "float32", "--model.feature_cache.memory_budget_mb", "0"]
    )  # fmt: skip
    init_args = config["model"]["init_args"]
    assert init_args["tiling"] == {"tile_size": 112, "tile_overlap": 0, "tile_batch_size": 8}
    assert init_args["anomaly_map"] == {"blur_kernel_sizes": [5, 7], "blur_repeats": [5, 3], "topk_ratio": 0.01}
    assert init_args["feature_cache"] == {
        "enabled": None, "dtype": "float32", "dir": None, "memory_budget_mb": 0.0, "disk_budget_mb": 20480.0,
    }  # fmt: skip
    assert "tile_size" not in init_args and "skip_corrupt_images" not in init_args and "cache_dir" not in init_args
    # A bool still switches the caches off.
    config = printed_config(
        ["fit", "--model", "TransformerStudent", *SMALL_MODEL_ARGS, *data_args(demo_root),
         "--model.feature_cache", "false"]
    )  # fmt: skip
    assert config["model"]["init_args"]["feature_cache"] is False


@pytest.mark.parametrize("config", ["transformer_student.yaml", "transformer_student_tiled.yaml", "mvtecad2.yaml"])
def test_configs_set_the_groups(config: str, demo_root: Path) -> None:
    init_args = printed_config(["fit", "--config", str(CONFIGS / config), *data_args(demo_root)])["model"]["init_args"]
    expected = yaml.safe_load((CONFIGS / config).read_text())["model"]["init_args"]
    for group in ("tiling", "anomaly_map", "feature_cache"):
        for name, value in expected.get(group, {}).items():
            assert init_args[group][name] == value, (group, name)
