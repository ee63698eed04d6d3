r"""Latency of an export without ``input_size`` (one graph for any size) against one with a fixed size.

anomalib exports every model without ``input_size``: the graph takes images of any height and width,
and builds its pad-and-resize weights for each input's size. A fixed-size export (``--input_size``)
folds them into constants. Both graphs run in OpenVINO on the same image, alternating, with
``INFERENCE_PRECISION_HINT`` pinned to ``f32`` and with OpenVINO's own choice (bf16 on CPUs with
bf16 units). The model is untrained with a random teacher (speed does not depend on the weights).

    python benchmarks/export_size_speed.py                        # ViT-B/14-reg4 at 1036 px, 1024 x 1024 images
    python benchmarks/export_size_speed.py --image-size 448 --height 600 --width 800
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import cpu_summary, markdown_row, markdown_rule, time_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="vit_base_patch14_reg4_dinov2")
    parser.add_argument("--image-size", type=int, default=1036, help="the teacher's input side")
    parser.add_argument("--height", type=int, default=1024, help="height of the image fed to both graphs")
    parser.add_argument("--width", type=int, default=1024, help="width of the image fed to both graphs")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="OpenVINO inference threads (default: all)")
    args = parser.parse_args()

    import openvino as ov

    from anomalib_transformer_student import TransformerStudent

    model = TransformerStudent(teacher=args.teacher, pretrained=False, image_size=args.image_size).eval()
    image = torch.rand(1, 3, args.height, args.width, generator=torch.Generator().manual_seed(0)).numpy()
    core = ov.Core()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        exports = {
            "fixed (--input_size)": model.to_openvino(Path(folder) / "fixed", input_size=(args.height, args.width)),
            "any size (no --input_size)": model.to_openvino(Path(folder) / "dynamic"),
        }
        for hint in ("f32", None):
            compiled = {}
            for name, path in exports.items():
                config = {} if hint is None else {"INFERENCE_PRECISION_HINT": hint}
                if args.threads:
                    config["INFERENCE_NUM_THREADS"] = args.threads
                compiled[name] = core.compile_model(core.read_model(path), "CPU", config)
            maps = {name: compiled_model(image)["anomaly_map"] for name, compiled_model in compiled.items()}
            difference = float(np.abs(np.subtract(*maps.values())).max())
            times: dict[str, list[float]] = {name: [] for name in compiled}
            for _ in range(args.runs):  # alternating, so that drifts of the machine hit both alike
                for name, compiled_model in compiled.items():
                    times[name] += time_runs(lambda model=compiled_model: model(image), warmup=1, runs=1)
            precision = hint or f"OpenVINO's choice ({core.get_property('CPU', 'INFERENCE_PRECISION_HINT')})"
            fixed = statistics.median(times["fixed (--input_size)"])
            for name, seconds in times.items():
                median = statistics.median(seconds)
                rows.append((name, precision, f"{median * 1000:.0f} ms", f"{median / fixed:.2f}", f"{difference:.1e}"))

    print(f"CPU: {cpu_summary()}")
    print(
        f"{args.teacher} (random weights) at {args.image_size} px, one {args.height} x {args.width} image, "
        f"median of {args.runs} runs each, alternating.\n"
    )
    print(markdown_row(["export", "precision", "latency", "vs fixed", "max map difference fixed/any"]))
    print(markdown_rule("llrrr"))
    for row in rows:
        print(markdown_row(row))


if __name__ == "__main__":
    main()
