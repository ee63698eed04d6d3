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
and names every setting that differs. Checkpoints without the record are compared by their
``hyper_parameters``.

The teacher's weights (``pretrained``, ``teacher_weights``) are not compared: the checkpoint
holds the teacher, so its weights replace whatever the model was built with. Neither is the
pretrained tag of the teacher's name (``.lvd142m``), which does not change the architecture.

The evaluator's entries of the state dict (metric settings such as AUPRO's FPR limit) are not
learned either: :func:`use_current_evaluator` swaps them for the model's, so that a checkpoint can be
tested with other metrics than it was trained with (``anomalib test --config configs/size_aupro.yaml``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from timm.models import split_model_name_tag
from torch import nn

from .teacher import normalise_layers

if TYPE_CHECKING:
    from .lightning_model import TransformerStudent

ARCHITECTURE_KEY = "transformer_student_architecture"
# The settings that decide what the saved weights mean.
ARCHITECTURE_SETTINGS = ("teacher", "layers", "image_size")
EVALUATOR_PREFIX = "evaluator."


class CheckpointMismatchError(ValueError):
    """The checkpoint was trained with another teacher, other layers or another input size."""


def model_architecture(model: TransformerStudent) -> dict[str, Any]:
    """Teacher name, block indices (non-negative) and input size of ``model``: plain data, safe to pickle."""
    teacher = model.model.teacher
    return {"teacher": model.teacher_name, "layers": list(teacher.layers), "image_size": teacher.image_size}


def record_architecture(checkpoint: dict[str, Any], model: TransformerStudent) -> None:
    """Store :func:`model_architecture` in ``checkpoint`` (from ``on_save_checkpoint``)."""
    checkpoint[ARCHITECTURE_KEY] = model_architecture(model)


def _differs(name: str, stored: Any, current: Any, depth: int) -> bool:
    if name == "teacher":
        return split_model_name_tag(str(stored))[0] != split_model_name_tag(str(current))[0]
    if name == "layers":
        try:
            return normalise_layers(stored, depth) != tuple(current)
        except ValueError:  # indices this teacher cannot have
            return True
    return int(stored) != int(current)


def _shown(value: Any) -> str:
    if isinstance(value, Sequence) and not isinstance(value, str):
        return str(list(value))
    return repr(value) if isinstance(value, str) else str(value)


def _cli_value(value: Any) -> str:
    return f'"{list(value)}"' if isinstance(value, Sequence) and not isinstance(value, str) else str(value)


def check_checkpoint_compatible(checkpoint: Mapping[str, Any], model: TransformerStudent) -> None:
    """Raise :class:`CheckpointMismatchError` naming every architecture setting in which they differ.

    Call it from ``on_load_checkpoint``, which Lightning runs before loading the state dict.
    Settings the checkpoint does not record are not compared.

    Args:
        checkpoint: The loaded checkpoint.
        model: The model it is being loaded into.
    """
    stored = checkpoint.get(ARCHITECTURE_KEY) or checkpoint.get("hyper_parameters") or {}
    current = model_architecture(model)
    depth = model.model.teacher.depth
    differing = [
        name for name in ARCHITECTURE_SETTINGS if name in stored and _differs(name, stored[name], current[name], depth)
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


def use_current_evaluator(checkpoint: dict[str, Any], model: nn.Module) -> None:
    """Replace the checkpoint's evaluator entries by those of ``model``'s current evaluator, in place.

    Call it from ``on_load_checkpoint``. Without it, a strict load fails as soon as the metrics differ
    from those the checkpoint was trained with ("Missing key(s) in state_dict:
    evaluator.test_metrics.2.fpr_limit").

    Example:
        >>> from anomalib.metrics import AUPRO, Evaluator
        >>> model = nn.Module()
        >>> model.evaluator = Evaluator(test_metrics=[AUPRO(fields=["anomaly_map", "gt_mask"])])
        >>> checkpoint = {"state_dict": {"evaluator.test_metrics.0.old": 1}}
        >>> use_current_evaluator(checkpoint, model)
        >>> sorted(checkpoint["state_dict"])
        ['evaluator.test_metrics.0.fpr_limit']
    """
    state = checkpoint.get("state_dict")
    if state is None:
        return
    for key in [key for key in state if key.startswith(EVALUATOR_PREFIX)]:
        del state[key]
    evaluator = getattr(model, "evaluator", None)
    if isinstance(evaluator, nn.Module):
        state.update({EVALUATOR_PREFIX + key: value for key, value in evaluator.state_dict().items()})


__all__ = [
    "ARCHITECTURE_KEY",
    "ARCHITECTURE_SETTINGS",
    "CheckpointMismatchError",
    "check_checkpoint_compatible",
    "model_architecture",
    "record_architecture",
    "use_current_evaluator",
]
