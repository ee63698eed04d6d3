"""Train, test, export and run TransformerStudent from Python with anomalib's Engine.

    python examples/python_api.py --root datasets/MVTecAD --category screw

Trains the students on the category's nominal images (the teacher's pretrained weights are fetched
from the Hugging Face Hub on first use, or read from its local cache), tests at the images' original
resolution, exports an OpenVINO model with the thresholds that validation set, and runs it on a few
test images. The defaults are the paper's (DINOv2 ViT-B/14 teacher, 1036 px, 50 epochs); for a quick
try: ``--teacher vit_small_patch14_dinov2 --image-size 224 --epochs 1``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from anomalib.data import MVTecAD
from anomalib.deploy import CompressionType, ExportType
from anomalib.engine import Engine
from openvino_inference import load_inferencer  # the example beside this one
from PIL import Image

from anomalib_transformer_student import TransformerStudent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("datasets/MVTecAD"), help="MVTec AD-layout dataset root")
    parser.add_argument("--category", default="screw")
    parser.add_argument("--teacher", default="vit_base_patch14_reg4_dinov2.lvd142m", help="timm ViT name")
    parser.add_argument("--image-size", type=int, default=1036, help="model input side; a multiple of the patch")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--compression", choices=["none", "fp16", "int8"], default="fp16")
    parser.add_argument("--output", type=Path, default=Path("results/python_api"))
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument(
        "--random-teacher", action="store_true", help="keep the teacher's random weights (offline smoke tests only)"
    )
    args = parser.parse_args()

    # 1. Data and model. The model pads, resizes and normalises images itself.
    datamodule = MVTecAD(root=args.root, category=args.category, num_workers=args.num_workers)
    model = TransformerStudent(teacher=args.teacher, pretrained=not args.random_teacher, image_size=args.image_size)

    # 2. Train (validation at the end sets normalisation and thresholds), then test.
    engine = Engine(max_epochs=args.epochs, default_root_dir=args.output)
    engine.fit(model, datamodule=datamodule)
    (metrics,) = engine.test(model, datamodule=datamodule)
    print("test:", ", ".join(f"{name} {value:.3f}" for name, value in metrics.items()))

    # 3. Export to OpenVINO: pre-processing, model and post-processing in one graph that takes any image size.
    compression = None if args.compression == "none" else CompressionType(args.compression)
    exported = engine.export(model, ExportType.OPENVINO, export_root=args.output, compression_type=compression)
    print(f"exported: {exported}")

    # 4. Run the exported model on a few test images, each at its own size (f32: as PyTorch computes).
    inferencer = load_inferencer(exported, "CPU", "f32", cache_dir=args.output)  # its compile cache under --output
    test_images = sorted((args.root / args.category / "test").rglob("*.png"))
    for path in test_images[:: max(1, len(test_images) // 5)]:
        image = Image.open(path).convert("RGB")
        prediction = inferencer.predict(np.asarray(image, dtype=np.float32) / 255)
        score = float(np.asarray(prediction.pred_score).squeeze())
        label = "ANOMALOUS" if bool(np.asarray(prediction.pred_label).squeeze()) else "good"
        print(f"{path.parent.name}/{path.name}: score {score:.3f} {label}")


if __name__ == "__main__":
    main()
