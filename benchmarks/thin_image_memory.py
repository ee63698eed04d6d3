r"""Peak memory of evaluation and training steps: thin images, and tiles scored chunk by chunk or all at once.

Each figure is the growth of the peak resident set size (RSS) of a fresh process over one step, after a warm-up
step on a small image (peak RSS only grows, so each case needs its own process). Teachers are random ViT-S/14
(``pretrained=False``), so that the figures are those of the package's own work.

1. Thin images (line scans), whole and tiled, at a small teacher (56 px, blocks 0 and 1): one evaluation step
   (``_predict``, as validation, test and predict run it) and one training step (a ``Trainer`` fit of one step).
   Without tiling every image is edge-padded to a square and resized to the teacher's input; padding first (as
   anomalib's ``SquarePad`` followed by a ``Resize`` does) builds the
   whole square: a 20000 x 500 strip becomes 20000 x 20000 x 3 floats. ``SquareResize`` folds the padding into the
   resize weights and never builds it. Tiled: ``--thin-tile``-px tiles (one column of tiles on these strips).
2. Tiled images of ``--tiles`` tiles at native resolution (448-px tiles at ``image_size`` 448, blocks 1 and 3,
   ``tile_batch_size`` 8): the tiles' tokens chunk by chunk (the package) against all tiles' tokens at once
   (``teacher_features`` on all tiles then ``predict``; in training one loss over all tiles, Lightning's automatic
   optimisation).

    python benchmarks/thin_image_memory.py                      # ~5 min on 2 shared cores
    python benchmarks/thin_image_memory.py --sizes 50000x1000 --tiles 16 64 144
"""

from __future__ import annotations

import argparse
import logging
import math
import resource
import warnings
from functools import partial
from typing import TYPE_CHECKING

import torch
from common import cpu_summary, in_fresh_process, markdown_row, markdown_rule

if TYPE_CHECKING:
    from anomalib_transformer_student import TransformerStudent

TEACHER = "vit_small_patch14_dinov2"
THIN = {"image_size": 56, "layers": (0, 1)}
TILED = {"image_size": 448, "layers": (1, 3)}
TILE_BATCH_SIZE = 8


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model(settings: dict, tile_size: int | None, pad_first: bool = False) -> TransformerStudent:
    from anomalib.data.transforms import SquarePad
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize

    from anomalib_transformer_student import TransformerStudent

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    model = TransformerStudent(
        teacher=TEACHER,
        pretrained=False,
        feature_cache=False,
        tiling={"tile_size": tile_size, "tile_batch_size": TILE_BATCH_SIZE},
        **settings,
    )
    model.post_processor = None
    if pad_first:
        side = settings["image_size"]
        resize = Resize((side, side), interpolation=InterpolationMode.BICUBIC, antialias=True)
        normalize = Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
        model.pre_processor.transform = Compose([SquarePad(), resize, normalize])
    return model


def predict_growth_mib(
    height: int, width: int, settings: dict, tile_size: int | None, *, pad_first: bool = False, at_once: bool = False
) -> float:
    """MiB by which one evaluation step on a ``height`` x ``width`` image raises this process's peak memory.

    ``at_once``: all tiles' tokens at once.
    """
    from anomalib_transformer_student.model.pre_processing import evaluation_input

    model = _model(settings, tile_size, pad_first).eval()

    def step(images: torch.Tensor) -> None:
        if not at_once:
            model._predict(images)
            return
        model_input, placement = evaluation_input(model.pre_processor, images, pre_processed=True)
        shallow, deep = model.model.teacher_features(model_input)
        model.model.predict(shallow, deep, tuple(model_input.shape[-2:]), **placement)

    warm = 2 * tile_size if tile_size else 8  # two tiles when tiling
    with torch.no_grad():
        step(torch.rand(1, 3, 8, warm))  # allocations of the first call, outside the measurement
        before = _peak_mib()
        step(torch.rand(1, 3, height, width))
    return _peak_mib() - before


