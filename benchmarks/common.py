"""Helpers shared by the benchmark scripts in this folder.

The scripts run as ``python benchmarks/<script>.py``; Python then puts the script's own folder first on
``sys.path``, so they import this module as ``common`` (and so do the processes they spawn, which inherit
``sys.path``). anomalib, timm and the package's demo generator are imported inside the functions that use
them, so that importing this module (and ``--help``) stays quick.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:
    from anomalib.models.image import L2BT

T = TypeVar("T")

# CPU features (Linux /proc/cpuinfo flags) that decide which precision runs fast: AVX2 and AVX-512 for float32,
# AVX512_BF16 and AMX-BF16 for bfloat16, AVX512_VNNI and AMX-INT8 for int8.
RELEVANT_CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class OpenVINOVariant:
    """One way of running the model in OpenVINO: an export of it and the precision the CPU computes it in.

    Attributes:
        label: Name in tables.
        compression: ``to_openvino``'s ``compression_type`` (``None``: FP32 IR).
        hint: OpenVINO's ``INFERENCE_PRECISION_HINT`` (``f32`` or ``bf16``); ``bf16`` needs a CPU with bf16
            units (on such a CPU, ``bf16`` is also what OpenVINO chooses when no hint is given).
        attention_quantised: INT8 PTQ with the teacher's attention products quantised too.
    """

    label: str
    compression: str | None
    hint: str
    attention_quantised: bool = False


OPENVINO_VARIANTS = {
    "ov-fp32": OpenVINOVariant("OpenVINO FP32, f32", None, "f32"),
    "ov-bf16": OpenVINOVariant("OpenVINO FP32 IR, bf16 (default on bf16 CPUs)", None, "bf16"),
    "ov-fp16": OpenVINOVariant("OpenVINO FP16 weights, f32", "fp16", "f32"),
    "ov-int8": OpenVINOVariant("OpenVINO INT8 weights, f32", "int8", "f32"),
    "ov-int8-bf16": OpenVINOVariant("OpenVINO INT8 weights, bf16", "int8", "bf16"),
    "ov-int8-ptq": OpenVINOVariant("OpenVINO INT8 PTQ, f32", "int8_ptq", "f32"),
    "ov-int8-ptq-bf16": OpenVINOVariant("OpenVINO INT8 PTQ, bf16", "int8_ptq", "bf16"),
    "ov-int8-ptq-attention": OpenVINOVariant("OpenVINO INT8 PTQ, attention quantised, f32", "int8_ptq", "f32", True),
}


def cpu_name() -> str:
    """The CPU's model name (Linux, as ``lscpu`` prints it), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags, as the package reads them; ``None`` where none can be read."""
    from anomalib_transformer_student.model.precision import cpu_features

    return set(cpu_features()) or None


def cpu_has_bf16_units() -> bool:
    """Whether the CPU computes bfloat16 natively, as the package decides it."""
    from anomalib_transformer_student.model.precision import cpu_has_bf16_units as package_check

    return package_check()


def cpu_summary() -> str:
    """One line: the CPU's name, its logical cores, and which of ``RELEVANT_CPU_FEATURES`` it has.

    Example: ``Intel(R) Xeon(R) Processor, 2 cores; has avx2 avx512f avx512_bf16 ...; lacks none``.
    """
    flags = cpu_flags()
    if flags is None:
        features = "features unknown (no /proc/cpuinfo)"
    else:
        present = [name for name in RELEVANT_CPU_FEATURES if name in flags]
        absent = [name for name in RELEVANT_CPU_FEATURES if name not in flags]
        features = f"has {' '.join(present) or 'none'}; lacks {' '.join(absent) or 'none'}"
    return f"{cpu_name()}, {os.cpu_count()} cores; {features} (of {', '.join(RELEVANT_CPU_FEATURES)})"


def synchronize_cuda() -> None:
    """Wait for all queued CUDA work, where CUDA is available, so that a clock read next is fair."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_runs(
    run: Callable[[], object], warmup: int, runs: int, synchronize: Callable[[], object] | None = None
) -> list[float]:
    """Seconds of each of ``runs`` calls of ``run`` after ``warmup`` untimed ones.

    Args:
        run: What to time, called without arguments.
        warmup: Untimed calls first.
        runs: Timed calls.
        synchronize: Called before and after each timed call (e.g. ``torch.cuda.synchronize``), so that
            asynchronous work is inside the timed span.
    """
    for _ in range(warmup):
        run()
    times = []
    for _ in range(runs):
        if synchronize:
            synchronize()
        start = time.perf_counter()
        run()
        if synchronize:
            synchronize()
        times.append(time.perf_counter() - start)
    return times


def peak_rss_mib() -> float:
    """Peak resident set of this process in MiB.

    Linux's ``VmHWM`` is this program's own; ``ru_maxrss`` would carry the parent's peak over ``exec``.
    """
    status = Path("/proc/self/status")
    if status.exists():
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 2**10
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # bytes on macOS


def peak_cuda_mib() -> float:
    """Peak CUDA memory allocated by this process's tensors, in MiB."""
    return torch.cuda.max_memory_allocated() / 2**20


