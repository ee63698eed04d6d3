"""Checkpoints written during a fit leave out the frozen teacher when its weights can be fetched again.

A checkpoint of ``TransformerStudent`` holds the teacher (about 350 MB for ViT-B) and two small students.
anomalib's ``ModelCheckpoint`` writes ``weights/lightning/model.ckpt`` after every epoch, and once the
teacher's features are cached, writing the frozen teacher again and again costs about as much as the epoch
itself. So a checkpoint written before the last epoch of a fit keeps only the students (and the optimiser,
the generators, ...) when the teacher has a source to reload it from: a ``teacher_weights`` file, or timm's
pretrained weights (Hugging Face cache or Hub). It records that source and the SHA-256 of the teacher's
tensors as they were (:func:`omit_teacher`). A teacher with random weights (``pretrained=False``) has no
source and always stays in, as does the teacher of the checkpoint written at the last epoch (or when the
trainer stops early, or after the fit), so the checkpoint a run ends with loads offline.

Loading a checkpoint without its teacher (resuming from ``last.ckpt``, testing an intermediate one) fetches
the weights again, adapts them as training did (the positional embedding resampled to the input grid), and
puts the teacher's tensors back into the state dict before Lightning's strict load (:func:`restore_teacher`).
A checkpoint does not decide what its loader fetches: the teacher it records must be the model's own (the
same architecture, and for timm's weights the same pretrained tag), else nothing is fetched or built; and
the fetched tensors' digest must equal the recorded one before any of them reaches the model, so on a
mismatch the model keeps its own weights. When the source is not available, the record does not match, or
it is malformed, loading stops with :class:`TeacherNotInCheckpointError`, which names the teacher, its
source and the ways out.

The functions work on the checkpoint dict and plain data; the Lightning module's hooks call them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from timm.models import get_pretrained_cfg, split_model_name_tag

from .teacher_weights import TeacherSource, weights_source
from .weights_digest import DigestMemo, state_digest

TEACHER_KEY = "transformer_student_teacher"
# The teacher's tensors in the Lightning module's state dict. ``model.teacher.weights_loaded`` stays in.
TEACHER_PREFIX = "model.teacher.backbone."
SHA256_HEX_DIGITS = 64


class TeacherNotInCheckpointError(RuntimeError):
    """A checkpoint without the teacher's weights, whose weights source is not available or has changed."""


def teacher_source(teacher: str, pretrained: bool, weights: str | None) -> TeacherSource | None:
    """The source the teacher's weights can be reloaded from now, else ``None``.

    ``None`` for random weights (``pretrained=False``), for a ``weights`` file that is not there (a teacher
    that came from a checkpoint) and for timm's pretrained weights that are not in the local Hugging Face
    cache: then checkpoints keep the teacher.

    Example:
        >>> teacher_source("vit_small_patch14_dinov2", pretrained=False, weights=None) is None
        True
        >>> teacher_source("vit_small_patch14_dinov2", pretrained=True, weights="/no/such/file.safetensors") is None
        True
    """
    source = weights_source(teacher, pretrained, weights)
    return source if source is not None and source.available() else None


def is_final_checkpoint(trainer: Any) -> bool:
    """Whether a checkpoint written now must hold the teacher: anything but a save in the middle of a fit.

    A save during a running fit is final at its last epoch (``current_epoch + 1 >= max_epochs``; Lightning
    counts the epoch as done only after the checkpoint callbacks' ``on_train_epoch_end``), when
    ``max_steps`` is reached, or when the trainer is stopping (``should_stop``: early stopping or
    ``max_time``, whose callbacks run before the checkpoint callbacks). Saves outside a running fit
    (``trainer.save_checkpoint`` after it, during a test) are final too.
    """
    if trainer is None or trainer.state.fn != TrainerFn.FITTING or trainer.state.status != TrainerStatus.RUNNING:
        return True
    if trainer.should_stop:
        return True
    max_epochs = trainer.max_epochs
    if max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs:
        return True
    max_steps = trainer.max_steps
    return max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps


