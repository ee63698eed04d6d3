r"""``transformer-student evaluate``: the paper's defect-size evaluation of trained checkpoints.

Each checkpoint is tested on its category of an MVTec-AD-layout dataset at full resolution; the
console shows the 4 x 4 size-AUPRO table per category with image AUROC, pixel AUROC and AUPRO, and
the output folder receives the same as CSV, Markdown and a PNG plot.

``--dataset mvtecad2`` tests on MVTec AD 2's ``test_public`` (``--data-root`` holds ``can/``, ..., ``walnuts/``)
and adds its metrics: AU-PRO at FPR 0.05 (``pixel_AUPRO_fpr0.05``) and the segmentation F1 of the thresholded
maps (SegF1, ``pixel_F1Score``), with the image F1 (``image_F1Score``).

``--curve authors`` computes the size table with the authors' sampled PRO curve, as the paper's tables do;
the default ``exact`` curve is anomalib's (see :mod:`anomalib_transformer_student.metrics.size_aupro`).

Everything the command writes goes under ``--output``, anomalib's per-image visualisations included
(``OUTPUT/TransformerStudent/MVTecAD/<category>/``); nothing is written beside the checkpoints. Each
category's folder must exist under ``--data-root``: the command checks them all before it loads a
checkpoint, and never downloads a dataset.

Example:
    transformer-student evaluate --data-root datasets/MVTecAD \\
        --ckpt screw=results/TransformerStudent/MVTecAD/screw/latest/weights/lightning/model.ckpt \\
        --output size_report --curve authors
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from anomalib.data import MVTecAD, MVTecAD2
from anomalib.engine import Engine

from ..metrics import CURVES, Curve, SizeEvaluator
from ..metrics.binned_aupro import BinnedAUPRO
from .checkpoints import load_model
from .evaluate_report import CategoryResult, markdown_report, write_report

SCALAR_METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")
MVTECAD2_METRICS = ("image_F1Score", "pixel_F1Score", "pixel_AUPRO_fpr0.05")
"""Added with ``--dataset mvtecad2``: image F1, SegF1 and AU-PRO at FPR 0.05, MVTec AD 2's metrics."""
DATASETS = ("mvtecad", "mvtecad2")


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
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("size_report"),
        help="Folder for CSV, Markdown, PNG and anomalib's per-image visualisations; nothing is written elsewhere.",
    )
    parser.add_argument(
        "--dataset", choices=DATASETS, default=DATASETS[0],
        help="'mvtecad' (MVTec AD's layout) or 'mvtecad2' (test_public of MVTec AD 2, with AU-PRO at FPR 0.05 and "
        "SegF1). Default: %(default)s.",
    )  # fmt: skip
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


def check_category_folders(data_root: Path, categories: list[str]) -> None:
    """Check that each category has its folder under ``data_root`` (anomalib would download MVTec AD otherwise).

    Raises:
        FileNotFoundError: Naming the missing folders and the categories that ``data_root`` holds.
    """
    missing = [category for category in categories if not (Path(data_root) / category).is_dir()]
    if not missing:
        return
    found = sorted(path.name for path in Path(data_root).iterdir() if path.is_dir()) if Path(data_root).is_dir() else []
    folders = ", ".join(f"'{Path(data_root) / category}'" for category in missing)
    holds = f"it holds: {', '.join(found)}" if found else "it holds no category folder"
    msg = (
        f"No folder for category {', '.join(repr(category) for category in missing)} under --data-root "
        f"'{data_root}' ({holds}); expected {folders}. Check the spelling of the category and of --data-root "
        "(evaluate never downloads a dataset)."
    )
    raise FileNotFoundError(msg)


def check_folders(data_root: Path, categories: list[str], dataset: str = "mvtecad") -> None:
    """Check each category's test folders for ``dataset`` (MVTec AD 2: ``test_public``) before anything loads."""
    if dataset == "mvtecad2":
        from .mvtecad2_predictions import check_mvtecad2_folders

        for category in categories:
            check_mvtecad2_folders(data_root, category, ["test_public"])
    else:
        check_category_folders(data_root, categories)


def evaluate_checkpoint(
    checkpoint: Path,
    data_root: Path,
    category: str,
    batch_size: int = 4,
    num_workers: int = 0,
    curve: Curve = "exact",
    output: Path | None = None,
    dataset: str = "mvtecad",
) -> CategoryResult:
    """Test one checkpoint on its category with the size-AUPRO metric added to the usual ones.

    anomalib's files (the per-image visualisations) go under ``output``
    (``output/TransformerStudent/MVTecAD/<category>/``), or into a temporary folder removed afterwards when
    ``output`` is ``None``; nothing is written beside the checkpoint.

    Raises:
        FileNotFoundError: If ``data_root`` has no folder for ``category`` (checked first: nothing is downloaded).
        CheckpointLoadError: If ``checkpoint`` cannot be loaded (not a checkpoint, truncated, refused by torch).
    """
    check_folders(data_root, [category], dataset)
    if output is None:
        with tempfile.TemporaryDirectory(prefix="transformer_student_evaluate_") as scratch:
            return evaluate_checkpoint(
                checkpoint, data_root, category, batch_size, num_workers, curve, Path(scratch), dataset
            )
    loaders = {"root": data_root, "category": category, "eval_batch_size": batch_size,
               "train_batch_size": batch_size, "num_workers": num_workers}  # fmt: skip
    if dataset == "mvtecad2":
        evaluator = SizeEvaluator(curve=curve, include_f1=True, extra_metrics=[BinnedAUPRO(prefix="pixel_")])
        datamodule = MVTecAD2(**loaders, test_type="public")
    else:
        evaluator = SizeEvaluator(curve=curve)
        datamodule = MVTecAD(**loaders)
    # A single test reads each image once: no feature cache, so nothing is written outside ``output``.
    model = load_model(checkpoint, evaluator=evaluator, feature_cache=False)
    engine = Engine(logger=False, default_root_dir=output)
    (results,) = engine.test(model, datamodule=datamodule)
    names = SCALAR_METRICS + (MVTECAD2_METRICS if dataset == "mvtecad2" else ())
    metrics = {name: float(results[name]) for name in names if name in results}
    return CategoryResult(category=category, table=evaluator.size_aupro().last_table.cpu(), metrics=metrics)


def run(args: argparse.Namespace) -> int:
    """Check every category folder, evaluate every checkpoint, print the report, write it; return the exit code."""
    checkpoints = parse_checkpoints(args.ckpt)
    check_folders(args.data_root, [category for category, _ in checkpoints], args.dataset)
    results = [
        evaluate_checkpoint(
            path, args.data_root, category, args.batch_size, args.num_workers, args.curve, args.output, args.dataset
        )
        for category, path in checkpoints
    ]
    print(markdown_report(results))
    paths = write_report(results, args.output)
    print("Written: " + ", ".join(str(path) for path in paths.values()))
    return 0
