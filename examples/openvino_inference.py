r"""Run an exported TransformerStudent on a folder of images: heatmap overlays and a CSV of scores.

Export a trained model first, at the size of the images it will see, e.g.::

    anomalib export --model TransformerStudent --ckpt_path results/.../model.ckpt \\
        --export_type openvino --input_size "[1036,1036]" --compression_type FP16

then::

    python examples/openvino_inference.py --model results/weights/openvino/model.xml \\
        --images path/to/images --output predictions [--device CPU]

The exported graph pre-processes (pads, resizes, normalises) and post-processes by itself; it takes
images of the size it was exported at, so images of another size are resized to it first, and their
maps resized back for the overlays. ``scores.csv`` lists each image's score (normalised: 0.5 is the
threshold) and label; ``overlays/`` holds each image with its anomaly map on top (red: anomalous).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from anomalib.deploy import OpenVINOInferencer
from anomalib.visualization.image.functional import overlay_image, visualize_anomaly_map
from PIL import Image

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def image_paths(folder: Path) -> list[Path]:
    """Images directly inside ``folder``, sorted by name.

    Raises:
        FileNotFoundError: If ``folder`` does not exist or holds no images.
    """
    if not folder.is_dir():
        msg = f"Image folder '{folder}' does not exist."
        raise FileNotFoundError(msg)
    paths = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMG_EXTENSIONS)
    if not paths:
        msg = f"No images ({', '.join(IMG_EXTENSIONS)}) in '{folder}'."
        raise FileNotFoundError(msg)
    return paths


def predict_folder(model: Path, images: Path, output: Path, device: str = "CPU") -> list[dict[str, object]]:
    """Predict every image in ``images`` with the OpenVINO model, writing overlays and ``scores.csv`` to ``output``.

    Returns:
        One row per image: ``image``, ``score`` and ``label``.
    """
    paths = image_paths(images)
    if not model.is_file():
        msg = f"Exported model '{model}' does not exist; export one with `anomalib export` (see this file's docstring)."
        raise FileNotFoundError(msg)
    inferencer = OpenVINOInferencer(path=model, device=device)
    shape = inferencer.input_blob.get_partial_shape()  # (batch, 3, height, width); the batch is dynamic
    height, width = shape[2].get_length(), shape[3].get_length()
    (output / "overlays").mkdir(parents=True, exist_ok=True)
    rows = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        resized = image if image.size == (width, height) else image.resize((width, height), Image.Resampling.BILINEAR)
        prediction = inferencer.predict(np.asarray(resized, dtype=np.float32) / 255)
        anomaly_map = Image.fromarray(np.asarray(prediction.anomaly_map, dtype=np.float32).squeeze(), mode="F")
        heatmap = visualize_anomaly_map(np.asarray(anomaly_map.resize(image.size, Image.Resampling.BILINEAR)))
        overlay_image(image, heatmap, alpha=0.4).convert("RGB").save(output / "overlays" / f"{path.stem}.png")
        score = float(np.asarray(prediction.pred_score).squeeze())
        rows.append(
            {"image": path.name, "score": round(score, 6), "label": int(np.asarray(prediction.pred_label).squeeze())}
        )
    with (output / "scores.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["image", "score", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="exported model (.xml, or .onnx)")
    parser.add_argument("--images", type=Path, required=True, help="folder of images")
    parser.add_argument("--output", type=Path, default=Path("predictions"), help="folder for overlays and scores.csv")
    parser.add_argument("--device", default="CPU", help="OpenVINO device: CPU, GPU, NPU or AUTO")
    args = parser.parse_args()
    rows = predict_folder(args.model, args.images, args.output, args.device)
    for row in rows:
        print(f"{row['image']}: score {row['score']:.3f} {'ANOMALOUS' if row['label'] else 'good'}")
    print(f"{sum(row['label'] for row in rows)} of {len(rows)} images anomalous; results in {args.output}")


if __name__ == "__main__":
    main()