def omit_teacher(
    checkpoint: dict[str, Any],
    source: TeacherSource,
    memo: DigestMemo | None = None,
    prefix: str = TEACHER_PREFIX,
) -> None:
    """Remove the teacher's tensors from ``checkpoint["state_dict"]``, recording their source and digest.

    Call it from ``on_save_checkpoint`` (the state dict is already filled) for checkpoints that need not
    hold the teacher (see :func:`is_final_checkpoint`). ``memo``, kept by the model (one per model),
    spares hashing the frozen teacher at every epoch.

    Example:
        >>> checkpoint = {"state_dict": {"model.teacher.backbone.w": torch.ones(2), "model.student.w": torch.ones(1)}}
        >>> omit_teacher(checkpoint, TeacherSource("vit_small_patch14_dinov2", "w.safetensors"))
        >>> list(checkpoint["state_dict"]), checkpoint[TEACHER_KEY]["keys"]
        (['model.student.w'], ['model.teacher.backbone.w'])
    """
    state = checkpoint["state_dict"]
    teacher = {key: state[key] for key in state if key.startswith(prefix)}
    if not teacher:
        return
    checkpoint[TEACHER_KEY] = {
        "omitted": True,
        "teacher": source.teacher,
        "weights": source.weights,
        "keys": list(teacher),
        "digest": (memo or DigestMemo())(teacher),
    }
    for key in teacher:
        del state[key]


def _failure(record: Mapping[str, Any], source: TeacherSource, reason: str) -> TeacherNotInCheckpointError:
    return TeacherNotInCheckpointError(
        f"This checkpoint was written during training without the weights of its frozen teacher "
        f"'{record['teacher']}', to be reloaded from {source.describe()}; {reason}.\n"
        "Ways out:\n"
        f"  1. make {source.describe()} available again (for a file moved elsewhere, pass its new path: "
        f"`teacher_weights=PATH` to `load_from_checkpoint`, `--model.teacher_weights PATH` on the anomalib CLI);\n"
        "  2. or use the checkpoint written at the end of the run (`weights/lightning/model.ckpt` of a finished "
        "fit), which holds the teacher and loads offline."
    )


def _record_problem(record: Any, prefix: str) -> str | None:
    """What is wrong with a teacher record (see :func:`omit_teacher`), or ``None`` if it is well formed."""
    if not isinstance(record, Mapping):
        return f"it is a {type(record).__name__}, not a mapping"
    fields = {"teacher": str, "keys": list, "digest": str}
    missing = [name for name in (*fields, "weights") if name not in record]
    if missing:
        return f"it lacks {missing}"
    wrong = [name for name, kind in fields.items() if not isinstance(record[name], kind)]
    if not isinstance(record["weights"], str | None):
        wrong.append("weights")
    if wrong:
        return f"{wrong} have the wrong type"
    if not record["teacher"] or not record["keys"]:
        return "its teacher or its list of keys is empty"
    if not all(isinstance(key, str) and key.startswith(prefix) for key in record["keys"]):
        return f"its keys are not all teacher tensors ('{prefix}...')"
    if len(record["digest"]) != SHA256_HEX_DIGITS or any(char not in "0123456789abcdef" for char in record["digest"]):
        return "its digest is not a SHA-256 in hex"
    return None


def _malformed(problem: str) -> TeacherNotInCheckpointError:
    return TeacherNotInCheckpointError(
        f"This checkpoint's record of the teacher it left out (checkpoint['{TEACHER_KEY}']) is malformed: "
        f"{problem}. The checkpoint was damaged or not written by TransformerStudent, so its teacher cannot be "
        "reloaded. Use the checkpoint written at the end of the run (`weights/lightning/model.ckpt` of a finished "
        "fit), which holds the teacher."
    )


