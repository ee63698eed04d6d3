"""Inference latency, throughput and peak memory of TransformerStudent in PyTorch and OpenVINO, at batch 1.

Variants, each at every ``--sizes`` resolution (square images of that side, the model's own size):

- ``torch``: PyTorch FP32, ours (``TransformerStudent.forward``: pre-processing, model, post-processing);
- ``torch-bf16``: ours under bf16 autocast, as ``precision="bf16-mixed"`` runs it (CPUs with bf16
  units only);
- ``l2bt``: PyTorch FP32, anomalib's ``L2BT`` with its pre-processor at the same size;
- OpenVINO exports of ours made by ``to_openvino`` (see ``OPENVINO_VARIANTS`` in ``common.py``), each compiled
  with an explicit ``INFERENCE_PRECISION_HINT``: ``ov-fp32`` (f32: the arithmetic that equals PyTorch FP32),
  ``ov-bf16`` (the FP32 IR in bf16: what OpenVINO chooses by itself on CPUs with bf16 units), ``ov-fp16`` (FP16
  weights), ``ov-int8`` and ``ov-int8-bf16`` (INT8 weight compression), ``ov-int8-ptq`` and ``ov-int8-ptq-bf16``
  (quantisation calibrated on generated images); the bf16 ones only on CPUs with bf16 units;
- on request only, ``ov-int8-ptq-attention``: INT8 PTQ with the teacher's attention products quantised too;
- with CUDA present, also ``cuda-fp32``, ``cuda-fp16``, ``cuda-bf16`` (ours) and ``l2bt-cuda-fp32``,
  ``l2bt-cuda-fp16``, ``l2bt-cuda-bf16`` (L2BT); half precision through autocast around the whole forward, as
  the trainer's ``precision`` runs the steps.

The first lines name the CPU and which of its features decide the precisions' speed (AVX2, AVX-512,
AVX512_BF16, AVX512_VNNI, AMX-BF16, AMX-INT8). Each variant runs in a fresh process: ``--warmup`` untimed runs,
then ``--runs`` timed ones; latency is their median, throughput its inverse, peak memory the process's peak
resident set (CUDA: peak allocated GPU memory). The exports' time and size are recorded too. Teachers have
random weights: speed does not depend on them. A last table splits the time of ours into pre-processing,
teacher, students, anomaly map and post-processing (PyTorch: module hooks; OpenVINO: per-node profiling, nodes
mapped to modules through the scopes the ONNX exporter records). How far each variant's maps and labels are
from PyTorch FP32 is measured by ``benchmarks/precision_fidelity.py``.

Processes that run one after the other on a shared machine see different loads. ``--paired N`` compares ours
with L2BT in PyTorch FP32 within one process instead, alternating the two models N times (ours, L2BT, ours,
...), so that both see the same conditions: the whole forward, the teacher alone, and everything but the
teacher; it prints the medians and their ratios, and nothing else. ``--alternate N`` does the same for the
CPU variants asked for (PyTorch and OpenVINO, no per-part shares or memory): it exports, then times them in
one process, round-robin N times, and prints each one's median latency and its ratio to PyTorch FP32.

Usage::

    python benchmarks/inference_speed.py [--sizes 448 1036] [--teacher vit_base_patch14_reg4_dinov2.lvd142m]
        [--runs 5] [--warmup 1] [--variants torch torch-bf16 l2bt ov-fp32 ov-bf16 ...]
    python benchmarks/inference_speed.py --sizes 1036 --paired 3 --threads 1
    python benchmarks/inference_speed.py --sizes 1036 --alternate 3 --variants torch torch-bf16 ov-fp32 ov-bf16
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from common import (
    OPENVINO_VARIANTS,
    OpenVINOVariant,
    build_l2bt,
    cpu_has_bf16_units,
    cpu_summary,
    generate_demo_data,
    in_fresh_process,
    markdown_row,
    markdown_rule,
    peak_cuda_mib,
    peak_rss_mib,
    time_runs,
)

CPU_VARIANTS = (
    "torch",
    "torch-bf16",
    "l2bt",
    "ov-fp32",
    "ov-bf16",
    "ov-fp16",
    "ov-int8",
    "ov-int8-bf16",
    "ov-int8-ptq",
    "ov-int8-ptq-bf16",
)
# Not in the default set: INT8 PTQ with the attention products quantised too (NNCF's transformer default).
EXTRA_VARIANTS = ("ov-int8-ptq-attention",)
CUDA_VARIANTS = ("cuda-fp32", "cuda-fp16", "cuda-bf16", "l2bt-cuda-fp32", "l2bt-cuda-fp16", "l2bt-cuda-bf16")
BF16_VARIANTS = ("torch-bf16", "ov-bf16", "ov-int8-bf16", "ov-int8-ptq-bf16")  # need a CPU with bf16 units
LABELS = {
    "torch": "PyTorch FP32 (ours)",
    "torch-bf16": "PyTorch, teacher bf16 (ours)",
    "l2bt": "PyTorch FP32 (anomalib L2BT)",
    **{name: variant.label for name, variant in OPENVINO_VARIANTS.items()},
    "cuda-fp32": "PyTorch CUDA FP32 (ours)",
    "cuda-fp16": "PyTorch CUDA, teacher fp16 (ours)",
    "cuda-bf16": "PyTorch CUDA, teacher bf16 (ours)",
    "l2bt-cuda-fp32": "PyTorch CUDA FP32 (L2BT)",
    "l2bt-cuda-fp16": "PyTorch CUDA FP16 autocast (L2BT)",
    "l2bt-cuda-bf16": "PyTorch CUDA bf16 autocast (L2BT)",
}
TIMED_PARTS = ("whole", "teacher", "without teacher")  # of --paired
# Autocast dtype of a PyTorch variant, by the end of its name (as the trainer's 16-mixed / bf16-mixed runs it).
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Module scopes of TransformerStudent, as the ONNX exporter records them, and their share-table names.
PARTS = {
    "pre_processor": "pre-processing",
    "model.teacher": "teacher",
    "model.forward_student": "students",
    "model.backward_student": "students",
    "model.anomaly_map_generator": "anomaly map",
    "post_processor": "post-processing",
}
CALIBRATION_IMAGES = 4
# Normalisation statistics and thresholds as validation would set them, so that the models export and run
# as trained ones do (calibrated INT8 needs them); the values do not affect speed.
NORMALISATION = {
    "_image_threshold": 1.0,
    "_pixel_threshold": 1.0,
    "image_min": 0.0,
    "image_max": 2.0,
    "pixel_min": 0.0,
    "pixel_max": 2.0,
}


def build_ours(teacher: str, size: int) -> torch.nn.Module:
    """TransformerStudent with a random teacher at ``size``, normalisation statistics set, in eval mode."""
    from anomalib_transformer_student import TransformerStudent

    model = TransformerStudent(pretrained=False, teacher=teacher, image_size=size, visualizer=False)
    state = model.post_processor.state_dict()
    model.post_processor.load_state_dict({**state, **{key: torch.tensor(v) for key, v in NORMALISATION.items()}})
    return model.eval()


def hook_parts(model: torch.nn.Module, seconds: dict[str, float]) -> None:
    """Add the time spent in each part of ``model`` (see ``PARTS``) to ``seconds`` on every forward."""
    for name, part in PARTS.items():
        started: list[float] = []

        def start(*_: object, started: list[float] = started) -> None:
            started.append(time.perf_counter())

        def stop(*_: object, started: list[float] = started, part: str = part) -> None:
            seconds[part] = seconds.get(part, 0.0) + time.perf_counter() - started.pop()

        module = model.get_submodule(name)
        module.register_forward_pre_hook(start)
        module.register_forward_hook(stop)


def measure_torch(variant: str, teacher: str, size: int, warmup: int, runs: int, threads: int | None) -> dict:
    """Latencies, peak memory and (ours on CPU) per-part shares of time of a PyTorch variant."""
    if threads:
        torch.set_num_threads(threads)
    cuda = "cuda" in variant
    device = torch.device("cuda" if cuda else "cpu")
    l2bt = variant.startswith("l2bt")
    precision = variant.rsplit("-", 1)[-1]
    half = HALF.get(precision)
    model = build_l2bt(size, visualizer=False).eval() if l2bt else build_ours(teacher, size)
    model = model.to(device)
    images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    parts: dict[str, float] = {}
    if variant in {"torch", "torch-bf16"}:
        hook_parts(model, parts)

    def run() -> None:
        # Both models under autocast around their whole forward, as the trainer's precision runs the steps.
        with torch.inference_mode(), torch.autocast(device.type, half or torch.bfloat16, enabled=bool(half)):
            model(images)

    synchronize = torch.cuda.synchronize if cuda else None
    time_runs(run, warmup, 0, synchronize)
    parts.clear()  # shares of the timed runs only
    times = time_runs(run, 0, runs, synchronize)
    memory = peak_cuda_mib() if cuda else peak_rss_mib()
    return {"times": times, "memory": memory, "parts": {part: s / sum(times) for part, s in parts.items()}}


def measure_paired(teacher: str, size: int, warmup: int, runs: int, threads: int | None) -> dict[str, dict]:
    """Latencies of ours and of L2BT in PyTorch FP32 on CPU, alternating ``runs`` times in this process.

    Three measurements: the whole forward; the teacher alone; everything but the teacher (the teacher's
    forward replaced by its stored output). The teacher is over 95 % of the time and varies by several
    per cent from run to run on a shared machine, so the third is what tells the two implementations apart.
    """
    if threads:
        torch.set_num_threads(threads)
    models = {"torch": build_ours(teacher, size), "l2bt": build_l2bt(size, visualizer=False).eval()}
    images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    times: dict[str, dict[str, list[float]]] = {kind: {name: [] for name in models} for kind in TIMED_PARTS}

    def alternate(kind: str, run: object, repeats: int) -> None:
        for model in models.values():
            time_runs(lambda model=model: run(model), warmup, 0)
        for _ in range(repeats):
            for name, model in models.items():
                times[kind][name] += time_runs(lambda model=model: run(model), 0, 1)

    with torch.inference_mode():
        alternate("whole", lambda model: model(images), runs)
        alternate("teacher", lambda model: model.model.teacher(model.pre_processor(images)), runs)
        for model in models.values():
            features = model.model.teacher(model.pre_processor(images))
            model.model.teacher.forward = lambda *_, features=features, **__: features
        alternate("without teacher", lambda model: model(images), 3 * runs)
    return times


def measure_alternating(
    teacher: str, size: int, variants: list[str], paths: dict[str, str], warmup: int, runs: int, threads: int | None
) -> dict[str, list[float]]:
    """Latencies of the variants on CPU in this one process, alternating ``runs`` times (each after ``warmup``).

    On a shared machine, processes run one after the other see different loads; alternating gives every variant
    the same conditions. ``paths`` holds each OpenVINO variant's IR. PyTorch variants share one model of ours
    (``torch-bf16``: under bf16 autocast).
    """
    import openvino as ov

    if threads:
        torch.set_num_threads(threads)
    images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    ours = build_ours(teacher, size) if {"torch", "torch-bf16"} & set(variants) else None
    core = ov.Core()
    runners = {}
    for name in variants:
        if name in OPENVINO_VARIANTS:
            config = {
                "INFERENCE_PRECISION_HINT": OPENVINO_VARIANTS[name].hint,
                **({"INFERENCE_NUM_THREADS": threads} if threads else {}),
            }
            request = core.compile_model(paths[name], "CPU", config).create_infer_request()
            runners[name] = lambda request=request: request.infer({0: images.numpy()})
        elif name in {"torch", "torch-bf16"}:
            bf16 = name == "torch-bf16"

            def run_ours(bf16: bool = bf16) -> None:
                with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                    ours(images)

            runners[name] = run_ours
        elif name == "l2bt":
            l2bt = build_l2bt(size, visualizer=False).eval()

            def run_l2bt(l2bt: torch.nn.Module = l2bt) -> None:
                with torch.inference_mode():
                    l2bt(images)

            runners[name] = run_l2bt
        else:
            msg = f"--alternate runs CPU variants only, not {name}."
            raise ValueError(msg)
    for run in runners.values():
        time_runs(run, warmup, 0)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(runs):
        for name, run in runners.items():
            times[name] += time_runs(run, 0, 1)
    return times


def measure_openvino(
    model_path: str, hint: str, warmup: int, runs: int, threads: int | None, scopes: dict[str, str]
) -> dict:
    """Latencies and peak memory of an OpenVINO IR on CPU at precision ``hint``, then per-part shares of a run."""
    import numpy as np
    import openvino as ov

    core = ov.Core()
    model = core.read_model(model_path)
    size = model.input(0).get_partial_shape()[2].get_length()
    images = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    # An explicit precision: CPUs with bf16 units would otherwise run an FP32 IR in bf16.
    config = {"INFERENCE_PRECISION_HINT": hint, **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
    request = core.compile_model(model, "CPU", config).create_infer_request()
    times = time_runs(lambda: request.infer({0: images}), warmup, runs)
    memory = peak_rss_mib()

    profiled = core.compile_model(model, "CPU", {**config, "PERF_COUNT": True}).create_infer_request()
    profiled.infer({0: images})
    seconds: dict[str, float] = defaultdict(float)
    for node in profiled.profiling_info:
        seconds[part_of(node.node_name, node.node_type, scopes)] += node.real_time.total_seconds()
    total = sum(seconds.values())
    return {"times": times, "memory": memory, "parts": {part: s / total for part, s in seconds.items()}}


def part_of(node_name: str, node_type: str, scopes: dict[str, str]) -> str:
    """The part of the model an executed OpenVINO node belongs to.

    Nodes keep their ONNX names, or the name of the ONNX node they came from before a ``/``. Nodes that
    OpenVINO creates while fusing get new names; of those, layer norms (``MVN``) and quantised matrix
    products exist only in the teacher (the only part with layer norms, and the only part quantised).
    """
    for name in (node_name, node_name.split("/")[0]):
        if name in scopes:
            return scopes[name]
    return "teacher" if node_type == "MVN" or "Quantized" in node_type else "other"


def onnx_parts(onnx_path: Path) -> dict[str, str]:
    """Map each node of an exported graph to its part of the model (see ``PARTS``)."""
    import onnx

    parts = {}
    for node in onnx.load(str(onnx_path), load_external_data=False).graph.node:
        metadata = {entry.key: entry.value for entry in node.metadata_props}
        scopes = metadata.get("pkg.torch.onnx.name_scopes", "")
        parts[node.name] = next((part for scope, part in PARTS.items() if f"'{scope}'" in scopes), "other")
    return parts


def calibration_data(root: Path, size: int) -> object:
    """A datamodule of generated images at ``size`` for INT8 post-training quantisation."""
    from anomalib.data import MVTecAD

    # anomalib's MVTecAD validates on half of the test images, which calibrate the quantisation.
    generate_demo_data(root, image_size=size, n_train=1, n_test_good=CALIBRATION_IMAGES, n_test_per_defect=1)
    return MVTecAD(root=root, category="brick", num_workers=0, eval_batch_size=1)


def export_name(variant: OpenVINOVariant) -> str:
    """The export a variant runs (variants differing only in precision share it)."""
    names = {None: "FP32 IR", "fp16": "FP16 IR", "int8": "INT8 weights IR", "int8_ptq": "INT8 PTQ IR"}
    return names[variant.compression] + (", attention quantised" if variant.attention_quantised else "")


def export_all(
    teacher: str, size: int, variants: list[str], root: Path, onnx: bool = True
) -> tuple[dict, dict[str, str]]:
    """Export ours at ``size`` (ONNX once, for the node map, if ``onnx``; each OpenVINO IR the variants need once).

    Returns:
        Per export name (``"ONNX"``, ``export_name(...)``): its path, export time and size on disk; and the
        ONNX graph's node-to-part map (empty without ``onnx``).
    """
    if not any(name in OPENVINO_VARIANTS for name in variants):
        return {}, {}
    import nncf

    model = build_ours(teacher, size)
    nncf.set_log_level(logging.WARNING)
    exports = {}
    onnx_path = None
    if onnx:
        start = time.perf_counter()
        onnx_path = model.to_onnx(root / "onnx", input_size=(size, size))
        exports["ONNX"] = {"seconds": time.perf_counter() - start, "mib": directory_mib(onnx_path.parent)}
    for name in variants:
        variant = OPENVINO_VARIANTS.get(name)
        if variant is None or export_name(variant) in exports:
            continue
        calibrated = variant.compression == "int8_ptq"
        datamodule = calibration_data(root / "calibration", size) if calibrated else None
        model.ptq_float_operations = () if variant.attention_quantised else type(model).ptq_float_operations
        start = time.perf_counter()
        path = model.to_openvino(
            root / name, input_size=(size, size), compression_type=variant.compression, datamodule=datamodule
        )
        exports[export_name(variant)] = {"path": str(path), "seconds": time.perf_counter() - start}
        exports[export_name(variant)]["mib"] = directory_mib(path.parent)
    return exports, onnx_parts(onnx_path) if onnx_path else {}


def directory_mib(directory: Path) -> float:
    """Size of the files in ``directory`` in MiB."""
    return sum(file.stat().st_size for file in directory.iterdir() if file.is_file()) / 2**20


def parameter_counts(teacher: str, size: int) -> tuple[int, int, int]:
    """Parameters of the full timm backbone, of the pruned teacher in the model, and of both students."""
    import timm

    model = build_ours(teacher, size).model
    full = sum(p.numel() for p in timm.create_model(teacher, pretrained=False).parameters())
    pruned = sum(p.numel() for p in model.teacher.parameters())
    students = sum(p.numel() for m in (model.forward_student, model.backward_student) for p in m.parameters())
    return full, pruned, students


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[448, 1036])
    parser.add_argument("--teacher", default="vit_base_patch14_reg4_dinov2.lvd142m")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--threads", type=int, help="CPU threads (default: the libraries' own, all cores)")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=CPU_VARIANTS + EXTRA_VARIANTS + CUDA_VARIANTS,
        help="default: all available but ov-int8-ptq-attention",
    )
    parser.add_argument(
        "--paired", type=int, metavar="N", help="only compare ours with L2BT (PyTorch FP32), alternating N times"
    )
    parser.add_argument(
        "--alternate",
        type=int,
        metavar="N",
        help="only latency: all CPU variants in one process, alternating N times (same load for all)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    variants = args.variants or [*CPU_VARIANTS, *(CUDA_VARIANTS if cuda else ())]
    if not cpu_has_bf16_units():
        skipped = [variant for variant in variants if variant in BF16_VARIANTS]
        variants = [variant for variant in variants if variant not in BF16_VARIANTS]
        if skipped:
            print(f"Skipped (this CPU has no bf16 units: AVX512_BF16 or AMX-BF16): {', '.join(skipped)}")

    print(
        f"CPU: {cpu_summary()}; {torch.get_num_threads()} threads; torch {torch.__version__}"
        + (f"; CUDA: {torch.cuda.get_device_name()}" if cuda else "; no CUDA")
    )
    print(f"teacher {args.teacher} (random weights), batch 1, median of {args.runs} runs after {args.warmup} warm-up")
    print("load average at start (other processes share the CPU): {:.1f} {:.1f} {:.1f}\n".format(*os.getloadavg()))
    if args.paired:
        for size in args.sizes:
            times = in_fresh_process(measure_paired, args.teacher, size, args.warmup, args.paired, args.threads)
            print(f"{size} px, ours and L2BT alternating in one process (ms; median, then each run):")
            for kind in TIMED_PARTS:
                ours, l2bt = (statistics.median(times[kind][name]) for name in ("torch", "l2bt"))
                each = {name: " ".join(f"{s * 1e3:.0f}" for s in times[kind][name]) for name in ("torch", "l2bt")}
                print(
                    f"  {kind}: ours {ours * 1e3:.0f} ({each['torch']}), L2BT {l2bt * 1e3:.0f} ({each['l2bt']}), "
                    f"ours / L2BT = {ours / l2bt:.2f}"
                )
        return
    if args.alternate:
        for size in args.sizes:
            alternate(args, size, variants)
        return
    results: dict[tuple[int, str], dict] = {}
    exports: dict[int, dict] = {}
    for size in args.sizes:
        full, pruned, students = parameter_counts(args.teacher, size)
        print(
            f"{size} px: teacher {pruned / 1e6:.1f} M parameters in the model (full backbone with head "
            f"{full / 1e6:.1f} M), students {students / 1e6:.1f} M"
        )
        with tempfile.TemporaryDirectory() as directory:
            exports[size], scopes = export_all(args.teacher, size, variants, Path(directory))
            for variant in variants:
                if variant in OPENVINO_VARIANTS:
                    path = exports[size][export_name(OPENVINO_VARIANTS[variant])]["path"]
                    hint = OPENVINO_VARIANTS[variant].hint
                    result = in_fresh_process(
                        measure_openvino, path, hint, args.warmup, args.runs, args.threads, scopes
                    )
                else:
                    result = in_fresh_process(
                        measure_torch, variant, args.teacher, size, args.warmup, args.runs, args.threads
                    )
                results[size, variant] = result
                median = statistics.median(result["times"])
                print(f"  {LABELS[variant]}: {median * 1e3:.0f} ms, {result['memory']:.0f} MiB", flush=True)
    print_tables(args.sizes, variants, results, exports)


def alternate(args: argparse.Namespace, size: int, variants: list[str]) -> None:
    """``--alternate``: export, then time all variants alternating in one fresh process; print a table."""
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        exports, _ = export_all(args.teacher, size, variants, Path(directory), onnx=False)
        print(f"{size} px: exports took {time.perf_counter() - start:.0f} s", flush=True)
        paths = {
            name: exports[export_name(OPENVINO_VARIANTS[name])]["path"]
            for name in variants
            if name in OPENVINO_VARIANTS
        }
        times = in_fresh_process(
            measure_alternating, args.teacher, size, variants, paths, args.warmup, args.alternate, args.threads
        )
    median = {name: statistics.median(runs) for name, runs in times.items()}
    reference = median.get("torch")
    print(f"\n{size} px, variants alternating in one process, {args.alternate} rounds after {args.warmup} warm-up:\n")
    print(markdown_row(["size", "variant", "latency (ms)", "/ PyTorch FP32", "each run (ms)"]))
    print(markdown_rule("rlrrl"))
    for name, runs in times.items():
        ratio = f"{median[name] / reference:.2f}" if reference else "-"
        each = " ".join(f"{seconds * 1e3:.0f}" for seconds in runs)
        print(markdown_row([str(size), LABELS[name], f"{median[name] * 1e3:.0f}", ratio, each]))
    openvino = {name: median[name] for name in times if name in OPENVINO_VARIANTS}
    if reference and openvino:
        best = min(openvino, key=openvino.get)
        print(f"\n{size} px: best OpenVINO ({LABELS[best]}) / PyTorch FP32 = {openvino[best] / reference:.2f}")


def reference_of(variant: str) -> str:
    """The FP32 PyTorch variant a variant's latency is compared with: ours on the same device."""
    return "cuda-fp32" if "cuda" in variant else "torch"


