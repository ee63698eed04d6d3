r"""Soak run of the teacher-feature cache: two fits at once on one folder, `cache list`/`clear` meanwhile, a kill -9.

1. Each category is trained once without a cache: the reference students.
2. Two fits (two categories) start at once on one cache folder (memory budget 0: every entry goes to disk,
   float32), while a third process runs ``transformer-student cache list`` and ``cache clear`` in a loop.
3. The second fit is killed with SIGKILL as soon as its spill file holds a few entries, then run again: it
   adopts the killed run's file.
4. Every finished fit's students are compared with the reference of its category.

    python benchmarks/cache_soak.py
    python benchmarks/cache_soak.py --images 24 --epochs 4
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_summary, markdown_row, markdown_rule

CATEGORIES = ("brick", "grass")


def fit(root: str, category: str, workdir: str, cache_dir: str, epochs: str) -> None:
    """One fit (``cache_dir`` "-" for none); saves the students' weights to ``workdir/students.pt``."""
    import torch
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from anomalib_transformer_student import TransformerStudent

    seed_everything(0)
    model = TransformerStudent(
        teacher="vit_small_patch14_dinov2",
        pretrained=False,
        image_size=56,
        feature_cache={
            "enabled": cache_dir != "-",
            "dir": None if cache_dir == "-" else cache_dir,
            "dtype": "float32",
            "memory_budget_mb": 0,
        },
    )
    engine = Engine(
        max_epochs=int(epochs),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=workdir,
    )
    datamodule = MVTecAD(root=root, category=category, train_batch_size=2, eval_batch_size=2, num_workers=0)
    engine.fit(model, datamodule=datamodule)
    students = {name: value for name, value in model.model.state_dict().items() if "student" in name}
    torch.save(students, Path(workdir) / "students.pt")


def start_fit(root: Path, category: str, workdir: Path, cache: Path | str, epochs: int) -> subprocess.Popen:
    workdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, __file__, "--fit", str(root), category, str(workdir), str(cache), str(epochs)]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> None:
    _, errors = process.communicate(timeout=3600)
    if process.returncode != 0:
        raise RuntimeError(errors[-3000:])


def listed(cache: Path, keys: set[str]) -> int:
    """Most entries of ``keys`` that one spill file's index lists."""
    most = 0
    for index in cache.glob("*/*.log"):
        try:
            lines = index.read_text().splitlines()[1:]
        except OSError:
            continue
        most = max(most, len({line.split()[0] for line in lines if line.split()} & keys))
    return most


def max_difference(first: Path, second: Path) -> float:
    import torch

    a, b = torch.load(first), torch.load(second)
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16, help="Training images per category.")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--fit", nargs=5, metavar=("ROOT", "CATEGORY", "WORKDIR", "CACHE", "EPOCHS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.fit:
        fit(*args.fit)
        return

    from anomalib_transformer_student.apps.demo_data import DemoDatasetSpec, generate_demo_dataset
    from anomalib_transformer_student.training.feature_cache import image_key

    work = Path(tempfile.mkdtemp(prefix="cache-soak-"))
    spec = DemoDatasetSpec(
        categories=CATEGORIES, image_size=64, n_train=args.images, n_test_good=2, n_test_per_defect=1
    )
    root = generate_demo_dataset(work / "data", spec)
    cache = work / "cache"
    started = time.perf_counter()
    for category in CATEGORIES:
        finish(start_fit(root, category, work / f"{category}-uncached", "-", args.epochs))
    reference_s = time.perf_counter() - started

    # Two fits at once, a third process listing and clearing the folder all along.
    janitor_script = (
        "import pathlib, sys, time\nfrom anomalib_transformer_student.apps.cli import main\nrounds = errors = 0\n"
        "while not pathlib.Path(sys.argv[2]).exists():\n"
        "    for action in ('list', 'clear'):\n"
        "        errors += main(['cache', action, '--cache-dir', sys.argv[1]]) != 0\n"
        "    rounds += 1\n    time.sleep(0.05)\n"
        "print(rounds, errors, file=sys.stderr)\n"
    )
    started = time.perf_counter()
    first = start_fit(root, CATEGORIES[0], work / CATEGORIES[0], cache, args.epochs)
    second = start_fit(root, CATEGORIES[1], work / f"{CATEGORIES[1]}-killed", cache, args.epochs)
    janitor = subprocess.Popen(
        [sys.executable, "-c", janitor_script, str(cache), str(work / "stop")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    second_keys = {image_key(path) for path in (root / CATEGORIES[1] / "train" / "good").iterdir()}
    while listed(cache, second_keys) < 3:
        if second.poll() is not None:
            raise RuntimeError("the second fit ended before it could be killed")
        time.sleep(0.01)
    second.send_signal(signal.SIGKILL)
    second.wait()
    entries_at_kill = listed(cache, second_keys)
    rerun = start_fit(root, CATEGORIES[1], work / CATEGORIES[1], cache, args.epochs)
    finish(first)
    finish(rerun)
    soak_s = time.perf_counter() - started
    (work / "stop").touch()
    janitor_rounds, janitor_errors = janitor.communicate(timeout=600)[1].split()[-2:]
    rounds = subprocess.run(
        [sys.executable, "-m", "anomalib_transformer_student.apps.cli", "cache", "list", "--cache-dir", str(cache)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    print(f"CPU: {cpu_summary()}")
    print(f"{args.images} training images per category, {args.epochs} epochs, ViT-S/14 random at 56 px\n")
    print(markdown_row(["fit", "students vs uncached (max abs)"]))
    print(markdown_rule("lr"))
    for category, label in ((CATEGORIES[0], "concurrent"), (CATEGORIES[1], "rerun after kill -9")):
        difference = max_difference(work / category / "students.pt", work / f"{category}-uncached" / "students.pt")
        print(markdown_row([f"{category} ({label})", f"{difference:.1e}"]))
    print(f"\nThe second fit was killed after {entries_at_kill} of its entries were listed.")
    print(f"`cache list` + `cache clear` rounds during the soak: {janitor_rounds}, failed commands: {janitor_errors}")
    print(f"Uncached reference fits {reference_s:.0f} s; soak {soak_s:.0f} s")
    print("cache list after the soak:\n" + rounds)


if __name__ == "__main__":
    main()
