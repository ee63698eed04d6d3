"""Stop training at the first batch when the teacher's features are not finite, and say why.

A teacher that yields NaN or Inf (a broken weights file, weights of another architecture, a
float16 overflow) makes the students' loss NaN; Adam then turns every student weight into NaN
and training goes on for its full length, producing a model that scores every image NaN.
:func:`check_finite_features` turns that into an error at the first batch that names the likely cause; the
Lightning module runs it on each epoch's first batch.
"""

from __future__ import annotations

import torch
from torch import nn


class NonFiniteFeaturesError(FloatingPointError):
    """The teacher's features contain NaN or Inf."""


def _count(tensor: torch.Tensor) -> str:
    return f"{int(torch.isnan(tensor).sum())} NaN and {int(torch.isinf(tensor).sum())} Inf of {tensor.numel()} values"


def _non_finite_parameters(module: nn.Module) -> list[str]:
    return [
        name
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def likely_cause(
    images: torch.Tensor | None = None,
    teacher: nn.Module | None = None,
    precision: object = "32-true",
    weights_source: str | None = None,
) -> str:
    """The most likely reason for non-finite teacher features, most specific first.

    Args:
        images: The batch the teacher saw.
        teacher: The teacher module, whose weights are inspected.
        precision: The trainer's precision (``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"``, ...).
        weights_source: Where the teacher's weights came from (a file, or a timm name).
    """
    source = f" ({weights_source})" if weights_source else ""
    if images is not None and not bool(torch.isfinite(images).all()):
        return (
            f"the input images already hold {_count(images)}: check the pre-processing and any custom "
            "transform or dataset that produces the images"
        )
    broken = [] if teacher is None else _non_finite_parameters(teacher)
    if broken:
        shown = ", ".join(broken[:3]) + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
        return (
            f"the teacher's weights themselves hold NaN or Inf (in {shown}): the weights file{source} is broken "
            "or corrupt (e.g. a partial download or a bad conversion); fetch it again or point `teacher_weights` "
            "to a good copy"
        )
    if str(precision).startswith("16"):
        return (
            f"float16 overflow in the teacher (precision {precision}): use --trainer.precision bf16-mixed "
            "(same speed on recent GPUs, float32's range) or 32-true"
        )
    return (
        f"the teacher's weights{source} do not suit this architecture (a `teacher_weights` file made for another "
        "model, or weights trained at another input scale), or the input images have extreme values; check "
        "that `teacher` and `teacher_weights` belong together"
    )


def check_finite_features(
    shallow: torch.Tensor,
    deep: torch.Tensor,
    *,
    images: torch.Tensor | None = None,
    teacher: nn.Module | None = None,
    precision: object = "32-true",
    weights_source: str | None = None,
) -> None:
    """Raise :class:`NonFiniteFeaturesError` if the teacher's tokens hold NaN or Inf.

    Costs one reduction and one device synchronisation; meant for the first batch of a run.
    The other arguments only sharpen the diagnosis (see :func:`likely_cause`).

    Args:
        shallow: Tokens of the shallow layer, ``(B, N, D)``.
        deep: Tokens of the deep layer, ``(B, N, D)``.
        images: The batch the teacher saw.
        teacher: The teacher module.
        precision: The trainer's precision.
        weights_source: Where the teacher's weights came from.

    Example:
        >>> tokens = torch.zeros(1, 4, 8)
        >>> check_finite_features(tokens, tokens)  # fine
        >>> check_finite_features(tokens, tokens / 0)  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        NonFiniteFeaturesError: The teacher's features are not finite ...
    """
    if bool(torch.isfinite(shallow).all() & torch.isfinite(deep).all()):
        return
    msg = (
        f"The teacher's features are not finite (shallow layer: {_count(shallow)}; deep layer: {_count(deep)}), "
        "so training would only produce NaN. Likely cause: "
        f"{likely_cause(images, teacher, precision, weights_source)}."
    )
    raise NonFiniteFeaturesError(msg)


__all__ = ["NonFiniteFeaturesError", "check_finite_features", "likely_cause"]
