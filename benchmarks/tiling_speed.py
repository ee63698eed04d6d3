"""Tiling speed: latency per megapixel of large images, inspected whole against tile by tile.

Two TransformerStudent models with the same teacher (random weights: speed does not depend on them) and
the same ``image_size``: one inspects each image whole (square edge-pad, resize to ``image_size``), the
other cuts it into ``tile_size = image_size`` tiles (native resolution; see
``anomalib_transformer_student.model.tiling``). Each is timed on the eval ``forward`` that exported models
run (``model(images)`` on one raw image in [0, 1] under ``torch.inference_mode()``, pre- and
post-processing included, map at the image's own size) for every image size asked for.

Next to each tiled time stands one tile's time: the same model's forward on one ``tile_size`` square
image (which fits in one tile and so goes whole). Tiling adds nothing beyond its tiles when the tiled
forward costs ``tiles x one tile``; the table prints the ratio, which should stay within 10 % of 1.

Usage::

    python benchmarks/tiling_speed.py                                  # 448 px, 1344x1344 and 2048x2448, CPU
    python benchmarks/tiling_speed.py --device cuda --runs 10 --sizes 2048x2448,3000x4000
    python benchmarks/tiling_speed.py --image-size 224 --teacher vit_small_patch14_dinov2
"""

from __future__ import annotations

import argparse
import time

import torch
from common import markdown_row, markdown_rule, synchronize_cuda, time_runs

DEFAULT_TEACHER = "vit_base_patch14_reg4_dinov2.lvd142m"
ONE_TILE_RUNS = 5  # least warm-ups and timed runs of the one-tile forward
TOLERANCE = 0.10  # tiled may cost at most 10 % more than its tiles run one by one


def parse_size(text: str) -> tuple[int, int]:
    """``"2048x2448"`` as ``(2048, 2448)`` (height x width)."""
    height, _, width = text.lower().partition("x")
    return int(height), int(width or height)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=448, help="teacher input side, also the tile size (px)")
    parser.add_argument("--teacher", default=DEFAULT_TEACHER, help="timm ViT of the teacher (random weights)")
    parser.add_argument(
        "--sizes",
        type=lambda text: [parse_size(item) for item in text.split(",")],
        default=[(1344, 1344), (2048, 2448)],
        help="image sizes as HxW, comma-separated (default 1344x1344,2048x2448)",
    )
    parser.add_argument(
        "--tile-batch-size",
        type=int,
        default=8,
        help="tiles the teacher takes at once (the model's tiling.tile_batch_size)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--runs", type=int, default=3, help="timed forwards per measurement (the fastest is shown)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards first")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    return parser.parse_args(argv)


