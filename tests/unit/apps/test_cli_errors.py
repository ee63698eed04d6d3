"""`transformer-student`: a user's error ends in one message and exit status 2, a defect keeps its traceback."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from anomalib_transformer_student.apps import cli
from anomalib_transformer_student.training.teacher_checkpoint import TeacherNotInCheckpointError

CONSOLE_SCRIPT = Path(sys.executable).parent / "transformer-student"


def _command(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """Register a sub-command ``fail`` that raises ``error``."""

    def run(args: object) -> int:
        raise error

    module = types.ModuleType("failing_command")
    module.add_arguments = lambda parser: None
    module.run = run
    monkeypatch.setitem(sys.modules, "failing_command", module)
    monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, cli.Command("fail", "Fails.", "failing_command")))


@pytest.mark.parametrize(
    "error",
    [
        ValueError("--ckpt expects CATEGORY=PATH, got 'screw'."),
        FileNotFoundError("Checkpoint not found for category 'screw': 'screw.ckpt'."),
        PermissionError(13, "Permission denied", "/read-only/report"),
        TeacherNotInCheckpointError("This checkpoint was written during training without ..."),
    ],
    ids=["value", "file-not-found", "permission", "package-error"],
)
def test_user_errors_print_one_message_and_exit_2(
    error: Exception, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _command(monkeypatch, error)

    assert cli.main(["fail"]) == 2

    captured = capsys.readouterr()
    assert captured.err == f"transformer-student fail: error: {error}\n"
    assert captured.out == ""


def test_defects_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    _command(monkeypatch, KeyError("a defect, not the user's doing"))
    with pytest.raises(KeyError, match="a defect"):
        cli.main(["fail"])


def test_the_console_script_ends_a_bad_option_without_a_traceback(tmp_path: Path) -> None:
    """``--ckpt screw`` (no ``=PATH``) ends with the usage message, not a ``ValueError`` traceback."""
    command = [str(CONSOLE_SCRIPT), "evaluate", "--ckpt", "screw", "--data-root", str(tmp_path)]

    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)

    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "transformer-student evaluate: error: --ckpt expects CATEGORY=PATH, got 'screw'." in result.stderr