def train_growth_mib(height: int, width: int, settings: dict, tile_size: int | None, *, at_once: bool = False) -> float:
    """MiB by which one training step (a fit of one step) on a ``height`` x ``width`` image raises the peak memory.

    ``at_once``: one loss over all tiles of the batch (automatic optimisation).
    """
    from anomalib.data import ImageBatch
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    model = _model(settings, tile_size)
    if at_once:
        model.automatic_optimization = True

    def fit(images: torch.Tensor) -> None:
        trainer = Trainer(
            max_steps=1,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        batches = [ImageBatch(image=images, image_path=["image.png"])]
        trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None))

    warm = 2 * tile_size if tile_size else 8
    fit(torch.rand(1, 3, 8, warm))  # allocations of the first step, outside the measurement
    before = _peak_mib()
    fit(torch.rand(1, 3, height, width))
    return _peak_mib() - before


def tile_count(height: int, width: int, tile_size: int, image_size: int) -> int:
    from anomalib_transformer_student.model.tiling import Tiling

    return Tiling(tile_size, image_size=image_size, patch_size=14).count(height, width)


def mib(value: float) -> str:
    return f"{value:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["6000x2", "20000x500"], help="HEIGHTxWIDTH of thin images")
    parser.add_argument("--thin-tile", type=int, default=560, help="tile_size for the thin images (at 56 px)")
    parser.add_argument("--tiles", nargs="+", type=int, default=[16, 64], help="square numbers of 448-px tiles")
    args = parser.parse_args()
    print(f"CPU: {cpu_summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads\n")

    print(
        f"Thin images: ViT-S/14 at {THIN['image_size']} px, blocks {THIN['layers']}; tiled: {args.thin_tile}-px "
        f"tiles, tile_batch_size {TILE_BATCH_SIZE}. Peak RSS growth over one step, MiB.\n"
    )
    print(
        markdown_row(
            [
                "image (H x W)",
                "whole: evaluation",
                "whole: evaluation, pad first",
                "whole: training step",
                "tiles",
                "tiled: evaluation",
                "tiled: training step",
            ]
        )
    )
    print(markdown_rule("lrrrrrr"))
    for size in args.sizes:
        height, width = (int(side) for side in size.lower().split("x"))
        row = [
            in_fresh_process(predict_growth_mib, height, width, THIN, None),
            in_fresh_process(partial(predict_growth_mib, pad_first=True), height, width, THIN, None),
            in_fresh_process(train_growth_mib, height, width, THIN, None),
        ]
        tiled = [
            in_fresh_process(predict_growth_mib, height, width, THIN, args.thin_tile),
            in_fresh_process(train_growth_mib, height, width, THIN, args.thin_tile),
        ]
        count = tile_count(height, width, args.thin_tile, THIN["image_size"])
        print(markdown_row([f"{height} x {width}", *map(mib, row), str(count), *map(mib, tiled)]))

    tile = TILED["image_size"]
    print(
        f"\nTiled at native resolution: ViT-S/14 at {tile} px, {tile}-px tiles, blocks {TILED['layers']}, "
        f"tile_batch_size {TILE_BATCH_SIZE}, one image per batch. Peak RSS growth over one step, MiB.\n"
    )
    print(
        markdown_row(
            [
                "image (H x W)",
                "tiles",
                "evaluation: all at once",
                "evaluation: chunked",
                "training step: all at once",
                "training step: chunked",
            ]
        )
    )
    print(markdown_rule("lrrrrr"))
    for tiles in args.tiles:
        side = tile * math.isqrt(tiles)
        row = [
            in_fresh_process(partial(predict_growth_mib, at_once=True), side, side, TILED, tile),
            in_fresh_process(predict_growth_mib, side, side, TILED, tile),
            in_fresh_process(partial(train_growth_mib, at_once=True), side, side, TILED, tile),
            in_fresh_process(train_growth_mib, side, side, TILED, tile),
        ]
        print(markdown_row([f"{side} x {side}", str(tile_count(side, side, tile, tile)), *map(mib, row)]))


if __name__ == "__main__":
    main()
