"""The examples run as a user runs them: train, test, export and infer in Python; OpenVINO on a folder."""

from __future__ import annotations

import csv
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
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


@pytest.fixture
def example_here(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path):
    """Run ``examples/<name>`` as from its command line, but in this process (in ``tmp_path``).

    What the script does is the same; the seconds a new interpreter takes to import anomalib are saved.
    Returns a ``CompletedProcess`` with its exit status and output, as :func:`run_example` does.
    """

    def run(name: str, args: list[str]) -> subprocess.CompletedProcess:
        monkeypatch.chdir(tmp_path)  # the OpenVINO inferencer writes a cache here
        monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *args])
        try:
            runpy.run_path(str(EXAMPLES / name), run_name="__main__")
            status = 0
        except SystemExit as ended:
            status = ended.code if isinstance(ended.code, int) else int(ended.code is not None)
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(sys.argv, status, captured.out, captured.err)

    return run


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
    assert [path.name for path in output.parent.iterdir()] == ["results"]  # nothing outside --output
    assert (output / "openvino_cache").is_dir()


def test_openvino_inference_writes_overlays_and_scores(
    python_api: tuple[subprocess.CompletedProcess, Path], demo_root: Path, tmp_path: Path, example_here
) -> None:
    assert python_api[0].returncode == 0, python_api[0].stderr[-3000:]
    (exported,) = python_api[1].rglob("model.xml")
    images = demo_root / "brick" / "test" / "stain"
    output = tmp_path / "predictions"
    result = example_here(
        "openvino_inference.py",
        ["--model", str(exported), "--images", str(images), "--output", str(output), "--precision", "f32"],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "computing in f32 (--precision f32)" in result.stdout
    assert [path.name for path in tmp_path.iterdir()] == ["predictions"]  # nothing outside --output
    assert (output / "openvino_cache").is_dir()

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


class HeightScore(torch.nn.Module):
    """A stand-in for an exported model, with its outputs: the score is the height of the image it receives / 1000."""

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        anomaly_map = images.mean(dim=1, keepdim=True)
        score = torch.ones_like(images[:, 0, 0, 0]) * images.shape[-2] / 1000
        return score, score > 0.5, anomaly_map, anomaly_map > 0.5


def stand_in_model(path: Path, height: int | None, width: int | None) -> Path:
    """Save ``HeightScore`` as an OpenVINO IR taking ``height`` x ``width`` images (``None``: any size)."""
    import openvino as ov

    shape = ov.PartialShape([-1, 3, height or -1, width or -1])
    model = ov.convert_model(HeightScore(), example_input=torch.rand(1, 3, 64, 64), input=[shape])
    for output, name in zip(model.outputs, ["pred_score", "pred_label", "anomaly_map", "pred_mask"], strict=True):
        output.get_tensor().set_names({name})
    ov.save_model(model, path)
    return path


@pytest.fixture
def images_of_three_sizes(tmp_path: Path) -> dict[str, tuple[int, int]]:
    """Square, non-square and odd-sized images in ``tmp_path / 'images'``; their (width, height) by name."""
    sizes = {"a.png": (64, 64), "b.png": (120, 50), "c.png": (71, 93)}
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    for name, (width, height) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(tmp_path / "images" / name)
    return sizes


def read_scores(output: Path) -> dict[str, float]:
    with (output / "scores.csv").open() as file:
        return {row["image"]: float(row["score"]) for row in csv.DictReader(file)}


def test_openvino_inference_feeds_each_image_at_its_own_size_to_a_dynamic_graph(
    tmp_path: Path, images_of_three_sizes: dict[str, tuple[int, int]], example_here
) -> None:
    model = stand_in_model(tmp_path / "dynamic.xml", None, None)
    output = tmp_path / "predictions"
    result = example_here(
        "openvino_inference.py",
        ["--model", str(model), "--images", str(tmp_path / "images"), "--output", str(output)],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "any image size" in result.stdout
    assert read_scores(output) == {name: height / 1000 for name, (_, height) in images_of_three_sizes.items()}
    for name, size in images_of_three_sizes.items():
        assert Image.open(output / "overlays" / name).size == size


def test_openvino_inference_resizes_images_to_a_fixed_size_graph(
    tmp_path: Path, images_of_three_sizes: dict[str, tuple[int, int]], example_here
) -> None:
    model = stand_in_model(tmp_path / "fixed.xml", 64, 64)
    output = tmp_path / "predictions"
    result = example_here(
        "openvino_inference.py",
        ["--model", str(model), "--images", str(tmp_path / "images"), "--output", str(output)],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "images resized to 64 x 64" in result.stdout
    assert read_scores(output) == dict.fromkeys(images_of_three_sizes, 64 / 1000)
    for name, size in images_of_three_sizes.items():
        assert Image.open(output / "overlays" / name).size == size


@pytest.mark.parametrize(("precision", "expected"), [("f32", "f32"), ("bf16", "bf16"), ("f16", "f16")])
def test_openvino_inference_precision_pins_what_openvino_computes_in(
    tmp_path: Path, precision: str, expected: str
) -> None:
    import openvino as ov

    needed = {"bf16": "BF16", "f16": "FP16"}.get(precision)
    if needed and needed not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip(f"this CPU has no {precision} units")
    example = runpy.run_path(str(EXAMPLES / "openvino_inference.py"))
    inferencer = example["load_inferencer"](stand_in_model(tmp_path / "model.xml", None, None), "CPU", precision)
    assert example["inference_precision"](inferencer) == expected


def test_openvino_inference_refuses_an_unknown_precision_before_any_work(tmp_path: Path, example_here) -> None:
    output = tmp_path / "predictions"
    result = example_here(
        "openvino_inference.py",
        ["--model", str(tmp_path / "model.xml"), "--images", str(tmp_path), "--output", str(output),
         "--precision", "int4"],
    )  # fmt: skip
    assert result.returncode == 2
    assert "invalid choice: 'int4'" in result.stderr
    assert not output.exists()


class CoreWithout:
    """An ``openvino.Core`` stand-in whose device lacks some optimisation capabilities."""

    available_devices = ("CPU",)

    def __init__(self, *capabilities: str) -> None:
        self.capabilities = capabilities

    def get_property(self, device: str, name: str) -> list[str]:
        assert name == "OPTIMIZATION_CAPABILITIES"
        if device != "CPU":
            raise RuntimeError(f"no device {device}")
        return list(self.capabilities)


def test_openvino_inference_refuses_half_precision_a_device_lacks(tmp_path: Path, example_here) -> None:
    precision_config = runpy.run_path(str(EXAMPLES / "openvino_inference.py"))["precision_config"]
    avx2_cpu = CoreWithout("FP32", "INT8", "BIN", "EXPORT_IMPORT")
    for precision in ("bf16", "f16"):
        with pytest.raises(ValueError, match=rf"device 'CPU' has no {precision} units.*--precision auto.*or f32"):
            precision_config(precision, "CPU", avx2_cpu)
    with pytest.raises(ValueError, match=r"cannot query device 'NPU' \(available: CPU\)"):
        precision_config("bf16", "NPU", avx2_cpu)
    assert precision_config("bf16", "CPU", CoreWithout("FP32", "BF16")) == {"INFERENCE_PRECISION_HINT": "bf16"}
    assert precision_config("f32", "CPU", avx2_cpu) == {"INFERENCE_PRECISION_HINT": "f32"}
    assert precision_config("auto", "CPU", avx2_cpu) is None

    output = tmp_path / "predictions"  # from the command line: a clear error, nothing written
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    result = example_here(
        "openvino_inference.py",
        ["--model", str(stand_in_model(tmp_path / "model.xml", None, None)), "--images", str(tmp_path / "images"),
         "--output", str(output), "--device", "NO_SUCH_DEVICE", "--precision", "bf16"],
    )  # fmt: skip
    assert result.returncode == 2
    assert "cannot query device 'NO_SUCH_DEVICE'" in result.stderr
    assert not output.exists()
