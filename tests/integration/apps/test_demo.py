"""End-to-end runs of `transformer-student demo` (tiny settings, random small teacher, offline)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import types
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from anomalib_transformer_student.apps import cli, demo
from anomalib_transformer_student.apps.demo_data import TEXTURES, DemoDatasetSpec
from anomalib_transformer_student.apps.demo_datamodule import DEFAULT_ROOT, DemoData
from anomalib_transformer_student.apps.demo_report import format_metrics_table, write_metrics_json
from anomalib_transformer_student.training import teacher_weights

SMALL_TEACHER = "vit_small_patch14_dinov2"
TINY_RUN = ["demo", "--categories", "brick", "--image-size", "112", "--epochs", "1", "--teacher", SMALL_TEACHER]
CONFIG = Path(__file__).resolve().parents[3] / "configs" / "demo_data.yaml"


def _never_download(*_: object, **__: object) -> None:
    raise AssertionError("the demo data config must never download")


def _never_fetch(name: str, timeout: float = 0.0) -> dict:
    raise AssertionError(f"the demo must not fetch weights for '{name}' here")


def _check_outputs(output: Path) -> dict:
    payload = json.loads((output / "metrics.json").read_text())
    for metric in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO"):
        value = payload["metrics"]["brick"][metric]
        assert value is not None, metric
        assert math.isfinite(value), metric
        assert 0.0 <= value <= 1.0, metric
    assert payload["metrics"]["brick"]["n_test_defective"] > 0
    assert payload["settings"]["image_size"] == 112
    with Image.open(output / "predictions.png") as image:
        image.verify()
    with Image.open(output / "predictions.png") as image:
        # One band of three rows, and four columns (three defect types and one good image).
        assert image.format == "PNG"
        assert image.width >= 4 * 150
        assert image.height >= 3 * 150
    return payload


def test_demo_in_process_falls_back_loudly_to_random_teacher(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(teacher_weights, "pretrained_weights_available", lambda name, timeout=3.0: False)
    monkeypatch.setattr(teacher_weights, "fetch_pretrained_state_dict", _never_fetch)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # Fewer images than the real demo: the run only has to exercise every step.
    monkeypatch.setattr(
        demo, "DATASET_SPEC", DemoDatasetSpec(image_size=128, n_train=4, n_test_good=2, n_test_per_defect=1)
    )
    output = tmp_path / "out"

    code = cli.main([*TINY_RUN, "--output", str(output), "--data-root", str(tmp_path / "data")])

    assert code == 0
    captured = capsys.readouterr()
    assert "WARNING: teacher 'vit_small_patch14_dinov2' runs with RANDOM weights" in captured.err
    assert "Pretrained weights UNAVAILABLE" in captured.err
    assert "image_AUROC" in captured.out
    assert str(output / "metrics.json") in captured.out
    payload = _check_outputs(output)
    assert payload["teacher"]["name"] == SMALL_TEACHER
    assert payload["teacher"]["pretrained"] is False
    assert "UNAVAILABLE" in payload["teacher"]["note"]
    assert payload["settings"]["pretrained_requested"] is True


def test_demo_console_entry_in_subprocess_with_no_pretrained(tmp_path: Path) -> None:
    output = tmp_path / "out"
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }
    command = [sys.executable, "-m", "anomalib_transformer_student.apps.cli", *TINY_RUN, "--no-pretrained"]
    command += ["--output", str(output), "--data-root", str(tmp_path / "data")]

    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment, check=False)

    assert result.returncode == 0, result.stderr[-4000:]
    assert "runs with RANDOM weights" in result.stderr
    assert "Results:" in result.stdout
    payload = _check_outputs(output)
    assert payload["teacher"]["pretrained"] is False
    assert "--no-pretrained" in payload["teacher"]["note"]
    assert set(payload["metrics"]["brick"]["time_s"]) == {"fit", "test"}


def test_console_script_points_at_cli_main() -> None:
    (script,) = [entry for entry in entry_points(group="console_scripts") if entry.name == "transformer-student"]
    assert script.load() is cli.main


def test_cli_dispatches_to_a_registered_command_module(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    module = types.ModuleType("fake_command")
    module.add_arguments = lambda parser: parser.add_argument("--times", type=int, default=1)
    module.run = lambda args: print("ran " * args.times) or 7
    monkeypatch.setitem(sys.modules, "fake_command", module)
    monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, cli.Command("fake", "A fake job.", "fake_command")))

    assert cli.main(["fake", "--times", "2"]) == 7
    assert "ran ran" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
    assert "the following arguments are required: COMMAND" in capsys.readouterr().err


def test_resolve_teacher_falls_back_when_fetching_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_fetch(name: str, timeout: float = 3.0) -> dict:
        raise teacher_weights.TeacherWeightsUnavailableError(f"Could not fetch '{name}': HTTP 503.\nWays out: ...")

    monkeypatch.setattr(teacher_weights, "pretrained_weights_available", lambda name, timeout=3.0: True)
    monkeypatch.setattr(teacher_weights, "fetch_pretrained_state_dict", broken_fetch)

    choice = demo.resolve_teacher(SMALL_TEACHER, use_pretrained=True)

    assert choice.pretrained is False
    assert choice.state_dict is None
    assert "HTTP 503" in choice.note
    assert "RANDOM" in demo.offline_banner(choice)


def test_resolve_teacher_uses_fetched_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    weights = {"pos_embed": object()}
    monkeypatch.setattr(teacher_weights, "pretrained_weights_available", lambda name, timeout=3.0: True)
    monkeypatch.setattr(teacher_weights, "fetch_pretrained_state_dict", lambda name, timeout=3.0: weights)

    choice = demo.resolve_teacher(SMALL_TEACHER, use_pretrained=True)

    assert choice.pretrained is True
    assert choice.state_dict is weights
    assert choice.summary() == {"name": SMALL_TEACHER, "pretrained": True, "note": "pretrained weights"}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--categories", "marble"], "Unknown demo categories ['marble']; choose among ['brick', 'grass', 'gravel']"),
        (["--image-size", "100"], "use 98 or 112 instead"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--teacher", "resnet_not_a_model"], "Unknown teacher 'resnet_not_a_model'"),
    ],
)
def test_bad_options_exit_2_with_a_clear_message(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    arguments: list[str],
    message: str,
) -> None:
    base = ["demo", "--teacher", SMALL_TEACHER, "--output", str(tmp_path / "out"), "--data-root", str(tmp_path)]

    assert cli.main([*base, *arguments]) == 2

    error = capsys.readouterr().err
    assert "transformer-student demo: error:" in error
    assert message in error
    assert not (tmp_path / "out").exists()


def test_demo_refuses_a_data_root_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("not demo data")
    settings = demo.DemoSettings(categories=("brick",), data_root=tmp_path)

    with pytest.raises(demo.DemoSettingsError, match="holds files the demo did not write"):
        demo.prepare_dataset(settings)
    assert (tmp_path / "precious.txt").read_text() == "not demo data"


def test_demo_dataset_is_reused_for_the_same_seed_and_regenerated_for_another(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(
        demo, "DATASET_SPEC", DemoDatasetSpec(image_size=32, n_train=1, n_test_good=1, n_test_per_defect=1)
    )
    image = tmp_path / "brick" / "train" / "good" / "000.png"

    demo.prepare_dataset(demo.DemoSettings(categories=("grass",), data_root=tmp_path, seed=0))
    first = image.read_bytes()
    demo.prepare_dataset(demo.DemoSettings(categories=("brick",), data_root=tmp_path, seed=0))
    assert "Reusing the demo dataset" in capsys.readouterr().out
    assert image.read_bytes() == first  # every texture is generated whatever categories are asked for

    demo.prepare_dataset(demo.DemoSettings(categories=("brick",), data_root=tmp_path, seed=1))
    assert "Generating the demo dataset" in capsys.readouterr().out
    assert image.read_bytes() != first
    assert sorted(path.name for path in tmp_path.iterdir()) == [demo.DATASET_MARKER, *sorted(TEXTURES)]


def test_report_writes_plain_json_and_marks_missing_metrics(tmp_path: Path) -> None:
    payload = {"nan": float("nan"), "tensor": torch.tensor(0.5), "numpy": np.float32(0.25), "seq": (1, Path("x"))}

    path = write_metrics_json(payload, tmp_path / "nested" / "metrics.json")

    assert json.loads(path.read_text()) == {"nan": None, "tensor": 0.5, "numpy": 0.25, "seq": [1, "x"]}
    table = format_metrics_table({"brick": {"image_AUROC": 0.5, "pixel_AUROC": None}}, ["image_AUROC", "pixel_AUROC"])
    assert table.splitlines()[1].split() == ["brick", "0.500", "n/a"]


def test_data_config_points_at_the_demo_dataset() -> None:
    config = yaml.safe_load(CONFIG.read_text())

    assert config["class_path"] == f"{DemoData.__module__}.{DemoData.__name__}"
    assert Path(config["init_args"]["root"]) == demo.DEFAULT_DATA_ROOT == DEFAULT_ROOT
    assert config["init_args"]["category"] in TEXTURES
    datamodule = DemoData(**config["init_args"])
    assert datamodule.num_workers == 0


def test_data_config_run_elsewhere_names_the_fix_and_downloads_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = yaml.safe_load(CONFIG.read_text())
    monkeypatch.chdir(tmp_path)  # not where the demo wrote its dataset
    monkeypatch.setattr("anomalib.data.datamodules.image.mvtecad.download_and_extract", _never_download)
    with pytest.raises(FileNotFoundError, match=r"No demo dataset at .*--data\.root"):
        DemoData(**config["init_args"]).prepare_data()
    assert list(tmp_path.iterdir()) == []  # no empty dataset folder left behind


# ------------------------------------------------------------------------------ what the demo deletes and says


def _tiny_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        demo, "DATASET_SPEC", DemoDatasetSpec(image_size=32, n_train=1, n_test_good=1, n_test_per_defect=1)
    )


def _precious(tmp_path: Path) -> Path:
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work")
    return folder


@pytest.mark.parametrize("name", ["absolute", "parent", "unknown"])
def test_a_marker_naming_other_folders_deletes_nothing(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tiny_spec(monkeypatch)
    precious = _precious(tmp_path)
    root = tmp_path / "data"
    demo.prepare_dataset(demo.DemoSettings(data_root=root))
    named = {"absolute": str(precious), "parent": "../precious", "unknown": "precious"}[name]
    (root / demo.DATASET_MARKER).write_text(json.dumps({"categories": ["brick", named]}))

    with pytest.raises(demo.DemoSettingsError, match="corrupt or was not written by the demo") as caught:
        demo.prepare_dataset(demo.DemoSettings(data_root=root, seed=1))

    assert (precious / "thesis.txt").read_text() == "years of work"
    assert (root / "brick" / "train" / "good" / "000.png").is_file()  # nothing of the demo's was deleted either
    assert "Choose a new --data-root" in str(caught.value)


def test_a_texture_folder_that_is_a_link_is_not_followed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tiny_spec(monkeypatch)
    precious = _precious(tmp_path)
    root = tmp_path / "data"
    demo.prepare_dataset(demo.DemoSettings(data_root=root))
    shutil.rmtree(root / "grass")
    (root / "grass").symlink_to(precious, target_is_directory=True)

    with pytest.raises(demo.DemoSettingsError, match=r"grass in --data-root .*a link"):
        demo.prepare_dataset(demo.DemoSettings(data_root=root, seed=1))

    assert (precious / "thesis.txt").read_text() == "years of work"


def test_a_texture_folder_the_marker_does_not_list_is_not_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tiny_spec(monkeypatch)
    root = tmp_path / "data"
    demo.prepare_dataset(demo.DemoSettings(data_root=root))
    marker = root / demo.DATASET_MARKER
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "categories": ["brick"]}))
    mine = root / "grass" / "train" / "good" / "000.png"
    mine.write_bytes(b"the user's own image")

    with pytest.raises(demo.DemoSettingsError, match="a folder its marker does not list"):
        demo.prepare_dataset(demo.DemoSettings(data_root=root, seed=1))

    assert mine.read_bytes() == b"the user's own image"


@pytest.mark.parametrize("content", ["{not json", '["brick"]', '{"categories": "brick"}', '{"categories": [1]}'])
def test_a_corrupt_marker_gives_one_clear_message(
    content: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "data"
    (root / "brick").mkdir(parents=True)
    (root / "brick" / "keep.png").write_bytes(b"pixels")
    (root / demo.DATASET_MARKER).write_text(content)

    code = cli.main(["demo", "--teacher", SMALL_TEACHER, "--no-pretrained", "--data-root", str(root)])

    assert code == 2
    error = capsys.readouterr().err
    assert "\ntransformer-student demo: error: The demo's marker" in error  # after the random-teacher banner
    assert "corrupt or was not written by the demo" in error
    assert "Traceback" not in error
    assert (root / "brick" / "keep.png").read_bytes() == b"pixels"


def test_demo_reports_an_unusable_data_root_as_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Errors other than the demo's own settings errors (here an ``OSError``) end in one message and status 2."""
    (tmp_path / "a_file").write_text("not a folder")
    base = ["demo", "--teacher", SMALL_TEACHER, "--no-pretrained", "--output", str(tmp_path / "out")]

    assert cli.main([*base, "--data-root", str(tmp_path / "a_file")]) == 2
    assert "--data-root" in capsys.readouterr().err
    assert cli.main([*base, "--data-root", str(tmp_path / "a_file" / "data")]) == 2
    error = capsys.readouterr().err
    assert "\ntransformer-student demo: error: [Errno 20] Not a directory" in error
    assert "Traceback" not in error