def in_fresh_process(function: Callable[..., T], *args: object) -> T:
    """Run ``function(*args)`` in a new (spawned) process, so that its peak memory is its own; return its result."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def count_forward_images(module: torch.nn.Module, stage: Callable[[], str]) -> dict[str, int]:
    """Count the images that pass through ``module``, per stage; return the (live) counts.

    ``module.forward`` is wrapped on the instance (``nn.Module.__call__`` looks it up there), so every
    call, however it is reached, adds the first dimension of its first argument to ``counts[stage()]``.

    Example:
        >>> layer = torch.nn.Identity()
        >>> counts = count_forward_images(layer, lambda: "train")
        >>> _ = layer(torch.zeros(3, 2)); _ = layer(torch.zeros(1, 2))
        >>> counts
        {'train': 4}
    """
    counts: dict[str, int] = {}
    forward = module.forward

    def counting_forward(images: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        key = stage()
        counts[key] = counts.get(key, 0) + int(images.shape[0])
        return forward(images, *args, **kwargs)

    module.forward = counting_forward
    return counts


def build_l2bt(image_size: int, backbone: str | None = None, **kwargs: Any) -> L2BT:
    """Build anomalib's L2BT with a randomly initialised teacher and its pre-processor at ``image_size``.

    L2BT always asks timm for the pretrained DINOv2 ViT-B/14 with registers; while the model is built, its
    teacher's feature extractor is asked for random weights instead (no download; speed does not depend on
    the weights), then restored.

    Args:
        image_size: Side of the square model input.
        backbone: Another timm ViT for the teacher (its pretrained tag, such as ``.lvd142m``, is dropped);
            ``None`` keeps L2BT's own architecture.
        **kwargs: Passed on to ``L2BT`` (e.g. ``visualizer=False``).
    """
    from anomalib.models.image import L2BT
    from anomalib.models.image.l2bt import teacher as l2bt_teacher

    overrides: dict[str, object] = {"pre_trained": False}
    if backbone is not None:
        import timm

        overrides["backbone"] = timm.models.split_model_name_tag(backbone)[0]
    extractor = l2bt_teacher.TimmFeatureExtractor

    def random_weights_extractor(*args: object, **extractor_kwargs: object) -> torch.nn.Module:
        return extractor(*args, **{**extractor_kwargs, **overrides})

    l2bt_teacher.TimmFeatureExtractor = random_weights_extractor
    try:
        return L2BT(pre_processor=L2BT.configure_pre_processor((image_size, image_size)), **kwargs)
    finally:
        l2bt_teacher.TimmFeatureExtractor = extractor


def generate_demo_data(
    root: Path,
    *,
    image_size: int,
    n_train: int,
    n_test_good: int,
    n_test_per_defect: int,
    category: str = "brick",
    seed: int = 0,
) -> Path:
    """Write the package's generated demo images of one texture under ``root``, laid out as MVTec AD; return ``root``.

    See ``anomalib_transformer_student.apps.demo_data.DemoDatasetSpec`` for the arguments.
    """
    from anomalib_transformer_student.apps.demo_data import DemoDatasetSpec, generate_demo_dataset

    spec = DemoDatasetSpec(
        categories=(category,),
        image_size=image_size,
        n_train=n_train,
        n_test_good=n_test_good,
        n_test_per_defect=n_test_per_defect,
        seed=seed,
    )
    return generate_demo_dataset(root, spec)


def markdown_row(cells: Iterable[str]) -> str:
    """One row of a Markdown table: ``| a | b |``."""
    return "| " + " | ".join(cells) + " |"


def markdown_rule(alignments: str) -> str:
    """The rule under a Markdown table's header, one column per letter: ``l`` left-, ``r`` right-aligned.

    Example: ``markdown_rule("lrr")`` is ``|---|---:|---:|``.
    """
    cells = {"l": "---", "r": "---:"}
    return "|" + "|".join(cells[alignment] for alignment in alignments) + "|"
