"""Numeric precision: the trainer's precision setting, the CPU's bf16 units, and the maths kept in float32.

The trainer chooses the precision of a run (``--trainer.precision bf16-mixed``, ``Engine(precision=...)``):
Lightning runs every step under ``torch.autocast``, so the teacher (also when it fills the feature cache)
and the students compute in bf16 or fp16. The loss and the anomaly-map maths leave autocast and run in
float32 (:func:`float32_maths`). Exported graphs are traced outside any autocast: they hold float32.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

# CPU features (Linux ``/proc/cpuinfo`` flags, and the keys of ``torch.cpu.get_capabilities``) of units that
# compute bfloat16 natively: x86 AVX512_BF16 (Intel Cooper Lake and later Xeons, AMD Zen 4 and later) and AMX-BF16
# (Intel Xeon Sapphire Rapids and later), Arm BF16 (e.g. Neoverse V1, AWS Graviton3).
BF16_CPU_FEATURES = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@functools.cache
def cpu_features() -> frozenset[str]:
    """Lower-case features of this CPU, from PyTorch (``torch.cpu.get_capabilities``) and ``/proc/cpuinfo``."""
    features: set[str] = set()
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        with contextlib.suppress(RuntimeError):  # CPUs that PyTorch cannot read: /proc/cpuinfo may still tell
            features |= {name.lower() for name, present in capabilities().items() if present is True}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):  # x86, Arm
                features |= set(line.partition(":")[2].lower().split())
    return frozenset(features)


def cpu_has_bf16_units() -> bool:
    """Whether this machine's CPU computes bfloat16 natively (x86: AVX512_BF16 or AMX-BF16; Arm: BF16).

    Without such units PyTorch emulates bfloat16 in software, which runs a ViT several times slower than float32.
    """
    return bool(BF16_CPU_FEATURES & cpu_features())


def float32_maths(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that leaves any active autocast on ``device``, for maths that must stay float32.

    Callers pass it float32 tensors (``.float()``). Outside autocast (exports, ``32-true``) it does nothing, so
    traced graphs are unchanged.

    Example:
        >>> x = torch.ones(2, 2)
        >>> with torch.autocast("cpu", dtype=torch.bfloat16), float32_maths(x.device):
        ...     (x @ x).dtype
        torch.float32
    """
    active = device.type in {"cpu", "cuda"} and torch.is_autocast_enabled(device.type)
    return torch.autocast(device.type, enabled=False) if active else contextlib.nullcontext()


def emulates_bf16(precision: object, device: torch.device) -> bool:
    """Whether a trainer ``precision`` (e.g. ``"bf16-mixed"``) would run bf16 on a CPU without bf16 units.

    Example:
        >>> emulates_bf16("32-true", torch.device("cpu"))
        False
    """
    return "bf16" in str(precision) and device.type == "cpu" and not cpu_has_bf16_units()


__all__ = ["cpu_features", "cpu_has_bf16_units", "emulates_bf16", "float32_maths"]
