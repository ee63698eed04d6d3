"""A checkpoint carries the model, not the machine: its cache folder and budgets are never obeyed on load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomalib_transformer_student import TransformerStudent
from anomalib_transformer_student.apps import cli, mvtecad2_submission

from ...factories import Trained, make_datamodule, make_engine
from ...helpers import SMALL_MODEL_ARGS, anomalib_cli, data_args
from ...mvtecad2_trees import TINY_COUNTS, write_private_test_sets

pytestmark = pytest.mark.slow


def state(folder: Path) -> list[tuple[str, int, bytes | None]]:
    """Every path below ``folder`` (itself included) with its mode and bytes."""
    paths = [folder, *folder.rglob("*")]
    return sorted((str(p), p.lstat().st_mode, p.read_bytes() if p.is_file() else None) for p in paths)


@pytest.fixture
def crafted(trained_small: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    """A checkpoint naming a folder of user files with budget 0; the victim folder; the loader's cache default."""
    victim = tmp_path / "home"
    (victim / "Documents").mkdir(parents=True)
    (victim / "Documents" / "taxes.pdf").write_bytes(b"%PDF")
    victim.chmod(0o755)
    checkpoint = torch.load(trained_small.checkpoint, map_location="cpu", weights_only=True)
    cache = {"enabled": True, "dtype": "float32", "dir": str(victim), "memory_budget_mb": 0, "disk_budget_mb": 0}
    checkpoint["hyper_parameters"]["feature_cache"] = {**cache, "shared": True}
    path = tmp_path / "received.ckpt"
    torch.save(checkpoint, path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return path, victim, tmp_path / "xdg" / "anomalib_transformer_student" / "teacher_features"


def test_load_from_checkpoint_then_engine_test(crafted, demo_root: Path, tmp_path: Path) -> None:
    checkpoint, victim, default = crafted
    before = state(victim)
    model = TransformerStudent.load_from_checkpoint(checkpoint)
    assert model.feature_caching.settings.directory == default and model.feature_caching.settings.enabled is True
    make_engine(tmp_path / "results").test(model, datamodule=make_datamodule(demo_root))
    assert state(victim) == before
    assert [path.name for path in default.iterdir()] == [".tsfc-budget.lock"]  # used there, and emptied


def test_anomalib_test_with_ckpt_path(crafted, demo_root: Path, tmp_path: Path, monkeypatch) -> None:
    checkpoint, victim, _ = crafted
    before = state(victim)
    mine = tmp_path / "my-cache"
    monkeypatch.chdir(tmp_path)
    anomalib_cli(
        ["test", "--model", "TransformerStudent", *SMALL_MODEL_ARGS, "--model.feature_cache.dir", str(mine),
         *data_args(demo_root), "--ckpt_path", str(checkpoint), "--default_root_dir", str(tmp_path / "results")]
    )  # fmt: skip
    assert state(victim) == before
    assert [path.name for path in mine.iterdir()] == [".tsfc-budget.lock"]


def test_evaluate_writes_nothing_outside_its_output(crafted, demo_root: Path, tmp_path: Path) -> None:
    checkpoint, victim, default = crafted
    before = state(victim)
    output = tmp_path / "report"
    assert cli.main(["evaluate", "--ckpt", f"brick={checkpoint}", "--data-root", str(demo_root),
                     "--output", str(output)]) == 0  # fmt: skip
    assert state(victim) == before
    assert not default.exists()


def test_predict_mvtecad2(
    crafted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint, victim, default = crafted
    before = state(victim)
    monkeypatch.setattr(mvtecad2_submission, "IMAGE_COUNTS", TINY_COUNTS)
    root = write_private_test_sets(tmp_path / "data", {"sheet_metal": TINY_COUNTS["sheet_metal"]}, (56, 56))
    status = cli.main(["predict-mvtecad2", "--ckpt", str(checkpoint), "--data-root", str(root),
                       "--category", "sheet_metal", "--output", str(tmp_path / "out")])  # fmt: skip
    # The model loads, then is refused: it was validated without QuantilePostProcessor's good-image threshold.
    assert status == 2
    assert "has no pixel threshold" in capsys.readouterr().err
    assert state(victim) == before
    assert not default.exists() or [path.name for path in default.iterdir()] == [".tsfc-budget.lock"]
