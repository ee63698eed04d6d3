"""The examples run as a user runs them: train, test, export and infer in Python; OpenVINO on a folder."""

from __future__ import annotations

import csv
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).parents[2] / "examples"


def run_example(name: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``examples/<name>`` with this interpreter in ``cwd`` (the OpenVINO inferencer writes a cache there)."""
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"},
    )


@pytest.fixture(scope="module")
def python_api(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """`examples/python_api.py` on the generated data with a tiny random-weight model; its output folder."""
    workdir = tmp_path_factory.mktemp("python_api")
    result = run_example(
        "python_api.py",
        ["--root", str(demo_root), "--category", "brick", "--teacher", "vit_small_patch14_dinov2",
         "--image-size", "112", "--epochs", "1", "--num-workers", "0", "--random-teacher",
         "--output", str(workdir / "results")],
        cwd=workdir,
    )  # fmt: skip
    return result, workdir / "results"


def test_python_api_trains_tests_exports_and_infers(python_api: tuple[subprocess.CompletedProcess, Path]) -> None:
    result, output = python_api
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test: image_AUROC" in result.stdout
    (exported,) = output.rglob("model.xml")
    assert f"exported: {exported}" in result.stdout
    predictions = [line for line in result.stdout.splitlines() if ": score " in line]
    assert predictions
    assert all(line.endswith(("good", "ANOMALOUS")) for line in predictions)


def test_openvino_inference_writes_overlays_and_scores(
    python_api: tuple[subprocess.CompletedProcess, Path], demo_root: Path, tmp_path: Path
) -> None:
    assert python_api[0].returncode == 0, python_api[0].stderr[-3000:]
    (exported,) = python_api[1].rglob("model.xml")
    images = demo_root / "brick" / "test" / "stain"
    output = tmp_path / "predictions"
    result = run_example(
        "openvino_inference.py", ["--model", str(exported), "--images", str(images), "--output", str(output)], tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]

    with (output / "scores.csv").open() as file:
        rows = list(csv.DictReader(file))
    names = sorted(path.name for path in images.glob("*.png"))
    assert [row["image"] for row in rows] == names
    assert all(0 <= float(row["score"]) <= 1 and row["label"] in {"0", "1"} for row in rows)
    for name in names:
        overlay = Image.open(output / "overlays" / name)
        assert overlay.size == Image.open(images / name).size
        assert overlay.mode == "RGB"


def test_openvino_inference_names_a_missing_or_empty_folder(tmp_path: Path) -> None:
    example = runpy.run_path(str(EXAMPLES / "openvino_inference.py"))  # its functions, without running main
    with pytest.raises(FileNotFoundError, match=r"Image folder '.*nowhere' does not exist"):
        example["predict_folder"](tmp_path / "model.xml", tmp_path / "nowhere", tmp_path / "predictions")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No images"):
        example["predict_folder"](tmp_path / "model.xml", tmp_path / "empty", tmp_path / "predictions")
