"""Installing the wheel: the short name works in a fresh environment and costs nothing at start-up."""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from ..helpers import SMALL_MODEL_ARGS, checkpoints, data_args, run_cli

REPO = Path(__file__).parents[2]
HEAVY_MODULES = ("torch", "timm", "lightning", "anomalib")


def import_times(python: str) -> dict[str, int]:
    """Cumulative import time in microseconds of each module imported by `python -X importtime -c pass`."""
    result = subprocess.run([python, "-X", "importtime", "-c", "pass"], capture_output=True, text=True, check=True)
    times = {}
    for line in result.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s+(\S+)", line.strip())
        if match:
            times[match.group(2).strip()] = int(match.group(1))
    return times


def test_interpreter_start_imports_nothing_heavy() -> None:
    runs = [import_times(sys.executable) for _ in range(5)]
    modules = set().union(*runs)
    heavy = sorted(name for name in modules if name.split(".")[0] in HEAVY_MODULES)
    assert heavy == []
    hook_times = [run["anomalib_transformer_student_hook"] for run in runs]
    assert min(hook_times) < 2000, f"registration hook took {hook_times} us"


@pytest.fixture(scope="module")
def fresh_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment with the built wheel installed; dependencies come from this one's site-packages."""
    workdir = tmp_path_factory.mktemp("fresh_env")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-w", str(workdir / "dist"), str(REPO)],
        check=True, capture_output=True,
    )  # fmt: skip
    wheel = next((workdir / "dist").glob("anomalib_transformer_student-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(workdir / "venv")], check=True)
    python = workdir / "venv" / "bin" / "python"
    site_packages = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    )  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site_packages), str(wheel)],
        check=True, capture_output=True,
    )  # fmt: skip
    # A plain path line: the dependencies become importable, but this environment's own .pth
    # files (the editable install of this package among them) are not processed.
    (site_packages / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_wheel_carries_the_hook(fresh_python: Path) -> None:
    result = subprocess.run(
        [str(fresh_python), "-c",
         "import anomalib_transformer_student_hook, anomalib_transformer_student as p; print(p.__file__)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert str(REPO / "src") not in result.stdout, "the package came from the editable install, not the wheel"


def test_fresh_environment_trains_with_short_name(fresh_python: Path, demo_root: Path, tmp_path: Path) -> None:
    result = run_cli(
        ["train", "--model", "TransformerStudent", *SMALL_MODEL_ARGS, *data_args(demo_root),
         "--trainer.max_epochs", "1", "--default_root_dir", str(tmp_path / "results")],
        cwd=tmp_path,
        python=fresh_python,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoints(tmp_path / "results")
