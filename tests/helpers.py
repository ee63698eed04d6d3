"""Helpers shared by the tests: the small random teacher, and the real `anomalib` console script in a subprocess."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

SMALL_TEACHER = "vit_small_patch14_dinov2"
ANOMALIB = Path(sys.executable).parent / "anomalib"
SMALL_MODEL_ARGS = [
    "--model.pretrained", "false",
    "--model.teacher", SMALL_TEACHER,
    "--model.image_size", "112",
]  # fmt: skip


def data_args(root: Path, category: str = "brick") -> list[str]:
    """CLI options for the generated MVTec-AD-layout dataset."""
    return [
        "--data", "anomalib.data.MVTecAD",
        "--data.root", str(root),
        "--data.category", category,
        "--data.num_workers", "0",
        "--data.train_batch_size", "4",
        "--data.eval_batch_size", "4",
    ]  # fmt: skip


# anomalib's CLI takes --seed_everything but never seeds (anomalib 2.7): this runs its console script seeded.
SEEDED = (
    "import lightning, runpy, sys; lightning.seed_everything({seed}); sys.argv[0] = {script!r}; "
    "runpy.run_path({script!r}, run_name='__main__')"
)


def run_cli(
    args: list[str],
    cwd: Path,
    python: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: int = 600,
    seed: int | None = None,
) -> subprocess.CompletedProcess:
    """Run the anomalib console script (optionally under another interpreter, or seeded) and return the process.

    The Hugging Face Hub is switched to offline mode unless ``env`` says otherwise.
    """
    if seed is not None:
        command = [str(python or sys.executable), "-c", SEEDED.format(seed=seed, script=str(ANOMALIB)), *args]
    else:
        command = [str(python), str(ANOMALIB), *args] if python else [str(ANOMALIB), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "COLUMNS": "500", **(env or {})}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, check=False)


# Several runs of the console script in one interpreter, for jobs that would each pay seconds of imports.
IN_SEQUENCE = (
    "import json, runpy, sys\n"
    "script, runs = sys.argv[1], json.loads(sys.argv[2])\n"
    "for arguments in runs:\n"
    "    sys.argv = [script, *arguments]\n"
    "    try:\n"
    "        runpy.run_path(script, run_name='__main__')\n"
    "    except SystemExit as ended:\n"
    "        if ended.code not in (None, 0):\n"
    "            raise\n"
)


def run_cli_in_sequence(runs: list[list[str]], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the anomalib console script once per argument list, one after another in one new interpreter.

    The process fails (non-zero status, the traceback on stderr) at the first run that fails.
    """
    command = [sys.executable, "-c", IN_SEQUENCE, str(ANOMALIB), json.dumps(runs)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "COLUMNS": "500"}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, check=False)


def anomalib_cli(args: list[str]) -> None:
    """Run anomalib's CLI on ``args`` in this process, as its console script does after setting up logging.

    For tests of what the CLI parses and runs, without a new interpreter's seconds of imports; what the user
    of the console script sees (its output, its exit status) is tested with :func:`run_cli`.
    """
    from anomalib.cli import AnomalibCLI

    AnomalibCLI(args=args)


def printed_config(args: list[str]) -> dict[str, Any]:
    """The configuration `anomalib <args> --print_config` prints, parsed (see :func:`anomalib_cli`)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as ended:
        anomalib_cli([*args, "--print_config"])
    assert ended.value.code in (None, 0), printed.getvalue()
    return yaml.safe_load(printed.getvalue())


def checkpoints(root: Path) -> list[Path]:
    """Checkpoints written below ``root``."""
    return sorted(root.rglob("*.ckpt"))


def listed_keys(index: Path) -> set[str]:
    """The keys a teacher-feature spill file's index (``rank<N>.log``) lists: every line after the header."""
    return {line.split()[0] for line in index.read_text().splitlines()[1:]} if index.exists() else set()