def build_models(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The whole-image and the tiled model, in eval mode on ``args.device`` (the tiled one with the same weights)."""
    from anomalib_transformer_student import TransformerStudent

    common = {"teacher": args.teacher, "pretrained": False, "image_size": args.image_size, "visualizer": False}
    whole = TransformerStudent(**common)
    tiled = TransformerStudent(**common, tiling={"tile_size": args.image_size, "tile_batch_size": args.tile_batch_size})
    tiled.model.load_state_dict(whole.model.state_dict())
    return whole.to(args.device).eval(), tiled.to(args.device).eval()


def fastest_seconds(
    model: torch.nn.Module, images: torch.Tensor, args: argparse.Namespace, at_least: int = 1
) -> tuple[float, float]:
    """Seconds of the fastest of several eval forwards of ``model`` on ``images``, and the teacher's part of it.

    At least ``at_least`` runs and warm-ups. The fastest run, not the median: on a shared (virtual) machine other
    work only ever adds time, and the median of a few runs moved by up to 40 % between otherwise equal
    measurements. The teacher's part is timed by hooks around each teacher call.
    """
    synchronize = synchronize_cuda if args.device == "cuda" else None
    teacher_seconds: list[float] = []
    started: list[float] = []

    def before(*_: object) -> None:
        if synchronize:
            synchronize()
        started.append(time.perf_counter())

    def after(*_: object) -> None:
        if synchronize:
            synchronize()
        teacher_seconds[-1] += time.perf_counter() - started.pop()

    def run() -> None:
        teacher_seconds.append(0.0)
        with torch.inference_mode():
            model(images)

    teacher = model.model.teacher
    hooks = [teacher.register_forward_pre_hook(before), teacher.register_forward_hook(after)]
    try:
        warmup, runs = max(args.warmup, at_least), max(args.runs, at_least)
        totals = time_runs(run, warmup, runs, synchronize)
    finally:
        for hook in hooks:
            hook.remove()
    fastest = min(range(runs), key=totals.__getitem__)
    return totals[fastest], teacher_seconds[warmup:][fastest]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    whole, tiled = build_models(args)
    tile = args.image_size
    rows = []
    for height, width in args.sizes:
        images = torch.rand(1, 3, height, width, device=args.device)
        tiles = tiled.tiling.count(height, width)
        whole_s, _ = fastest_seconds(whole, images, args)
        # Measured next to each tiled time (this CPU's speed drifts), with more runs: the ratio's denominator.
        one_tile, _ = fastest_seconds(tiled, torch.rand(1, 3, tile, tile, device=args.device), args, ONE_TILE_RUNS)
        tiled_s, tiled_teacher_s = fastest_seconds(tiled, images, args)
        rows.append((height, width, tiles, whole_s, tiled_s, one_tile, tiled_teacher_s))

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"\nTeacher {args.teacher} (random weights), image_size {args.image_size}, tile_size {tile}, "
        f"tile_batch_size {args.tile_batch_size}; "
        f"eval forward of one image under inference_mode, fastest of {args.runs} runs after {args.warmup} warm-up; "
        f"{device}; torch {torch.__version__}.\n"
    )
    print(
        f"One tile: the tiled model's forward on one {tile} x {tile} image (which goes whole), fastest of "
        f"{max(args.runs, ONE_TILE_RUNS)} runs after {max(args.warmup, ONE_TILE_RUNS)} warm-up, measured just "
        "before each tiled time.\n"
    )
    print(
        markdown_row(
            [
                "image (H x W)",
                "MP",
                "tiles",
                "whole ms",
                "whole ms/MP",
                "tiled ms",
                "tiled ms/MP",
                "one tile ms",
                "tiled / (tiles x one tile)",
                "tiled: not teacher ms",
            ]
        )
    )
    print(markdown_rule("lrrrrrrrrr"))
    verdicts = []
    for height, width, tiles, whole_s, tiled_s, one_tile, tiled_teacher_s in rows:
        megapixels = height * width / 1e6
        ratio = tiled_s / (tiles * one_tile)
        print(
            markdown_row(
                [
                    f"{height} x {width}",
                    f"{megapixels:.2f}",
                    str(tiles),
                    f"{whole_s * 1e3:.0f}",
                    f"{whole_s * 1e3 / megapixels:.0f}",
                    f"{tiled_s * 1e3:.0f}",
                    f"{tiled_s * 1e3 / megapixels:.0f}",
                    f"{one_tile * 1e3:.0f}",
                    f"{ratio:.3f}",
                    f"{(tiled_s - tiled_teacher_s) * 1e3:.0f} ({(tiled_s - tiled_teacher_s) / tiled_s:.1%})",
                ]
            )
        )
        within = ratio <= 1 + TOLERANCE
        verdicts.append(
            f"{height} x {width}: tiled costs {ratio:.2f} x its {tiles} tiles run one by one: "
            f"{'within' if within else 'NOT within'} {TOLERANCE:.0%} of tiles x one tile; everything but the "
            f"teacher (cutting, resizing, students, stitching, smoothing, scoring) took "
            f"{(tiled_s - tiled_teacher_s) * 1e3:.0f} ms of it, the teacher {tiled_teacher_s / tiles * 1e3:.0f} ms "
            f"per tile (one tile alone: {one_tile * 1e3:.0f} ms in all)."
        )
    print("\n" + "\n".join(verdicts))
    print(f"\nWall time of the benchmark: {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