def print_tables(sizes: list[int], variants: list[str], results: dict, exports: dict) -> None:
    """Markdown tables: speed and memory, exports, shares of time, and the goals' ratios."""
    latency = {key: statistics.median(result["times"]) for key, result in results.items()}
    print("\n" + markdown_row(["size", "variant", "latency (ms)", "/ PyTorch FP32", "images/s", "peak memory (MiB)"]))
    print(markdown_rule("rlrrrr"))
    for size in sizes:
        for variant in variants:
            median, memory = latency[size, variant], results[size, variant]["memory"]
            reference = latency.get((size, reference_of(variant)))
            ratio = f"{median / reference:.2f}" if reference else "-"
            cells = [str(size), LABELS[variant], f"{median * 1e3:.0f}", ratio, f"{1 / median:.2f}", f"{memory:.0f}"]
            print(markdown_row(cells))

    print("\n" + markdown_row(["size", "export", "export time (s)", "size on disk (MiB)"]))
    print(markdown_rule("rlrr"))
    for size in sizes:
        for name, export in exports[size].items():
            print(markdown_row([str(size), name, f"{export['seconds']:.0f}", f"{export['mib']:.0f}"]))

    names = ["pre-processing", "teacher", "students", "anomaly map", "post-processing", "other"]
    print("\n" + markdown_row(["size", "variant", *names]))
    print(markdown_rule("rl" + "r" * len(names)))
    for size in sizes:
        for variant in variants:
            parts = results[size, variant]["parts"]
            if parts:
                hooked = variant not in OPENVINO_VARIANTS  # PyTorch: the rest of the time is outside the modules
                other = max(0.0, 1 - sum(parts.values())) if hooked else parts.get("other", 0.0)
                shares = [*(parts.get(name, 0.0) for name in names[:-1]), other]
                print(markdown_row([str(size), LABELS[variant], *(f"{100 * s:.1f}%" for s in shares)]))

    print()
    for size in sizes:
        ours = latency.get((size, "torch"))
        openvino = {v: latency[size, v] for v in variants if v in OPENVINO_VARIANTS}
        if ours and openvino:
            best = min(openvino, key=openvino.get)
            print(f"{size} px: best OpenVINO ({LABELS[best]}) / PyTorch FP32 = {openvino[best] / ours:.2f}")
        if ours and "l2bt" in variants:
            print(f"{size} px: ours / L2BT in PyTorch FP32 = {ours / latency[size, 'l2bt']:.2f}")


if __name__ == "__main__":
    main()
