"""Helpers shared by the tests: the small random teacher, and the real `anomalib` console script in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def run_cli(
    args: list[str], cwd: Path, python: Path | None = None, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run the anomalib console script (optionally under another interpreter) and return the finished process.

    The Hugging Face Hub is switched to offline mode unless ``env`` says otherwise.
    """
    command = [str(python), str(ANOMALIB), *args] if python else [str(ANOMALIB), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "COLUMNS": "500", **(env or {})}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, check=False)


def checkpoints(root: Path) -> list[Path]:
    """Checkpoints written below ``root``."""
    return sorted(root.rglob("*.ckpt"))


def listed_keys(index: Path) -> set[str]:
    """The keys a teacher-feature spill file's index (``rank<N>.log``) lists: every line after the header."""
    return {line.split()[0] for line in index.read_text().splitlines()[1:]} if index.exists() else set()