def _resolved_name(name: str) -> str:
    """``architecture.tag`` with timm's default pretrained tag filled in (``name`` itself if timm has none)."""
    architecture, tag = split_model_name_tag(name)
    config = None if tag else get_pretrained_cfg(architecture)
    return f"{architecture}.{config.tag}" if config is not None and config.tag else name


def same_teacher(recorded: str, model: str, weights_file: bool) -> bool:
    """Whether a checkpoint's recorded teacher is the model's.

    The same architecture, and unless the weights come from a file, the same pretrained tag (a name without
    a tag means timm's default one).

    Example:
        >>> same_teacher("vit_small_patch14_dinov2.lvd142m", "vit_small_patch14_dinov2", weights_file=False)
        True
        >>> same_teacher("vit_giant_patch14_dinov2.lvd142m", "vit_small_patch14_dinov2", weights_file=True)
        False
    """
    if split_model_name_tag(recorded)[0] != split_model_name_tag(model)[0]:
        return False
    return weights_file or _resolved_name(recorded) == _resolved_name(model)


def restore_teacher(
    checkpoint: dict[str, Any],
    load: Callable[[TeacherSource], Mapping[str, torch.Tensor]],
    weights: str | None = None,
    prefix: str = TEACHER_PREFIX,
    teacher: str | None = None,
) -> None:
    """Put the teacher's tensors back into a checkpoint written without them, in place; nothing for others.

    Call it from ``on_load_checkpoint``, before Lightning's strict ``load_state_dict``. The record is checked
    first (well formed; its teacher the model's), then the weights are fetched, then their digest is
    compared with the recorded one, and only then do they enter the state dict: ``load`` must not put them
    into the model itself.

    Args:
        checkpoint: The loaded checkpoint.
        load: Fetches the weights from a source and returns the teacher's state (keys without ``prefix``) as
            the model's state dict would hold it, without loading it into the model.
        weights: The model's own ``teacher_weights``: when set, it replaces the recorded source (moved weights).
        prefix: Where the teacher's tensors sit in the state dict.
        teacher: The model's teacher (timm name): the recorded one must be the same (see :func:`same_teacher`),
            and the weights are fetched for this name. ``None`` trusts the recorded name.

    Raises:
        TeacherNotInCheckpointError: If the record is malformed or names another teacher than the model's,
            or the weights cannot be fetched, or differ from those the checkpoint was written with (digest),
            naming the teacher, its source and the ways out.
    """
    if TEACHER_KEY not in checkpoint:
        return
    record = checkpoint[TEACHER_KEY]
    if isinstance(record, Mapping) and not record.get("omitted"):
        return
    if (problem := _record_problem(record, prefix)) is not None:
        raise _malformed(problem)
    source = TeacherSource(record["teacher"], weights if weights is not None else record["weights"])
    if teacher is not None:
        if not same_teacher(record["teacher"], teacher, weights_file=source.weights is not None):
            raise _failure(
                record,
                source,
                f"that is not this model's teacher '{teacher}', so nothing was fetched. Load the checkpoint into a "
                f"model of its own teacher (`teacher='{record['teacher']}'`), or use one written for this model",
            )
        source = TeacherSource(teacher, source.weights)
    try:
        state = load(source)
    except Exception as error:  # a missing file, an unreadable one, an offline Hub: all end here
        raise _failure(record, source, f"they could not be loaded ({type(error).__name__}: {error})") from error
    restored = {prefix + key: value for key, value in state.items()}
    if sorted(restored) != sorted(record["keys"]) or state_digest(
        {key: restored[key] for key in record["keys"]}
    ) != record.get("digest"):
        raise _failure(record, source, "the weights found there differ from those it was trained with (SHA-256)")
    checkpoint["state_dict"].update(restored)
    del checkpoint[TEACHER_KEY]


__all__ = [
    "TEACHER_KEY",
    "TEACHER_PREFIX",
    "TeacherNotInCheckpointError",
    "TeacherSource",
    "is_final_checkpoint",
    "omit_teacher",
    "restore_teacher",
    "same_teacher",
    "state_digest",
    "teacher_source",
]
