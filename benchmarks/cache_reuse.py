r"""What reusing teacher features across runs would save in anomalib's benchmark pipeline.

Runs ``anomalib benchmark``'s pipeline (``anomalib.pipelines.Benchmark``, serial on the CPU, in this process) over
two generated categories, three times on one cache folder, and counts the images that reach the teacher:

(a) first run, on an empty folder;
(b) the same benchmark again, on the folder (a) left (all that cross-run reuse could serve);
(c) again, with the folder emptied first (no reuse possible).

The teacher is random (``pretrained=False``) but seeded, so that the three runs have the same weights, as a
pretrained teacher would. ``--memory-budget-mb 0`` (default) puts every entry on disk, the best case for reuse.

    python benchmarks/cache_reuse.py
    python benchmarks/cache_reuse.py --epochs 3 --images 8
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import torch
import yaml
from common import cpu_summary, markdown_row, markdown_rule

CATEGORIES = ("brick", "grass")


def benchmark_config(data_root: Path, cache_dir: Path, epochs: int, size: int, memory_budget_mb: float) -> dict:
    """The pipeline's YAML (as ``configs/benchmark.yaml``), small: CPU, a random ViT-S/14, the two categories."""
    cache = {"dir": str(cache_dir), "memory_budget_mb": memory_budget_mb}
    return {
        "accelerator": ["cpu"],
        "benchmark": {
            "seed": 42,
            "model": {
                "class_path": "TransformerStudent",
                "init_args": {
                    "teacher": "vit_small_patch14_dinov2",
                    "pretrained": False,
                    "image_size": size,
                    "max_epochs": epochs,
                    "feature_cache": cache,
                },
            },
            "data": {
                "class_path": "MVTecAD",
                "init_args": {
                    "root": str(data_root),
                    "train_batch_size": 4,
                    "eval_batch_size": 4,
                    "num_workers": 0,
                    "category": {"grid": list(CATEGORIES)},
                },
            },
        },
    }


class TeacherCounter:
    """Counts the images every ``TeacherFeatureExtractor`` of the process computes."""

    def __init__(self) -> None:
        from anomalib_transformer_student.model.teacher import TeacherFeatureExtractor

        self.images = 0
        original = TeacherFeatureExtractor.forward

        def counted(module: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            self.images += len(images)
            return original(module, images)

        TeacherFeatureExtractor.forward = counted


def run_benchmark(config: Path, counter: TeacherCounter) -> tuple[int, float]:
    """One pipeline run: the images the teacher computed and the wall time."""
    import anomalib.models  # noqa: F401  (the package's hook registers TransformerStudent on this import)
    from anomalib.pipelines import Benchmark

    torch.manual_seed(0)  # the same random teacher in every run, as pretrained weights would be
    before, start = counter.images, time.perf_counter()
    Benchmark().run(Namespace(config=config))
    return counter.images - before, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="training images per category")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--size", type=int, default=56, help="teacher input size (px)")
    parser.add_argument("--memory-budget-mb", type=float, default=0.0)
    args = parser.parse_args()

    from anomalib_transformer_student.apps.demo_data import DemoDatasetSpec, generate_demo_dataset

    work = Path(tempfile.mkdtemp(prefix="cache_reuse_"))
    spec = DemoDatasetSpec(categories=CATEGORIES, image_size=112, n_train=args.images, n_test_good=3)
    data_root = generate_demo_dataset(work / "data", spec)
    cache_dir = work / "cache"
    config = work / "benchmark.yaml"
    config.write_text(
        yaml.safe_dump(benchmark_config(data_root, cache_dir, args.epochs, args.size, args.memory_budget_mb))
    )
    counter = TeacherCounter()
    rows = []
    for label, empty_first in (
        ("(a) first run", False),
        ("(b) same run again, same folder", False),
        ("(c) folder emptied", True),
    ):
        if empty_first:
            shutil.rmtree(cache_dir, ignore_errors=True)
        images, seconds = run_benchmark(config, counter)
        rows.append((label, str(images), f"{seconds:.1f}"))
    print(
        f"\n{len(CATEGORIES)} categories, {args.images} training images each, {args.epochs} epochs, ViT-S/14 random at "
        f"{args.size} px, memory budget {args.memory_budget_mb:g} MB; {cpu_summary()}\n"
    )
    print(markdown_row(("run", "teacher images", "wall s")))
    print(markdown_rule("lrr"))
    for row in rows:
        print(markdown_row(row))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
