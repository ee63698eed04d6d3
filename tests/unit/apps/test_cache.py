"""``transformer-student cache list|clear``: they change nothing but unused cache folders, and refuse other folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from anomalib_transformer_student.apps.cli import main
from anomalib_transformer_student.feature_cache.run_folder import CacheRoot


def state(folder: Path) -> list[tuple[str, int, bytes | None]]:
    paths = [folder, *folder.rglob("*")]
    return sorted((str(p), p.lstat().st_mode, p.read_bytes() if p.is_file() else None) for p in paths)


@pytest.mark.parametrize("kind", ["user files", "world-writable", "link"])
@pytest.mark.parametrize("action", ["list", "clear"])
def test_a_folder_that_is_not_a_cache_is_refused_in_one_line_and_left_as_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], action: str, kind: str
) -> None:
    folder = tmp_path / "projects"
    (folder / "thesis" / "sub").mkdir(parents=True)
    (folder / "thesis" / "chapter1.tex").write_text("important")
    (folder / "tsfc-0123456789abcdef").mkdir()
    folder.chmod(0o777 if kind == "world-writable" else 0o755)
    if kind == "world-writable":
        (folder / "thesis").rename(tmp_path / "thesis")  # only cache-like names left: refused for the mode
    target = folder
    if kind == "link":
        target = tmp_path / "link"
        target.symlink_to(folder)
    before = state(tmp_path)
    assert main(["cache", action, "--cache-dir", str(target)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(target) in error
    assert state(tmp_path) == before


def test_list_shows_and_clear_removes_only_unused_cache_folders(tmp_path: Path, capsys) -> None:
    root = CacheRoot(tmp_path)
    running = root.create_run({"purpose": "training"})
    old, new = root.create_run({"purpose": "evaluation"}), root.create_run({"purpose": "training"})
    (old.path / "rank0.bin").write_bytes(b"x" * 2**20)
    record = (old.path / "about.json").read_text().replace('"created": ', '"created": 1, "was": ')
    (old.path / "about.json").write_text(record)
    old.release(), new.release()
    os.rename(new.path, tmp_path / f".tsfc-trash-{new.name[5:]}")  # a removal killed half way
    before = sorted(path.name for path in tmp_path.iterdir())

    assert main(["cache", "list", "--cache-dir", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert "1.0 MB in 3 folders" in listing
    rows = {line.split()[0]: line for line in listing.splitlines()[1:]}
    assert "in use" in rows[running.name] and "1970-01-01" in rows[old.name] and "evaluation" in rows[old.name]
    assert sorted(path.name for path in tmp_path.iterdir()) == before  # list changed nothing

    assert main(["cache", "clear", "--older-than", "1", "--cache-dir", str(tmp_path)]) == 0
    assert "Removed 2 folders" in capsys.readouterr().out  # the old one and the trash
    assert sorted(path.name for path in tmp_path.iterdir()) == [".tsfc-budget.lock", running.name]
    assert main(["cache", "clear", "--cache-dir", str(tmp_path)]) == 0
    assert running.path.exists()  # in use: kept
    running.remove()
    root.close()


def test_cache_command_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cache", "list", "--older-than", "3", "--cache-dir", str(tmp_path)]) == 2
    assert "--older-than" in capsys.readouterr().err
    assert main(["cache", "list", "--cache-dir", str(tmp_path / "none")]) == 0
    assert "No teacher-feature cache" in capsys.readouterr().out
    assert not (tmp_path / "none").exists()
