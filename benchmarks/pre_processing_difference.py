"""How far the package's pre-processing is from the authors' PIL pre-processing, at the input and in the maps.

The authors' code (alex-costanzino/L2BT, ``utils/loader_VisA.py`` with ``SquarePad`` from
``utils/general_utils.py``) works on 8-bit PIL images: ``Image.open(...).convert("RGB")``, edge-pad to a square
(smaller half of the padding first), ``transforms.Resize((S, S), BICUBIC)`` on the PIL image (Pillow's bicubic,
antialiased when shrinking, rounded and clipped back to 8 bit), ``ToTensor`` (/255) and ImageNet ``Normalize``.
This package pads and resizes the float image (``square_resize_transform``: edge padding and
antialiased bicubic resizing as two matrix products (``model/resize.py``), no rounding nor clipping) after the same
``Normalize``. This script feeds both inputs, made from the same demo images (square PNGs cropped to a VisA-like
3:2 rectangle so that the padding is exercised), to one ``TransformerStudent(pretrained=False)`` and prints how
much the inputs, the full-resolution anomaly maps and the image scores differ. Not a test: nothing is asserted.

    .venv/bin/python benchmarks/pre_processing_difference.py                      # 518 and 1036 px, 2 images
    .venv/bin/python benchmarks/pre_processing_difference.py --images 4 --threads 8

Reading the table: input differences are in 8-bit grey levels before normalisation ("rounded" rounds and clips
the package's resized image to 8 bit first, leaving only the kernels' difference); map differences are relative
to each map's range (max - min), score differences relative to the score. The teacher has RANDOM weights (no
weights are reachable offline) and the students are untrained (seeded), so the figures say how much the
pre-processing moves the maps of a network of this shape, not how it changes accuracy.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms
from torchvision.transforms.v2.functional import to_dtype, to_image

from anomalib_transformer_student import TransformerStudent
from anomalib_transformer_student.apps.demo_data import DEFECT_TYPES, DemoDatasetSpec, generate_demo_dataset
from anomalib_transformer_student.model.pre_processing import square_resize_transform
from anomalib_transformer_student.model.teacher import DEFAULT_TEACHER


class AuthorsSquarePad:
    """The authors' ``SquarePad`` (L2BT ``utils/general_utils.py``): edge-pad a PIL image to a square."""

    def __call__(self, image: Image.Image) -> Image.Image:
        """Pad left/top by half the missing width/height (rounded down), right/bottom by the rest."""
        max_wh = max(image.size)
        p_left, p_top = [(max_wh - s) // 2 for s in image.size]
        p_right, p_bottom = [max_wh - (s + pad) for s, pad in zip(image.size, [p_left, p_top], strict=True)]
        return transforms.functional.pad(image, [p_left, p_top, p_right, p_bottom], padding_mode="edge")


def authors_transform(image_size: int, normalize: bool = True) -> transforms.Compose:
    """The authors' ``rgb_transform`` (L2BT ``utils/loader_VisA.py``), on an 8-bit RGB PIL image."""
    steps = [
        AuthorsSquarePad(),
        transforms.Resize((image_size, image_size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
    ]
    if normalize:
        steps.append(transforms.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD))
    return transforms.Compose(steps)


def package_input(image: Image.Image, image_size: int) -> torch.Tensor:
    """The package's model input: anomalib's ``read_image`` conversion, then ``square_resize_transform``."""
    tensor = to_dtype(to_image(image), torch.float32, scale=True)
    return square_resize_transform(image_size)(tensor.unsqueeze(0))


def unnormalize(images: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation of ``(B, 3, H, W)`` images, back to [0, 1] units."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return images * std + mean


@dataclass
class Row:
    """Differences at one input size, aggregated over the images."""

    size: int
    input_max_levels: float
    input_mean_levels: float
    rounded_max_levels: float
    normalised_max: float
    map_max_rel: float
    map_mean_rel: float
    score_max_rel: float
    seconds: float


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[518, 1036], help="Model input sizes (px).")
    parser.add_argument("--images", type=int, default=2, help="Demo test images compared (defective first).")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    parser.add_argument("--original-size", type=int, default=1024, help="Side of the generated square PNGs.")
    parser.add_argument("--height", type=int, default=683, help="Rows kept (centre crop); 0 keeps them square.")
    parser.add_argument("--category", default="gravel", help="Demo texture: brick, grass or gravel.")
    parser.add_argument("--teacher", default=DEFAULT_TEACHER)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def load_images(args: argparse.Namespace, workdir: Path) -> list[Image.Image]:
    """Generate the demo dataset and return ``--images`` test images (defect types in turn, then good ones)."""
    per_defect = -(-args.images // len(DEFECT_TYPES))
    spec = DemoDatasetSpec(
        categories=(args.category,),
        image_size=args.original_size,
        n_train=0,
        n_test_good=args.images,
        n_test_per_defect=per_defect,
        seed=args.seed,
    )
    test = generate_demo_dataset(workdir, spec) / args.category / "test"
    paths = [test / kind / f"{index:03d}.png" for index in range(per_defect) for kind in DEFECT_TYPES]
    paths += sorted((test / "good").glob("*.png"))
    images = []
    for path in paths[: args.images]:
        image = Image.open(path).convert("RGB")
        if 0 < args.height < image.height:
            top = (image.height - args.height) // 2
            image = image.crop((0, top, image.width, top + args.height))
        images.append(image)
    return images


@torch.no_grad()
def compare(images: list[Image.Image], size: int, args: argparse.Namespace) -> Row:
    """Run both pre-processings through one seeded model at input ``size`` and aggregate the differences."""
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model = TransformerStudent(teacher=args.teacher, pretrained=False, image_size=size).eval()
    input_max, input_mean, rounded_max, normalised_max = [], [], [], []
    map_max, map_mean, score_rel = [], [], []
    for image in images:
        authors = authors_transform(size)(image).unsqueeze(0)
        package = package_input(image, size)
        authors_levels = authors_transform(size, normalize=False)(image).unsqueeze(0) * 255
        package_levels = unnormalize(package) * 255
        delta = (authors_levels - package_levels).abs()
        input_max.append(delta.max().item())
        input_mean.append(delta.mean().item())
        rounded_max.append((authors_levels - package_levels.clamp(0, 255).round()).abs().max().item())
        normalised_max.append((authors - package).abs().max().item())

        original_size = (image.height, image.width)
        ours = model.model(package, original_size=original_size, square_padded=True)
        theirs = model.model(authors, original_size=original_size, square_padded=True)
        span = (ours.anomaly_map.max() - ours.anomaly_map.min()).item()
        map_delta = (ours.anomaly_map - theirs.anomaly_map).abs()
        map_max.append(map_delta.max().item() / span)
        map_mean.append(map_delta.mean().item() / span)
        score_rel.append(((ours.pred_score - theirs.pred_score).abs() / ours.pred_score.abs()).max().item())
    return Row(
        size=size,
        input_max_levels=max(input_max),
        input_mean_levels=sum(input_mean) / len(input_mean),
        rounded_max_levels=max(rounded_max),
        normalised_max=max(normalised_max),
        map_max_rel=max(map_max),
        map_mean_rel=sum(map_mean) / len(map_mean),
        score_max_rel=max(score_rel),
        seconds=time.perf_counter() - start,
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as workdir:
        images = load_images(args, Path(workdir))
    rows = [compare(images, size, args) for size in args.sizes]

    width, height = images[0].size
    print(f"\nTeacher: {args.teacher} (RANDOM weights, seeded untrained students: figures say nothing of accuracy);")
    print(f"{len(images)} {args.category} demo test images of {width} x {height} px (W x H), edge-padded to square;")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads. Authors: PIL 8-bit bicubic; package: float")
    print(
        "antialiased bicubic. Input |diff| in 8-bit levels (max over images, mean averaged); maps relative to range.\n"
    )
    print(
        "| input px | input max (levels) | input mean (levels) | max after 8-bit rounding (levels) "
        "| input max (normalised) | map max / range | map mean / range | score max rel. | time (s) |"
    )
    print("| --- " * 9 + "|")
    for row in rows:
        print(
            f"| {row.size} | {row.input_max_levels:.3f} | {row.input_mean_levels:.4f} | {row.rounded_max_levels:.0f} "
            f"| {row.normalised_max:.4f} | {row.map_max_rel:.2e} | {row.map_mean_rel:.2e} | {row.score_max_rel:.2e} "
            f"| {row.seconds:.0f} |"
        )


if __name__ == "__main__":
    main()
