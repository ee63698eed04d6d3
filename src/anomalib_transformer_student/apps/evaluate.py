r"""``transformer-student evaluate``: the paper's defect-size evaluation of trained checkpoints.

Each checkpoint is tested on its category of an MVTec-AD-layout dataset at full resolution; the
console shows the 4 x 4 size-AUPRO table per category with image AUROC, pixel AUROC and AUPRO, and
the output folder receives the same as CSV, Markdown and a PNG plot.

``--curve authors`` computes the size table with the authors' sampled PRO curve, as the paper's tables do;
the default ``exact`` curve is anomalib's (see :mod:`anomalib_transformer_student.metrics.size_aupro`).

Example:
    transformer-student evaluate --data-root datasets/MVTecAD \\
        --ckpt screw=results/TransformerStudent/MVTecAD/screw/latest/weights/lightning/model.ckpt \\
        --output size_report --curve authors
"""

from __future__ import annotations

import argparse
from pathlib import Path

from anomalib.data import MVTecAD
from anomalib.engine import Engine

from ..metrics import CURVES, Curve, SizeEvaluator
from ..model import TransformerStudent
from .size_report import CategoryResult, markdown_report, write_report

SCALAR_METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the evaluate command."""
    parser.add_argument(
        "--ckpt",
        action="append",
        required=True,
        metavar="CATEGORY=PATH",
        help="A trained checkpoint and the category it was trained on; repeat for several categories.",
    )
    parser.add_argument("--data-root", type=Path, required=True, help="Root of the MVTec-AD-layout dataset.")
    parser.add_argument("--output", type=Path, default=Path("size_report"), help="Folder for CSV, Markdown, PNG.")
    parser.add_argument("--batch-size", type=int, default=4, help="Test batch size.")
    parser.add_argument("--num-workers", type=int, default=0, help="Data loader workers.")
    parser.add_argument(
        "--curve",
        choices=CURVES,
        default=CURVES[0],
        help="PRO curve of the size table: 'exact' (anomalib's AUPRO) or 'authors' (the paper's tables). "
        "Default: %(default)s.",
    )


def parse_checkpoints(entries: list[str]) -> list[tuple[str, Path]]:
    """Split ``CATEGORY=PATH`` entries, checking that each file exists."""
    parsed = []
    for entry in entries:
        category, separator, path = entry.partition("=")
        if not separator or not category or not path:
            msg = f"--ckpt expects CATEGORY=PATH, got '{entry}'."
            raise ValueError(msg)
        if not Path(path).is_file():
            msg = f"Checkpoint not found for category '{category}': '{path}'."
            raise FileNotFoundError(msg)
        parsed.append((category, Path(path)))
    return parsed


def evaluate_checkpoint(
    checkpoint: Path,
    data_root: Path,
    category: str,
    batch_size: int = 4,
    num_workers: int = 0,
    curve: Curve = "exact",
) -> CategoryResult:
    """Test one checkpoint on its category with the size-AUPRO metric added to the usual ones."""
    evaluator = SizeEvaluator(curve=curve)
    model = TransformerStudent.load_from_checkpoint(checkpoint, evaluator=evaluator)
    datamodule = MVTecAD(
        root=data_root, category=category, eval_batch_size=batch_size, train_batch_size=batch_size,
        num_workers=num_workers,
    )  # fmt: skip
    engine = Engine(logger=False, default_root_dir=Path(checkpoint).parent / "evaluate")
    (results,) = engine.test(model, datamodule=datamodule)
    metrics = {name: float(results[name]) for name in SCALAR_METRICS if name in results}
    return CategoryResult(category=category, table=evaluator.size_aupro().last_table.cpu(), metrics=metrics)


def run(args: argparse.Namespace) -> int:
    """Evaluate every checkpoint, print the report, write it; return the exit code."""
    results = [
        evaluate_checkpoint(path, args.data_root, category, args.batch_size, args.num_workers, args.curve)
        for category, path in parse_checkpoints(args.ckpt)
    ]
    print(markdown_report(results))
    paths = write_report(results, args.output)
    print("Written: " + ", ".join(str(path) for path in paths.values()))
    return 0
