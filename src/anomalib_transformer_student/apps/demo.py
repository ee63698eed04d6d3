"""The demo job: generate a small texture dataset, train and test per category, write a report.

``transformer-student demo`` builds an MVTec-AD-layout dataset from photographs shipped with
scikit-image (see :mod:`anomalib_transformer_student.apps.demo_data`), trains and tests a
:class:`~anomalib_transformer_student.TransformerStudent` per category with anomalib's
``Engine``, and writes ``metrics.json`` and ``predictions.png`` to the output folder.

The teacher's pretrained weights are used when they can be had; otherwise the demo says so
loudly, records it in both outputs and continues with a randomly initialised teacher, so the
pipeline runs offline.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from anomalib.callbacks.checkpoint import ModelCheckpoint
from anomalib.data import MVTecAD
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from ..metrics import SizeEvaluator
from ..model import TransformerStudent
from ..model.teacher import DEFAULT_TEACHER, check_image_size, create_backbone
from ..training import teacher_weights
from .demo_data import TEXTURES, DemoDatasetSpec, generate_demo_dataset
from .demo_report import GridSample, format_metrics_table, save_prediction_grid, write_metrics_json

DEFAULT_DATA_ROOT = Path("datasets/transformer_student_demo")
DEFAULT_OUTPUT = Path("demo_output")
# Sized for a 2-core CPU, where the teacher dominates (about 0.4 s per 224-px image for ViT-B/14) and runs
# once per image: later epochs train the students on cached teacher features.
DEFAULT_IMAGE_SIZE = 224
DEFAULT_EPOCHS = 5
# The paper's text mentions 1e-3 (the model's default is the reference code's 1e-4): the demo has few steps.
DEFAULT_LR = 1e-3
# Batch 1 gives the students 12 steps per epoch on 12 training images for the same teacher cost.
TRAIN_BATCH_SIZE = 1
EVAL_BATCH_SIZE = 4
DATASET_SPEC = DemoDatasetSpec(image_size=256, n_train=12, n_test_good=4, n_test_per_defect=3)
DATASET_MARKER = ".transformer_student_demo.json"
METRIC_COLUMNS = ("image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_AUPRO", "pixel_F1Score")

__all__ = [
    "DemoSettings",
    "DemoSettingsError",
    "TeacherChoice",
    "add_arguments",
    "resolve_teacher",
    "run",
    "run_demo",
]


class DemoSettingsError(ValueError):
    """A demo setting is invalid; the message names it and the way out."""


@dataclass(frozen=True)
class DemoSettings:
    """Everything the demo run depends on.

    Example:
        >>> DemoSettings(categories=("brick",), image_size=112, epochs=1).teacher
        'vit_base_patch14_reg4_dinov2.lvd142m'
    """

    categories: tuple[str, ...] = tuple(TEXTURES)
    image_size: int = DEFAULT_IMAGE_SIZE
    epochs: int = DEFAULT_EPOCHS
    teacher: str = DEFAULT_TEACHER
    pretrained: bool = True
    lr: float = DEFAULT_LR
    output: Path = DEFAULT_OUTPUT
    data_root: Path = DEFAULT_DATA_ROOT
    seed: int = 0
    save_checkpoints: bool = False


@dataclass(frozen=True)
class TeacherChoice:
    """Which teacher weights the run uses, and why.

    Example:
        >>> resolve_teacher("vit_small_patch14_dinov2", use_pretrained=False).pretrained
        False
    """

    name: str
    pretrained: bool
    note: str
    state_dict: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def summary(self) -> dict[str, str | bool]:
        """Return the JSON record: name, whether the weights are pretrained, and the note."""
        return {"name": self.name, "pretrained": self.pretrained, "note": self.note}


def resolve_teacher(name: str, use_pretrained: bool) -> TeacherChoice:
    """Fetch the pretrained weights of ``name`` if wanted and available, else choose random weights.

    Decides within a few seconds when the Hub is unreachable (see
    :func:`~anomalib_transformer_student.training.teacher_weights.pretrained_weights_available`).
    """
    if not use_pretrained:
        return TeacherChoice(
            name,
            pretrained=False,
            note="RANDOM teacher weights, as requested (--no-pretrained): the run checks the pipeline; "
            "its scores say nothing about the method.",
        )
    if teacher_weights.pretrained_weights_available(name):
        try:
            return TeacherChoice(name, True, "pretrained weights", teacher_weights.fetch_pretrained_state_dict(name))
        except teacher_weights.TeacherWeightsUnavailableError as error:
            reason = str(error).splitlines()[0].rstrip(".")
    else:
        reason = "not in the local Hugging Face cache, and the Hub is unreachable or HF_HUB_OFFLINE is set"
    return TeacherChoice(
        name,
        pretrained=False,
        note=f"Pretrained weights UNAVAILABLE: {reason}. The teacher keeps RANDOM weights: the run checks "
        "the pipeline; its scores say nothing about the method. To use the real teacher, run once with "
        "internet access, or copy a Hugging Face cache (~/.cache/huggingface) holding the weights here.",
    )


def offline_banner(choice: TeacherChoice) -> str:
    """Frame a multi-line warning that the teacher has random weights."""
    rule = "!" * 100
    lines = [
        rule,
        f"!!  WARNING: teacher '{choice.name}' runs with RANDOM weights, not its pretrained DINOv2 weights.",
        *(f"!!  {line}" for line in _wrap(choice.note, 94)),
        "!!  The demo continues so that the whole pipeline can be seen working offline.",
        rule,
    ]
    return "\n".join(lines)


def _wrap(text: str, width: int) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}".strip()
    return [*lines, current]


def validate_settings(settings: DemoSettings) -> None:
    """Check the settings before any work starts.

    Raises:
        DemoSettingsError: Naming the bad setting and the valid choices.
    """
    unknown = sorted(set(settings.categories) - set(TEXTURES))
    if not settings.categories or unknown:
        msg = f"Unknown demo categories {unknown or '(none given)'}; choose among {sorted(TEXTURES)}."
        raise DemoSettingsError(msg)
    if settings.epochs < 1:
        msg = f"--epochs must be at least 1, got {settings.epochs}."
        raise DemoSettingsError(msg)
    if settings.lr <= 0:
        msg = f"--lr must be positive, got {settings.lr}."
        raise DemoSettingsError(msg)
    try:
        backbone = create_backbone(settings.teacher)
        check_image_size(settings.image_size, int(backbone.patch_embed.patch_size[0]))
    except ValueError as error:
        raise DemoSettingsError(str(error)) from error


def prepare_dataset(settings: DemoSettings) -> Path:
    """Generate the demo dataset under ``settings.data_root``, or reuse it if it matches.

    All textures are generated whatever ``settings.categories`` holds, so a category's images
    depend only on the seed. The folder carries a marker naming what was generated; a folder
    without the marker that is not empty is refused, so the demo never overwrites data it did
    not write.

    Before writing the dataset again (another seed or size), the demo deletes only its own texture
    folders: those its marker lists, real folders inside ``data_root``.

    Raises:
        DemoSettingsError: If ``data_root`` is a file, holds files the demo did not write, or its marker is
            corrupt or not the demo's.
    """
    spec = replace(DATASET_SPEC, categories=tuple(TEXTURES), seed=settings.seed)
    root = settings.data_root
    marker = root / DATASET_MARKER
    wanted = {**asdict(spec), "categories": list(spec.categories)}
    if root.exists() and not root.is_dir():
        msg = f"--data-root {root} is a file; choose a folder (the demo writes its dataset there)."
        raise DemoSettingsError(msg)
    if marker.is_file():
        written = _read_marker(marker)
        if written == wanted:
            print(f"Reusing the demo dataset in {root}.", flush=True)
            return root
        for folder in _own_folders(root, written["categories"]):
            shutil.rmtree(folder)
    elif root.exists() and any(root.iterdir()):
        msg = (
            f"--data-root {root} exists and holds files the demo did not write; "
            "choose an empty or new folder (the demo writes its dataset there)."
        )
        raise DemoSettingsError(msg)
    print(f"Generating the demo dataset in {root} ({', '.join(spec.categories)}).", flush=True)
    generate_demo_dataset(root, spec)
    marker.write_text(json.dumps(wanted, indent=2) + "\n")
    return root


def _read_marker(marker: Path) -> dict:
    """The demo's record of what it wrote (see :func:`prepare_dataset`), checked to be the demo's.

    Raises:
        DemoSettingsError: If the marker is unreadable, not JSON, or lists categories that are not the demo's
            textures (the demo deletes the folders it lists before writing the dataset again).
    """
    try:
        written = json.loads(marker.read_text())
    except (OSError, ValueError) as error:  # unreadable, not UTF-8, not JSON
        written = f"{type(error).__name__}: {error}"
    categories = written.get("categories") if isinstance(written, dict) else written
    valid = isinstance(categories, list) and all(isinstance(name, str) and name in TEXTURES for name in categories)
    if not isinstance(written, dict) or not valid:
        msg = (
            f"The demo's marker {marker} is corrupt or was not written by the demo (it must list categories among "
            f"{sorted(TEXTURES)}; found {categories!r}), so the demo deletes nothing it names. Choose a new "
            f"--data-root, or empty {marker.parent} yourself if nothing in it is needed."
        )
        raise DemoSettingsError(msg)
    return written


def _own_folders(root: Path, categories: Sequence[str]) -> list[Path]:
    """The texture folders in ``root`` that the demo is about to write again, each checked to be its own.

    Each must be listed in the marker (``categories``) and be a real folder inside ``root``.

    Raises:
        DemoSettingsError: If one is a link or is not listed in the marker, naming it.
    """
    inside = root.resolve()
    folders = [root / name for name in TEXTURES if (root / name).exists() or (root / name).is_symlink()]
    foreign = [
        str(folder)
        for folder in folders
        if folder.name not in categories or folder.is_symlink() or not folder.resolve().is_relative_to(inside)
    ]
    if foreign:
        msg = (
            f"{', '.join(foreign)} in --data-root {root}: not written by the demo (a link, or a folder its marker "
            "does not list), so the demo will not delete it to write its dataset again. Choose a new --data-root, "
            "or move it away yourself."
        )
        raise DemoSettingsError(msg)
    return folders


def build_model(settings: DemoSettings, choice: TeacherChoice) -> TransformerStudent:
    """Build a fresh model whose teacher holds the chosen weights (so training never fetches)."""
    evaluator = SizeEvaluator(summaries={}, include_f1=True, strict=False)
    model = TransformerStudent(
        teacher=settings.teacher,
        pretrained=choice.pretrained,
        image_size=settings.image_size,
        lr=settings.lr,
        evaluator=evaluator,
        visualizer=False,
    )
    if choice.state_dict is not None:
        model.model.teacher.load_backbone_state_dict(choice.state_dict)
    return model


def select_grid_indices(dataset: AnomalibDataset, defective_per_category: int = 3) -> list[int]:
    """One test image per defect type (up to ``defective_per_category``) and one good image."""
    first_of_kind: dict[str, int] = {}
    for index, image_path in enumerate(dataset.samples.image_path):
        first_of_kind.setdefault(Path(image_path).parent.name, index)
    good = first_of_kind.pop("good", None)
    chosen = sorted(first_of_kind.items())[:defective_per_category]
    return [index for _, index in chosen] + ([good] if good is not None else [])


@torch.no_grad()
def predict_samples(model: TransformerStudent, dataset: AnomalibDataset, indices: Sequence[int]) -> list[GridSample]:
    """Run the trained model in eval mode on a few test images, as an exported model would.

    The model's forward pre-processes, predicts and post-processes, so the maps come back at
    the images' size and maps and scores are normalised by the statistics gathered in
    validation (0.5 at the threshold).
    """
    items = [dataset[index] for index in indices]
    predictions = model.eval()(torch.stack([item.image for item in items]))
    samples = []
    for item, anomaly_map, score in zip(items, predictions.anomaly_map, predictions.pred_score, strict=True):
        path = Path(item.image_path)
        mask = item.gt_mask if item.gt_mask is not None else torch.zeros(item.image.shape[-2:])
        samples.append(
            GridSample(
                image=item.image.permute(1, 2, 0).numpy(),
                gt_mask=mask.squeeze().numpy().astype(np.float32),
                anomaly_map=anomaly_map.squeeze().numpy(),
                score=float(score),
                title=f"{path.parent.name}/{path.stem}",
            ),
        )
    return samples


def run_category(settings: DemoSettings, choice: TeacherChoice, category: str) -> tuple[dict, list[GridSample]]:
    """Train and test one category; return its metrics and timings, and its grid samples."""
    seed_everything(settings.seed, workers=True, verbose=False)
    datamodule = MVTecAD(
        root=settings.data_root,
        category=category,
        train_batch_size=TRAIN_BATCH_SIZE,
        eval_batch_size=EVAL_BATCH_SIZE,
        num_workers=0,
        seed=settings.seed,
    )
    model = build_model(settings, choice)
    # anomalib adds a saving ModelCheckpoint unless one is given; save_top_k=0 saves nothing, which keeps
    # a ViT-B teacher (~350 MB per category) out of the output folder unless checkpoints are asked for.
    callbacks = [] if settings.save_checkpoints else [ModelCheckpoint(save_top_k=0)]
    engine = Engine(
        default_root_dir=settings.output / "runs",
        max_epochs=settings.epochs,
        callbacks=callbacks,
        enable_progress_bar=True,
        num_sanity_val_steps=0,
        # Validation only gathers the normalisation statistics and thresholds: once, after the last epoch.
        check_val_every_n_epoch=settings.epochs,
        log_every_n_steps=1,
        accelerator="auto",
        devices=1,
    )
    print(f"\n=== {category}: training for {settings.epochs} epoch(s) ===", flush=True)
    started = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_s = time.perf_counter() - started
    print(f"=== {category}: testing ===", flush=True)
    started = time.perf_counter()
    (results,) = engine.test(model=model, datamodule=datamodule, verbose=False)
    test_s = time.perf_counter() - started
    test_data = datamodule.test_data
    samples = predict_samples(model.cpu(), test_data, select_grid_indices(test_data))
    metrics = {name: float(results[name]) for name in METRIC_COLUMNS if name in results}
    record = {
        **metrics,
        "n_train_images": len(datamodule.train_data),
        "n_test_images": len(test_data),
        "n_test_defective": int((test_data.samples.label_index == 1).sum()),
        "time_s": {"fit": round(fit_s, 2), "test": round(test_s, 2)},
    }
    if settings.save_checkpoints and engine.best_model_path:
        record["checkpoint"] = engine.best_model_path
    return record, samples


def _mean_metrics(records: dict[str, dict]) -> dict[str, float]:
    means = {}
    for name in METRIC_COLUMNS:
        values = [record[name] for record in records.values() if np.isfinite(record.get(name, np.nan))]
        if values:
            means[name] = float(np.mean(values))
    return means


def _figure_title(settings: DemoSettings, choice: TeacherChoice) -> str:
    if choice.pretrained:
        weights = "pretrained"
    else:
        weights = "RANDOM WEIGHTS: " + ("pretrained weights unavailable" if settings.pretrained else "--no-pretrained")
    title = (
        f"TransformerStudent demo - teacher {choice.name} [{weights}]\n"
        f"{settings.image_size} px input, {settings.epochs} epoch(s), seed {settings.seed}; "
        "scores and maps normalised so that 0.5 is the threshold"
    )
    if not choice.pretrained:
        title += "\nWARNING: random teacher - the maps show the pipeline working, not the method's accuracy"
    return title


def _band_heading(category: str, record: dict) -> str:
    scores = ", ".join(
        f"{name.replace('_', ' ')} {record[name]:.2f}"
        for name in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")
        if record.get(name) is not None and np.isfinite(record[name])
    )
    return f"{category} - {scores}" if scores else category


def run_demo(settings: DemoSettings) -> dict:
    """Run the whole demo and write ``metrics.json`` and ``predictions.png``; return the JSON payload.

    Raises:
        DemoSettingsError: If a setting is invalid (see :func:`validate_settings`, :func:`prepare_dataset`).
    """
    started = time.perf_counter()
    validate_settings(settings)
    choice = resolve_teacher(settings.teacher, settings.pretrained)
    if not choice.pretrained:
        print(offline_banner(choice), file=sys.stderr, flush=True)
    dataset_started = time.perf_counter()
    prepare_dataset(settings)
    dataset_s = time.perf_counter() - dataset_started

    records: dict[str, dict] = {}
    grid: dict[str, list[GridSample]] = {}
    with warnings.catch_warnings():
        # Both deliberate: num_workers=0 suits small CPU-only machines; the teacher is frozen in eval mode.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")
        for category in settings.categories:
            records[category], grid[category] = run_category(settings, choice, category)

    output = settings.output
    bands = {_band_heading(category, records[category]): samples for category, samples in grid.items()}
    predictions_png = save_prediction_grid(bands, output / "predictions.png", _figure_title(settings, choice))
    payload = {
        "model": "TransformerStudent",
        "teacher": choice.summary(),
        "settings": {
            **{key: value for key, value in asdict(settings).items() if key != "pretrained"},
            "pretrained_requested": settings.pretrained,
            "train_batch_size": TRAIN_BATCH_SIZE,
            "eval_batch_size": EVAL_BATCH_SIZE,
            "dataset_image_size": DATASET_SPEC.image_size,
        },
        "metrics": records,
        "mean": _mean_metrics(records),
        "timing_s": {"dataset": round(dataset_s, 2), "total": round(time.perf_counter() - started, 2)},
        "outputs": {"predictions": predictions_png.name},
        "versions": {package: version(package) for package in ("anomalib", "torch", "timm", "lightning")},
    }
    write_metrics_json(payload, output / "metrics.json")
    _print_summary(payload, output)
    return payload


def _print_summary(payload: dict, output: Path) -> None:
    teacher = payload["teacher"]
    table = format_metrics_table({**payload["metrics"], "mean": payload["mean"]}, METRIC_COLUMNS)
    weights = "pretrained" if teacher["pretrained"] else "RANDOM weights (see the warning above)"
    print(
        f"\nTransformerStudent demo finished in {payload['timing_s']['total']:.0f} s "
        f"(teacher {teacher['name']}, {weights}).\n\n{table}\n\n"
        f"Results:  {output / 'metrics.json'}\n          {output / payload['outputs']['predictions']}",
        flush=True,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to its sub-command parser."""
    parser.add_argument(
        "--categories",
        nargs="+",
        default=list(TEXTURES),
        metavar="NAME",
        help=f"texture categories to run, among {', '.join(TEXTURES)} (default: all)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=DEFAULT_IMAGE_SIZE,
        help="model input side in pixels, a multiple of the teacher's patch size (default: %(default)s; "
        "the paper uses 1036 on a GPU)",
    )
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="training epochs (default: %(default)s)")
    parser.add_argument(
        "--teacher", default=DEFAULT_TEACHER, help="timm name of the ViT teacher (default: %(default)s)"
    )
    parser.add_argument(
        "--no-pretrained",
        dest="pretrained",
        action="store_false",
        help="use a randomly initialised teacher even if pretrained weights are available",
    )
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help="students' learning rate (default: %(default)s)")
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help="folder for metrics.json and predictions.png"
    )
    parser.add_argument(
        "--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="folder the generated dataset is written to"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of training (default: %(default)s)")
    parser.add_argument(
        "--save-checkpoints",
        action="store_true",
        help="keep a model checkpoint per category under OUTPUT/runs (large: the teacher is included)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo from parsed arguments; return the process exit code.

    Errors reach :func:`~anomalib_transformer_student.apps.cli.main`, which prints a user's error (a bad
    setting, a foreign ``--data-root``, unreadable data, an unwritable ``--output``) as one message and
    exits with status 2.
    """
    settings = DemoSettings(
        categories=tuple(args.categories),
        image_size=args.image_size,
        epochs=args.epochs,
        teacher=args.teacher,
        pretrained=args.pretrained,
        lr=args.lr,
        output=args.output,
        data_root=args.data_root,
        seed=args.seed,
        save_checkpoints=args.save_checkpoints,
    )
    run_demo(settings)  # a user's error (a bad setting, a foreign data root, bad data) ends in the CLI's handler
    return 0
