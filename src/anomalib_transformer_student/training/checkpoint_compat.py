"""Refuse a checkpoint whose teacher, layers or input size differ from the model it is loaded into.

``TransformerStudent.load_from_checkpoint(path, **overrides)`` builds the model from the
checkpoint's hyper-parameters updated by ``overrides`` (and Lightning writes the overrides into
the loaded checkpoint's ``hyper_parameters`` as well), and ``anomalib test --ckpt_path ...``
builds it from the command line's options: either way the model can differ from the one that
was trained. When the state-dict shapes differ, loading fails with a list of tensor names;
when they agree (other layers of the same teacher, another teacher of the same shape), the
students would silently read features they were never trained on.

So each checkpoint records the architecture under its own key (:func:`record_architecture`),
which nothing overrides, and :func:`check_checkpoint_compatible` compares it with the model
and names every setting that differs.

The teacher's weights (``pretrained``, ``teacher_weights``) are not compared: the checkpoint
holds the teacher, so its weights replace whatever the model was built with. Neither is the
pretrained tag of the teacher's name (``.lvd142m``), which does not change the architecture.

The evaluator's entries of the state dict (metric settings such as AUPRO's FPR limit) are not
learned either: :func:`use_current_evaluator` swaps them for the model's, so that a checkpoint can be
tested with other metrics than it was trained with (``anomalib test --config configs/size_aupro.yaml``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from timm.models import split_model_name_tag
from torch import nn

ARCHITECTURE_KEY = "transformer_student_architecture"
# The settings that decide what the saved weights mean.
ARCHITECTURE_SETTINGS = ("teacher", "layers", "image_size")
EVALUATOR_PREFIX = "evaluator."


class CheckpointMismatchError(ValueError):
    """The checkpoint was trained with another teacher, other layers or another input size."""


def record_architecture(checkpoint: dict[str, Any], architecture: Mapping[str, Any]) -> None:
    """Store the model's architecture (teacher name, block indices, input size) in ``checkpoint``.

    Called from ``on_save_checkpoint``; the record is plain data, safe to pickle.
    """
    checkpoint[ARCHITECTURE_KEY] = {name: architecture[name] for name in ARCHITECTURE_SETTINGS}


def _block_indices(layers: Sequence[Any], depth: int) -> tuple[int, ...] | None:
    """``layers`` as non-negative block indices of a ``depth``-block teacher, ``None`` if it cannot have them."""
    indices = [int(layer) for layer in layers]
    if any(not -depth <= index < depth for index in indices):
        return None
    return tuple(index % depth for index in indices)


def _differs(name: str, stored: Any, current: Any, depth: int) -> bool:
    if name == "teacher":
        return split_model_name_tag(str(stored))[0] != split_model_name_tag(str(current))[0]
    if name == "layers":
        return _block_indices(stored, depth) != _block_indices(current, depth)
    return int(stored) != int(current)


def _shown(value: Any) -> str:
    if isinstance(value, Sequence) and not isinstance(value, str):
        return str(list(value))
    return repr(value) if isinstance(value, str) else str(value)


def _cli_value(value: Any) -> str:
    return f'"{list(value)}"' if isinstance(value, Sequence) and not isinstance(value, str) else str(value)


def check_checkpoint_compatible(checkpoint: Mapping[str, Any], current: Mapping[str, Any], depth: int) -> None:
    """Raise :class:`CheckpointMismatchError` naming every architecture setting in which they differ.

    Call it from ``on_load_checkpoint``, which Lightning runs before loading the state dict.
    Settings the checkpoint does not record are not compared.

    Args:
        checkpoint: The loaded checkpoint.
        current: The architecture of the model it is being loaded into (teacher, layers, image_size).
        depth: Number of blocks of the model's teacher, to compare negative block indices.

    Example:
        >>> architecture = {"teacher": "vit_base_patch14_reg4_dinov2", "layers": [7, 11], "image_size": 1036}
        >>> check_checkpoint_compatible({ARCHITECTURE_KEY: {**architecture, "layers": [7, -1]}}, architecture, 12)
        >>> checkpoint = {ARCHITECTURE_KEY: {**architecture, "image_size": 518}}
        >>> check_checkpoint_compatible(checkpoint, architecture, 12)  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        CheckpointMismatchError: The checkpoint was trained with other settings than this model has: ...
    """
    stored = checkpoint.get(ARCHITECTURE_KEY) or {}
    differing = [
        name
        for name in ARCHITECTURE_SETTINGS
        if stored.get(name) is not None and _differs(name, stored[name], current[name], depth)
    ]
    if not differing:
        return
    described = "; ".join(
        f"{name}: checkpoint {_shown(stored[name])}, model {_shown(current[name])}" for name in differing
    )
    python = ", ".join(f"{name}={_shown(stored[name])}" for name in differing)
    cli = " ".join(f"--model.{name} {_cli_value(stored[name])}" for name in differing)
    msg = (
        f"The checkpoint was trained with other settings than this model has: {described}. Build the model with "
        f"the checkpoint's settings: in Python, leave them out of `load_from_checkpoint(path, ...)` or pass "
        f"{python}; on the anomalib CLI, pass {cli}."
    )
    raise CheckpointMismatchError(msg)


def use_current_evaluator(checkpoint: dict[str, Any], evaluator: nn.Module | None) -> None:
    """Replace the checkpoint's evaluator entries by those of the model's current ``evaluator``, in place.

    Call it from ``on_load_checkpoint``. Without it, a strict load fails as soon as the metrics differ
    from those the checkpoint was trained with ("Missing key(s) in state_dict:
    evaluator.test_metrics.2.fpr_limit").

    Example:
        >>> from anomalib.metrics import AUPRO, Evaluator
        >>> evaluator = Evaluator(test_metrics=[AUPRO(fields=["anomaly_map", "gt_mask"])])
        >>> checkpoint = {"state_dict": {"evaluator.test_metrics.0.old": 1}}
        >>> use_current_evaluator(checkpoint, evaluator)
        >>> sorted(checkpoint["state_dict"])
        ['evaluator.test_metrics.0.fpr_limit']
    """
    state = checkpoint.get("state_dict")
    if state is None:
        return
    for key in [key for key in state if key.startswith(EVALUATOR_PREFIX)]:
        del state[key]
    if isinstance(evaluator, nn.Module):
        state.update({EVALUATOR_PREFIX + key: value for key, value in evaluator.state_dict().items()})


__all__ = [
    "ARCHITECTURE_KEY",
    "ARCHITECTURE_SETTINGS",
    "CheckpointMismatchError",
    "check_checkpoint_compatible",
    "record_architecture",
    "use_current_evaluator",
]
