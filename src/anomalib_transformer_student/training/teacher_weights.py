"""Where the teacher's weights come from: the Hugging Face Hub (through timm) or a local file.

Sources:

- timm's pretrained weights, from the local Hugging Face cache or the Hub (the default);
- a local file in timm's layout (``.safetensors``, ``.pth``, ``.pt``, ``.bin``);
- a local file in the official DINOv2 torch.hub layout (``dinov2_vitb14_reg4_pretrain.pth``) or
  DINOv3 layout (``dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth``), converted to timm's layout on
  load by timm's own ``checkpoint_filter_fn`` of the model's family.

Fetching is kept apart from building the model so that constructing a ``TransformerStudent``
never touches the network or the disk: weights are loaded when training starts, and a
checkpoint that already holds them loads nothing.

:func:`weights_source` is the one place that decides, from the model's settings, where the weights
come from (a :class:`TeacherSource`, or ``None`` for random weights); everything that loads, reloads,
records or names the weights asks it.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from torch import nn

logger = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT_S = 3.0


class TeacherWeightsUnavailableError(RuntimeError):
    """The teacher's pretrained weights could not be had (offline, not cached, or not found)."""


class TeacherWeightsMismatchError(ValueError):
    """A weights file holds tensors of another architecture than the teacher's (another size, patch or width)."""


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the Hugging Face endpoint opens within ``timeout`` seconds.

    Name resolution can block far longer than a socket timeout, so the probe runs in a daemon
    thread and is abandoned when the time is up.
    """
    url = urlparse(_hub_endpoint())
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    outcome: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(True)
        except OSError:
            outcome.append(False)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(outcome and outcome[0])


def _hub_file(name: str) -> tuple[str, str] | None:
    """The Hugging Face repository and file timm would download for ``name``, if it uses the Hub."""
    config = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    if config is None or not config.hf_hub_id:
        return None
    return config.hf_hub_id, config.hf_hub_filename or "model.safetensors"


def is_cached(name: str) -> bool:
    """Whether the pretrained weights of ``name`` are already in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    hub_file = _hub_file(name)
    if hub_file is None:
        return False
    repo_id, filename = hub_file
    candidates = [filename, "model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(repo_id, candidate), str) for candidate in candidates)


def _offline_mode() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def unavailable_message(name: str, reason: str) -> str:
    """The error text for weights that cannot be fetched, with the ways out."""
    return (
        f"Could not fetch the pretrained weights of teacher '{name}': {reason}.\n"
        "Ways out:\n"
        "  1. Point `teacher_weights` to a local copy of the weights file (`--model.teacher_weights FILE`; timm's "
        "or the official DINOv2/DINOv3 layout, see docs/how-to/offline.md);\n"
        "  2. or, on a machine with internet, download them once (e.g. "
        f"`python -c \"import timm; timm.create_model('{name}', pretrained=True)\"`), copy the Hugging Face "
        "cache (~/.cache/huggingface) to this machine and set HF_HUB_OFFLINE=1;\n"
        "  3. or train without pretrained weights (`pretrained=False`, only for tests and experiments)."
    )


def fetch_pretrained_state_dict(name: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> dict[str, torch.Tensor]:
    """The pretrained weights of timm model ``name``, from the local cache or the Hub.

    Decides within about ``timeout`` seconds when the Hub is unreachable instead of waiting on
    retries.

    Raises:
        TeacherWeightsUnavailableError: If the weights are neither cached nor downloadable.
    """
    if not is_cached(name):
        if _offline_mode():
            raise TeacherWeightsUnavailableError(
                unavailable_message(name, "HF_HUB_OFFLINE is set and they are not in the local cache")
            )
        if _hub_file(name) is not None and not hub_reachable(timeout):
            raise TeacherWeightsUnavailableError(
                unavailable_message(name, f"{_hub_endpoint()} is unreachable and they are not cached")
            )
    logger.info("Loading pretrained weights of teacher '%s'.", name)
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as error:  # timm and huggingface_hub raise many kinds here
        reason = f"{type(error).__name__}: {error}"
        if "gated" in reason.lower() or " 401 " in f" {reason} " or " 403 " in f" {reason} ":
            reason += (
                " (a gated repository: accept its license on the model's Hugging Face page, then log in with "
                "`hf auth login` or set HF_TOKEN)"
            )
        raise TeacherWeightsUnavailableError(unavailable_message(name, reason)) from error
    return model.state_dict()


def pretrained_weights_available(name: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether :func:`fetch_pretrained_state_dict` can be expected to succeed (cached or Hub reachable)."""
    if is_cached(name):
        return True
    return not _offline_mode() and hub_reachable(timeout)


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file in the layout it was saved in, with timm's reader.

    timm reads safetensors and torch files, unwraps ``state_dict``/``model`` entries and removes
    ``module.`` prefixes; :func:`to_timm_layout` converts the result.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file cannot be read as a state dict of tensors.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        msg = f"Teacher weights file not found: '{path}'. Check `teacher_weights` (absolute paths are safest)."
        raise FileNotFoundError(msg)
    try:
        state_dict = timm.models.load_state_dict(str(path))
    except Exception as error:  # torch and safetensors raise many kinds for a bad file
        msg = f"Could not read teacher weights from '{path}': {type(error).__name__}: {error}"
        raise ValueError(msg) from error
    if not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        msg = f"'{path}' does not hold a flat state dict of tensors; save `model.state_dict()` to it."
        raise ValueError(msg)
    return state_dict


def _checkpoint_filter(model: nn.Module) -> Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]:
    """The ``checkpoint_filter_fn`` of the timm module that defines ``model``'s class (identity without one)."""
    module = sys.modules.get(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", lambda state_dict, _model: state_dict)


def is_official_dinov3(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether ``state_dict`` is in the layout of the official DINOv3 files (as timm tells them apart)."""
    return "storage_tokens" in state_dict


def mask_official_qkv_bias(state_dict: dict[str, torch.Tensor], model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Apply the official DINOv3 key-bias mask to the query-key-value biases, before timm's conversion.

    The official attention (``LinearKMaskedBias`` of facebookresearch/dinov3) multiplies ``qkv.bias`` by the
    buffer ``qkv.bias_mask`` in every forward (ones for queries and values, zeros for keys); timm's
    conversion keeps the query and value thirds of the bias as they are stored. Masked here, the converted
    biases are those the official forward applies, whatever the file's mask holds. Architectures without
    query-value biases (timm's names without ``_qkvb``) take only files whose masked biases are zero.

    Raises:
        ValueError: If the file holds non-zero biases that the architecture ``name`` has no place for.
    """
    has_bias = any(key.endswith("attn.q_bias") for key, _ in model.named_parameters())
    converted = dict(state_dict)
    for key in [key for key in state_dict if key.endswith(".attn.qkv.bias")]:
        bias = converted.pop(key)
        mask = converted.pop(f"{key}_mask", None)
        if mask is not None:
            bias = bias * mask.to(bias.dtype)
        if has_bias:
            converted[key] = bias
        elif torch.count_nonzero(bias):
            architecture, _ = timm.models.split_model_name_tag(name)
            msg = (
                f"The DINOv3 file holds non-zero query/value biases ({key}), which teacher '{name}' has no "
                f"place for: choose '{architecture}_qkvb' (the same network with those biases)."
            )
            raise ValueError(msg)
    return converted


def _shape_differences(state_dict: dict[str, torch.Tensor], model: nn.Module) -> list[str]:
    """``key: file (shape), teacher (shape)`` for each tensor both hold with different shapes."""
    expected = model.state_dict()
    return [
        f"{key}: file {tuple(tensor.shape)}, teacher {tuple(expected[key].shape)}"
        for key, tensor in state_dict.items()
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape)
    ]


def _mismatch(source: str, name: str, differences: list[str], detail: str = "") -> TeacherWeightsMismatchError:
    shown = "; ".join(differences[:3]) + (f"; and {len(differences) - 3} more" if len(differences) > 3 else "")
    found = f"{len(differences)} tensors differ in shape ({shown})" if differences else detail
    return TeacherWeightsMismatchError(
        f"{source} does not fit teacher '{name}': {found}. Give the file made for '{name}', or set `teacher` to the "
        "model the file was made for (e.g. `--model.teacher vit_small_patch14_dinov2` for a ViT-S/14 file)."
    )


def to_timm_layout(
    state_dict: dict[str, torch.Tensor], name: str, source: str = "The weights"
) -> dict[str, torch.Tensor]:
    """Convert ``state_dict`` to the layout of timm model ``name`` with timm's own checkpoint filter.

    The ``checkpoint_filter_fn`` of the model's timm family converts the layouts timm knows and leaves
    timm's own layout at the native input size as it is. Among them:

    - official DINOv2 torch.hub files (``dinov2_vitb14_reg4_pretrain.pth``, ViT family): mask token dropped,
      ``register_tokens`` -> ``reg_token``, the class token's position folded into ``cls_token``, SwiGLU
      ``w12``/``w3`` -> ``fc1``/``fc2``;
    - official DINOv3 files (``dinov3_vitb16_pretrain_lvd1689m-*.pth``, Eva family): ``storage_tokens`` ->
      ``reg_token``, ``ls1``/``ls2.gamma`` -> ``gamma_1``/``gamma_2``, ``qkv.bias`` split into ``q_bias`` and
      ``v_bias`` (the key bias, masked to zero, dropped), SwiGLU ``w1``/``w2``/``w3`` -> ``fc1_g``/``fc1_x``/
      ``fc2``, mask token and ``rope_embed.periods`` dropped. The key-bias mask is applied first
      (:func:`mask_official_qkv_bias`). The rotary periods are recomputed in float32 as timm (and Hugging
      Face transformers) compute them; the official files hold them rounded to bfloat16.

    It reads only the shapes of the model, so the model is built on the meta device.

    Raises:
        ValueError: If an official DINOv3 file holds biases the architecture has no place for.
        TeacherWeightsMismatchError: If tensors of the weights do not fit the architecture (``source`` names them).
    """
    native = timm.create_model(name, pretrained=False, num_classes=0, device="meta")
    if is_official_dinov3(state_dict):
        state_dict = mask_official_qkv_bias(state_dict, native, name)
    try:
        converted = _checkpoint_filter(native)(state_dict, native)
    except (RuntimeError, ValueError, KeyError, IndexError) as error:  # timm's resampling of another model's grid
        raise _mismatch(
            source, name, _shape_differences(state_dict, native), f"{type(error).__name__}: {error}"
        ) from error
    differences = _shape_differences(converted, native)
    if differences:
        raise _mismatch(source, name, differences)
    return converted


def teacher_state_dict(name: str, weights: str | None) -> dict[str, torch.Tensor]:
    """The teacher's weights in timm's layout: from the file ``weights``, or timm's pretrained ones when ``None``."""
    if weights is None:
        return fetch_pretrained_state_dict(name)
    logger.info("Loading teacher weights from '%s'.", weights)
    return to_timm_layout(read_weights_file(weights), name, f"The weights file '{weights}'")


@dataclass(frozen=True)
class TeacherSource:
    """Where the teacher's weights come from: the local file ``weights``, or timm's pretrained ones if ``None``.

    Example:
        >>> TeacherSource("vit_small_patch14_dinov2", "/data/dinov2.safetensors").describe()
        "the weights file '/data/dinov2.safetensors'"
        >>> TeacherSource("vit_small_patch14_dinov2.lvd142m", None).describe()
        "timm's pretrained weights of 'vit_small_patch14_dinov2.lvd142m' (Hugging Face cache or Hub)"
    """

    teacher: str
    weights: str | None = None

    @property
    def name(self) -> str:
        """The file's path, or the timm name whose pretrained weights are meant (for short messages)."""
        return self.teacher if self.weights is None else self.weights

    def describe(self) -> str:
        """The source in words, for messages."""
        if self.weights is not None:
            return f"the weights file '{self.weights}'"
        return f"timm's pretrained weights of '{self.teacher}' (Hugging Face cache or Hub)"

    def available(self) -> bool:
        """Whether the weights can be had without the network: the file exists, or timm's are in the local cache."""
        if self.weights is not None:
            return Path(self.weights).expanduser().is_file()
        return is_cached(self.teacher)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights in timm's layout (see :func:`teacher_state_dict`)."""
        return teacher_state_dict(self.teacher, self.weights)


def weights_source(teacher: str, pretrained: bool, weights: str | Path | None) -> TeacherSource | None:
    """Where the weights of ``teacher`` come from: the local file ``weights``, timm's (Hub), or ``None`` (random).

    Raises:
        ValueError: If a ``weights`` file is given with ``pretrained=False``.

    Example:
        >>> weights_source("vit_small_patch14_dinov2", pretrained=True, weights=None)
        TeacherSource(teacher='vit_small_patch14_dinov2', weights=None)
        >>> weights_source("vit_small_patch14_dinov2", pretrained=False, weights=None) is None
        True
    """
    if weights is not None and not pretrained:
        msg = f"teacher_weights='{weights}' conflicts with pretrained=False; drop one of them."
        raise ValueError(msg)
    if not pretrained:
        return None
    return TeacherSource(teacher, None if weights is None else str(weights))
