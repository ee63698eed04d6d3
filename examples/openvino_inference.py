r"""Run an exported TransformerStudent on a folder of images: heatmap overlays and a CSV of scores.

Export a trained model first, e.g.::

    anomalib export --model TransformerStudent --ckpt_path results/.../model.ckpt \\
        --export_type openvino --compression_type FP16 [--input_size "[1036,1036]"]

then::

    python examples/openvino_inference.py --model results/weights/openvino/model.xml \\
        --images path/to/images --output predictions [--device CPU] [--precision auto]

The exported graph pre-processes (pads, resizes, normalises) and post-processes by itself. A graph
exported without ``--input_size`` takes images of any height and width: each image goes in at its own
size and its map comes back at that size. A graph exported with ``--input_size`` takes only that size:
images of another size are resized to it first, and their maps resized back for the overlays.

``--precision`` sets the precision OpenVINO computes in (its ``INFERENCE_PRECISION_HINT``): ``auto``
(default) leaves the choice to OpenVINO, which on CPUs with bf16 units (Intel Xeon with AMX, 4th
generation and later; CPUs with AVX512_BF16, such as AMD Zen 4 and later) runs an FP32 graph in bf16, at
about half the latency, and elsewhere in f32; ``f32`` pins full precision (the maps that equal PyTorch's);
``bf16`` and ``f16`` ask for half precision and are refused, before any work, on a device whose
``OPTIMIZATION_CAPABILITIES`` lack it. The precision OpenVINO runs in is printed.

``scores.csv`` lists each image's score (normalised: 0.5 is the threshold) and label; ``overlays/`` holds
each image with its anomaly map on top (red: anomalous); ``openvino_cache/`` holds OpenVINO's compiled model, so
that the next run on the same device starts faster. Nothing is written outside ``--output``.
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path
from typing import Any

import numpy as np
from anomalib.deploy import OpenVINOInferencer
from anomalib.visualization.image.functional import overlay_image, visualize_anomaly_map
from PIL import Image

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# --precision: OpenVINO's INFERENCE_PRECISION_HINT (None: OpenVINO's own choice), and the entry of the device's
# OPTIMIZATION_CAPABILITIES that a half precision needs.
PRECISION_HINTS = {"auto": None, "f32": "f32", "bf16": "bf16", "f16": "f16"}
CAPABILITIES = {"bf16": "BF16", "f16": "FP16"}


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


def precision_config(precision: str, device: str, core: Any | None = None) -> dict[str, str] | None:
    """OpenVINO's compile configuration for ``--precision`` on ``device``; ``None`` for ``auto``.

    Args:
        precision: ``auto``, ``f32``, ``bf16`` or ``f16``.
        device: OpenVINO device name, as given to ``--device``.
        core: An ``openvino.Core`` (a new one by default).

    Raises:
        ValueError: If ``precision`` is unknown, or the device has no units for the half precision asked for.
    """
    if precision not in PRECISION_HINTS:
        msg = f"Unknown precision '{precision}'; choose one of {', '.join(PRECISION_HINTS)}."
        raise ValueError(msg)
    hint = PRECISION_HINTS[precision]
    if precision in CAPABILITIES:
        if core is None:
            import openvino as ov

            core = ov.Core()
        try:
            capabilities = list(core.get_property(device, "OPTIMIZATION_CAPABILITIES"))
        except RuntimeError as error:
            msg = f"OpenVINO cannot query device '{device}' (available: {', '.join(core.available_devices)}): {error}"
            raise ValueError(msg) from error
        if CAPABILITIES[precision] not in capabilities:
            msg = (
                f"--precision {precision}: device '{device}' has no {precision} units (its capabilities: "
                f"{', '.join(capabilities)}). Use --precision auto (OpenVINO's choice) or f32, or a device with "
                f"{precision} units (bf16: Intel Xeon 4th generation or later with AMX, CPUs with AVX512_BF16 such "
                "as AMD Zen 4 or later; f16: Intel GPUs, CPUs with AVX512_FP16 or AMX-FP16)."
            )
            raise ValueError(msg)
    return None if hint is None else {"INFERENCE_PRECISION_HINT": hint}


def graph_size(inferencer: OpenVINOInferencer) -> tuple[int, int] | None:
    """``(height, width)`` of the images a fixed-size graph takes; ``None`` if the graph takes any size."""
    shape = inferencer.input_blob.get_partial_shape()  # (batch, 3, height, width); the batch is dynamic
    if shape.rank.is_dynamic or shape[2].is_dynamic or shape[3].is_dynamic:
        return None
    return shape[2].get_length(), shape[3].get_length()


def inference_precision(inferencer: OpenVINOInferencer) -> str:
    """The precision the compiled model computes in (for CPUs, the effective one, e.g. ``bf16``)."""
    try:
        precision = inferencer.model.get_property("INFERENCE_PRECISION_HINT")
    except RuntimeError:  # devices that do not report it
        return "the device's default precision"
    return precision.get_type_name() if hasattr(precision, "get_type_name") else str(precision)


def load_inferencer(
    model: Path, device: str = "CPU", precision: str = "auto", cache_dir: Path | None = None
) -> OpenVINOInferencer:
    """Compile the exported ``model`` for ``device`` at ``precision`` (see :func:`precision_config`).

    anomalib's ``OpenVINOInferencer`` puts OpenVINO's compile cache in ``openvino_cache/`` of the current folder;
    it is built from inside ``cache_dir`` (default: the current folder), so that the cache lands there.

    Raises:
        FileNotFoundError: If ``model`` does not exist.
        ValueError: As :func:`precision_config`.
    """
    config = precision_config(precision, device)
    if not model.is_file():
        msg = f"Exported model '{model}' does not exist; export one with `anomalib export` (see this file's docstring)."
        raise FileNotFoundError(msg)
    cache_dir = (cache_dir or Path.cwd()).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    model, previous = model.resolve(), Path.cwd()
    os.chdir(cache_dir)
    try:
        return OpenVINOInferencer(path=model, device=device, config=config)
    finally:
        os.chdir(previous)


def predict_folder(
    model: Path, images: Path, output: Path, device: str = "CPU", precision: str = "auto"
) -> list[dict[str, object]]:
    """Predict every image in ``images`` with the OpenVINO model, writing overlays and ``scores.csv`` to ``output``.

    Images go in at their own size where the graph takes any size, else resized to the graph's size.

    Returns:
        One row per image: ``image``, ``score`` and ``label``.
    """
    paths = image_paths(images)
    inferencer = load_inferencer(model, device, precision, cache_dir=output)
    size = graph_size(inferencer)
    (output / "overlays").mkdir(parents=True, exist_ok=True)
    rows = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        model_input = image
        if size is not None and image.size != (size[1], size[0]):
            model_input = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        prediction = inferencer.predict(np.asarray(model_input, dtype=np.float32) / 255)
        anomaly_map = Image.fromarray(np.asarray(prediction.anomaly_map, dtype=np.float32).squeeze(), mode="F")
        if anomaly_map.size != image.size:
            anomaly_map = anomaly_map.resize(image.size, Image.Resampling.BILINEAR)
        heatmap = visualize_anomaly_map(np.asarray(anomaly_map))
        overlay_image(image, heatmap, alpha=0.4).convert("RGB").save(output / "overlays" / f"{path.stem}.png")
        score = float(np.asarray(prediction.pred_score).squeeze())
        rows.append(
            {"image": path.name, "score": round(score, 6), "label": int(np.asarray(prediction.pred_label).squeeze())}
        )
    with (output / "scores.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["image", "score", "label"])
        writer.writeheader()
        writer.writerows(rows)
    print(
        f"{model.name} on {device}: "
        + ("any image size" if size is None else f"images resized to {size[0]} x {size[1]}")
        + f", computing in {inference_precision(inferencer)} (--precision {precision})"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="exported model (.xml, or .onnx)")
    parser.add_argument("--images", type=Path, required=True, help="folder of images")
    parser.add_argument("--output", type=Path, default=Path("predictions"), help="folder for overlays and scores.csv")
    parser.add_argument("--device", default="CPU", help="OpenVINO device: CPU, GPU, NPU or AUTO")
    parser.add_argument(
        "--precision",
        choices=list(PRECISION_HINTS),
        default="auto",
        help="inference precision: auto (OpenVINO's choice: bf16 on CPUs with bf16 units), f32, bf16 or f16",
    )
    args = parser.parse_args()
    try:
        rows = predict_folder(args.model, args.images, args.output, args.device, args.precision)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    for row in rows:
        print(f"{row['image']}: score {row['score']:.3f} {'ANOMALOUS' if row['label'] else 'good'}")
    print(f"{sum(row['label'] for row in rows)} of {len(rows)} images anomalous; results in {args.output}")


if __name__ == "__main__":
    main()
