"""Input resolution against defect size: the paper's size-stratified AUPRO at several input sizes.

Trains TransformerStudent on the demo generator's images (which include tiny spots a few pixels wide at
full size) at each input size, evaluates every model at the images' full resolution with ``SizeAUPRO``
and prints the Q1..Q4 table per input size. Not a test: nothing is asserted.

    python benchmarks/resolution_vs_size.py                       # 224 and 448 px, CPU-sized
    python benchmarks/resolution_vs_size.py --sizes 224 448 1036  # on a GPU

The teacher is pretrained when its weights can be had (see ``--no-pretrained``); the printed header says
which, since a random teacher's figures say nothing about the method's accuracy.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from common import generate_demo_data
from lightning.pytorch import seed_everything

from anomalib_transformer_student import TransformerStudent
from anomalib_transformer_student.apps.evaluate import evaluate_checkpoint
from anomalib_transformer_student.metrics import FPR_LIMITS, SUBSETS
from anomalib_transformer_student.model.teacher import DEFAULT_TEACHER
from anomalib_transformer_student.training.teacher_weights import pretrained_weights_available


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448], help="Model input sizes (px).")
    parser.add_argument("--image-size", type=int, default=512, help="Full resolution of the generated images.")
    parser.add_argument("--category", default="gravel", help="Demo texture: brick, grass or gravel.")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--n-train", type=int, default=16)
    parser.add_argument("--n-test-per-defect", type=int, default=4)
    parser.add_argument("--teacher", default=DEFAULT_TEACHER)
    parser.add_argument("--no-pretrained", action="store_true", help="Use a random teacher even if weights exist.")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    pretrained = not args.no_pretrained and pretrained_weights_available(args.teacher)
    with tempfile.TemporaryDirectory() as workdir:
        root = generate_demo_data(
            Path(workdir) / "data",
            category=args.category,
            image_size=args.image_size,
            n_train=args.n_train,
            n_test_good=args.n_test_per_defect,
            n_test_per_defect=args.n_test_per_defect,
            seed=args.seed,
        )
        rows = []
        for size in args.sizes:
            seed_everything(args.seed)
            start = time.perf_counter()
            model = TransformerStudent(teacher=args.teacher, pretrained=pretrained, image_size=size)
            datamodule = MVTecAD(root=root, category=args.category, num_workers=0, train_batch_size=4)
            engine = Engine(max_epochs=args.epochs, default_root_dir=Path(workdir) / f"run{size}", logger=False)
            engine.fit(model, datamodule=datamodule)
            checkpoint = Path(workdir) / f"model{size}.ckpt"
            engine.trainer.save_checkpoint(checkpoint)
            result = evaluate_checkpoint(checkpoint, root, args.category)
            rows.append((size, result, time.perf_counter() - start))

    teacher = f"{args.teacher} ({'pretrained' if pretrained else 'RANDOM weights: figures say nothing of accuracy'})"
    print(f"\nTeacher: {teacher}; {args.category} at {args.image_size} px full resolution, {args.epochs} epochs,")
    print(f"{args.n_train} training images; torch {torch.__version__}, {torch.get_num_threads()} threads.\n")
    header = "| input px | subset | " + " | ".join(f"AUPRO@{limit:.2f}" for limit in FPR_LIMITS)
    print(header + " | image AUROC | pixel AUROC | time (s) |")
    print("| --- " * (len(FPR_LIMITS) + 5) + "|")
    for size, result, seconds in rows:
        for index, subset in enumerate(SUBSETS):
            values = " | ".join(f"{float(value):.3f}" for value in result.table[index])
            extra = (
                f"{result.metrics.get('image_AUROC', float('nan')):.3f} | "
                f"{result.metrics.get('pixel_AUROC', float('nan')):.3f} | {seconds:.0f}"
                if index == 0
                else " | | "
            )
            print(f"| {size} | {subset} | {values} | {extra} |")


if __name__ == "__main__":
    main()
