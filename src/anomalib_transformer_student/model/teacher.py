"""The frozen teacher: a timm Vision Transformer that returns patch tokens at two depths."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import timm
import torch
from timm.layers import PatchEmbed, resample_abs_pos_embed
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)

DEFAULT_TEACHER = "vit_base_patch14_reg4_dinov2.lvd142m"
# The paper's blocks of its 12-block ViT-B: what ``default_layers(12)`` gives.
DEFAULT_LAYERS = (7, 11)
# The timm classes whose patch tokens the teacher knows how to take: plain ViTs with absolute position
# embeddings (DINO, DINOv2, AugReg, DeiT, SigLIP, CLIP, ...) and Eva (EVA02, DINOv3) with rotary ones.
TEACHER_CLASSES: tuple[type[nn.Module], ...] = (VisionTransformer, Eva)
SUPPORTED_FAMILIES = (
    "DINOv3 (e.g. 'vit_base_patch16_dinov3.lvd1689m', 'vit_large_patch16_dinov3_qkvb'), "
    "DINOv2 (e.g. 'vit_base_patch14_reg4_dinov2.lvd142m', 'vit_small_patch14_dinov2'), "
    "DINO (e.g. 'vit_small_patch16_224.dino'), EVA02 (e.g. 'eva02_base_patch14_224.mim_in22k') "
    "and timm's other plain ViTs (AugReg 'vit_base_patch16_224', DeiT, SigLIP, CLIP)"
)

PosEmbedInterpolation = Literal["dinov2_registers", "dinov2", "dino", "timm"]
# (offset, antialias) of the authors' code: facebookresearch/dinov2 `dinov2/hub/backbones.py` builds the
# registers models with interpolate_offset=0.0, interpolate_antialias=True, the others with the defaults of
# `DinoVisionTransformer` (0.1, False); facebookresearch/dino adds 0.1 and never antialiases.
OFFICIAL_INTERPOLATION: dict[str, tuple[float, bool]] = {
    "dinov2_registers": (0.0, True),
    "dinov2": (0.1, False),
    "dino": (0.1, False),
}


def unsupported_teacher_message(name: str, reason: str) -> str:
    """The error text for a timm model that cannot serve as the teacher, with the families that can."""
    return (
        f"Teacher '{name}' cannot serve as the teacher: {reason}. A teacher is a timm Vision Transformer with "
        f"patch tokens whose blocks can be taken one by one: {SUPPORTED_FAMILIES}."
    )


def teacher_refusal(backbone: nn.Module) -> str | None:
    """Why the timm model ``backbone`` cannot serve as the teacher, or ``None`` if it can.

    Reads only the model's structure, so ``backbone`` may live on the meta device.

    Example:
        >>> teacher_refusal(timm.create_model("vit_small_patch16_dinov3", device="meta"))
        >>> teacher_refusal(timm.create_model("resnet18", device="meta"))
        'timm builds it as a ResNet, not as a Vision Transformer with patch tokens'
    """
    if not isinstance(backbone, TEACHER_CLASSES):
        return f"timm builds it as a {type(backbone).__name__}, not as a Vision Transformer with patch tokens"
    missing = [name for name in ("blocks", "norm", "forward_intermediates") if not hasattr(backbone, name)]
    if missing:
        return f"its intermediate blocks cannot be taken (it lacks {missing})"
    if not isinstance(backbone.patch_embed, PatchEmbed):
        return f"its patch embedding is a {type(backbone.patch_embed).__name__}, not a plain patch projection"
    rope = getattr(backbone, "rope", None)
    if rope is not None and not hasattr(rope, "update_feat_shape"):
        return f"its rotary position embedding ({type(rope).__name__}) cannot be fixed to the input's patch grid"
    return None


def create_backbone(name: str) -> nn.Module:
    """Build the timm Vision Transformer ``name`` with random weights, no classifier head and a fixed input size.

    Weights are loaded separately (see :mod:`anomalib_transformer_student.training.teacher_weights`), so
    that building a model never touches the network. The model is built with ``dynamic_img_size=False``
    (DINOv3 defaults to dynamic sizes): :class:`TeacherFeatureExtractor` sets its input grid once.

    Raises:
        ValueError: If timm does not know ``name``, or the model cannot serve as the teacher (not a ViT
            with patch tokens, or its blocks cannot be taken); the message names the supported families.

    Example:
        >>> create_backbone("resnet18")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ValueError: Teacher 'resnet18' cannot serve as the teacher: timm builds it as a ResNet, ...
    """
    architecture, _ = timm.models.split_model_name_tag(name)
    if not timm.is_model(architecture):
        msg = (
            f"Unknown teacher '{name}'. Valid names are timm Vision Transformers, e.g. {SUPPORTED_FAMILIES}; "
            "list them with `python -c \"import timm; print(timm.list_models('*vit*', pretrained=True))\"`."
        )
        raise ValueError(msg)
    # The structure decides; on the meta device building costs next to nothing, whatever the model's size.
    reason = teacher_refusal(timm.create_model(name, pretrained=False, num_classes=0, device="meta"))
    if reason is not None:
        raise ValueError(unsupported_teacher_message(name, reason))
    return timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=False)


def default_layers(depth: int) -> tuple[int, int]:
    """The paper's choice of blocks carried to any depth: the block at two thirds of the depth, and the last.

    For the paper's 12-block ViT-B that is blocks 7 and 11 (0-based); for 24 blocks, 15 and 23.

    Raises:
        ValueError: If the teacher has fewer than two blocks.

    Example:
        >>> default_layers(12), default_layers(24), default_layers(32), default_layers(40)
        ((7, 11), (15, 23), (20, 31), (26, 39))
    """
    if depth < 2:
        msg = f"A teacher needs at least two blocks to take two depths from; this one has {depth}."
        raise ValueError(msg)
    return max(0, round(2 * depth / 3) - 1), depth - 1


def resolve_layers(layers: Sequence[int] | None, depth: int) -> tuple[int, int]:
    """``layers`` as two non-negative block indices of a ``depth``-block teacher; ``None`` gives :func:`default_layers`.

    Explicit layers always win over the default.

    Raises:
        ValueError: As :func:`normalise_layers` for explicit layers.

    Example:
        >>> resolve_layers(None, 24), resolve_layers((7, -1), 24)
        ((15, 23), (7, 23))
    """
    return default_layers(depth) if layers is None else normalise_layers(layers, depth)


def pos_embed_interpolation(backbone: nn.Module) -> PosEmbedInterpolation:
    """How the authors of ``backbone``'s weights interpolate its positional embedding, read from timm's config.

    timm records the architecture and weight tag of every model it builds in ``backbone.pretrained_cfg``
    (also with ``pretrained=False``): DINOv2 architectures end in ``_dinov2`` (with registers when the model
    has register tokens), DINO v1 weights carry the tag ``dino``. Anything else is resampled as timm does.

    Example:
        >>> pos_embed_interpolation(timm.create_model("vit_small_patch14_reg4_dinov2", device="meta"))
        'dinov2_registers'
        >>> pos_embed_interpolation(timm.create_model("vit_small_patch16_224.dino", device="meta"))
        'dino'
    """
    config = getattr(backbone, "pretrained_cfg", None) or {}
    if str(config.get("architecture", "")).endswith("_dinov2"):
        return "dinov2_registers" if getattr(backbone, "num_reg_tokens", 0) else "dinov2"
    if config.get("tag") == "dino":
        return "dino"
    return "timm"


def official_interpolate_pos_encoding(
    patch_pos_embed: torch.Tensor, grid: tuple[int, int], offset: float, antialias: bool
) -> torch.Tensor:
    """Resample the square grid of patch position embeddings ``(1, M * M, D)`` to ``grid`` (rows, columns).

    A transcription of ``interpolate_pos_encoding`` of the official DINOv2 model (facebookresearch/dinov2,
    ``dinov2/models/vision_transformer.py``), which with ``offset=0.1, antialias=False`` is also that of DINO v1
    (facebookresearch/dino, ``vision_transformer.py``): bicubic in float32, with
    ``scale_factor=((rows + offset) / M, (columns + offset) / M)`` when ``offset`` is set, ``size=grid``
    otherwise. The native grid is returned unchanged, as the official code does.
    """
    side = math.isqrt(patch_pos_embed.shape[1])
    if tuple(grid) == (side, side):
        return patch_pos_embed
    if offset:
        resize = {"scale_factor": ((grid[0] + offset) / side, (grid[1] + offset) / side)}
    else:
        resize = {"size": tuple(grid)}
    square = patch_pos_embed.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    resampled = F.interpolate(square, mode="bicubic", antialias=antialias, **resize)
    return resampled.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(patch_pos_embed.dtype)


def resample_patch_pos_embed(
    patch_pos_embed: torch.Tensor, grid: tuple[int, int], interpolation: PosEmbedInterpolation
) -> torch.Tensor:
    """Resample a square grid of patch position embeddings ``(1, M * M, D)`` to ``grid`` as ``interpolation`` says.

    DINO and DINOv2 follow :func:`official_interpolate_pos_encoding`; ``"timm"`` keeps timm's own resampling
    (:func:`timm.layers.resample_abs_pos_embed` with its defaults, as ``set_input_size`` uses it).
    """
    if interpolation == "timm":
        side = math.isqrt(patch_pos_embed.shape[1])
        return resample_abs_pos_embed(patch_pos_embed, new_size=list(grid), old_size=[side, side], num_prefix_tokens=0)
    offset, antialias = OFFICIAL_INTERPOLATION[interpolation]
    return official_interpolate_pos_encoding(patch_pos_embed, grid, offset, antialias)


def normalise_layers(layers: Sequence[int], depth: int) -> tuple[int, int]:
    """Validate two block indices against the teacher's depth; negative indices count from the end.

    Raises:
        ValueError: If there are not exactly two indices, one is out of range, or both are equal.
    """
    valid = f"valid indices are 0..{depth - 1} (or -{depth}..-1 from the end) for a teacher with {depth} blocks"
    if len(layers) != 2:
        msg = f"layers must be exactly two block indices (shallow, deep), got {list(layers)}; {valid}."
        raise ValueError(msg)
    normalised = []
    for layer in layers:
        if not -depth <= int(layer) < depth:
            msg = f"Layer index {layer} is out of range: {valid}."
            raise ValueError(msg)
        normalised.append(int(layer) % depth)
    if normalised[0] == normalised[1]:
        msg = f"layers must name two different blocks, got {list(layers)} (both block {normalised[0]}); {valid}."
        raise ValueError(msg)
    return normalised[0], normalised[1]


def check_image_size(image_size: int, patch_size: int) -> None:
    """Raise a ``ValueError`` naming the nearest valid sizes unless ``image_size`` is a multiple of the patch."""
    if image_size < patch_size or image_size % patch_size:
        lower = max(patch_size, image_size // patch_size * patch_size)
        upper = lower + patch_size if image_size >= patch_size else patch_size
        msg = (
            f"image_size {image_size} must be a positive multiple of the teacher's patch size {patch_size}; "
            f"use {lower} or {upper} instead."
        )
        raise ValueError(msg)


class TeacherFeatureExtractor(nn.Module):
    """Frozen ViT returning the normalised patch tokens of two blocks at a fixed square input size.

    At construction the positional embedding is resampled once to the ``image_size`` grid, the way
    the authors of the weights interpolate it in every forward (see :func:`pos_embed_interpolation`:
    DINOv2 with registers bicubic with antialiasing, DINOv2 without registers and DINO bicubic with
    a 0.1 offset, other ViTs as timm resamples); a rotary position embedding (DINOv3, EVA02) is
    computed once for the ``image_size`` grid, as timm computes it for an input of that size (for
    DINOv3 also as the official code does, in every forward). Blocks deeper than the deepest
    requested layer are removed and the head is dropped, so that inference and export run only
    what is needed and the graph has static shapes and no interpolation.

    Args:
        backbone: A timm Vision Transformer built with a fixed input size (see :func:`create_backbone`).
        layers: Two block indices ``(shallow, deep)``; negative indices count from the end. ``None``
            takes :func:`default_layers` of the backbone's depth, e.g. ``(7, 11)`` for 12 blocks.
        image_size: Side of the square input; a multiple of the patch size.

    Raises:
        ValueError: If the backbone cannot serve as the teacher, or ``layers`` or ``image_size`` do not fit it.

    Example:
        >>> teacher = TeacherFeatureExtractor(create_backbone("vit_small_patch14_dinov2"), (7, 11), 224)
        >>> shallow, deep = teacher(torch.randn(1, 3, 224, 224))
        >>> shallow.shape
        torch.Size([1, 256, 384])
        >>> teacher = TeacherFeatureExtractor(create_backbone("vit_small_patch16_dinov3"), None, 64)
        >>> teacher.layers, teacher.grid_size, teacher(torch.randn(1, 3, 64, 64))[1].shape
        ((7, 11), (4, 4), torch.Size([1, 16, 384]))
    """

    def __init__(self, backbone: nn.Module, layers: Sequence[int] | None, image_size: int) -> None:
        super().__init__()
        name = str((getattr(backbone, "pretrained_cfg", None) or {}).get("architecture", type(backbone).__name__))
        reason = teacher_refusal(backbone)
        if reason is None and getattr(backbone, "dynamic_img_size", False):
            reason = "it was built with dynamic_img_size=True; build it with `create_backbone(name)`"
        if reason is not None:
            raise ValueError(unsupported_teacher_message(name, reason))
        self.depth = len(backbone.blocks)
        self.layers = resolve_layers(layers, self.depth)
        self.patch_size = int(backbone.patch_embed.patch_size[0])
        check_image_size(image_size, self.patch_size)
        self.image_size = int(image_size)
        self.grid_size = (image_size // self.patch_size, image_size // self.patch_size)
        self.embed_dim = int(backbone.num_features)
        self.num_prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 1))
        # Prefix tokens (class, registers) with a row of their own in pos_embed keep it unchanged.
        self._pos_embed_prefix = 0 if getattr(backbone, "no_embed_class", False) else self.num_prefix_tokens
        self.pos_embed_interpolation = pos_embed_interpolation(backbone)

        try:
            backbone.prune_intermediate_layers(indices=list(self.layers), prune_norm=False, prune_head=True)
            backbone.patch_embed.set_input_size(img_size=(image_size, image_size))
            if backbone.pos_embed is not None:
                backbone.pos_embed = nn.Parameter(self._resample_pos_embed(backbone.pos_embed.data))
            if getattr(backbone, "rope", None) is not None:
                backbone.rope.update_feat_shape(list(self.grid_size))
        except (AssertionError, AttributeError, RuntimeError, TypeError) as error:  # timm asserts its assumptions
            reason = f"timm could not set its input to {image_size} px ({type(error).__name__}: {error})"
            raise ValueError(unsupported_teacher_message(name, reason)) from error
        self.backbone = backbone.eval().requires_grad_(False)
        # Saved with the weights, so a checkpoint knows its teacher needs no fetching.
        self.register_buffer("weights_loaded", torch.tensor(False))

    def _resample_pos_embed(self, pos_embed: torch.Tensor) -> torch.Tensor:
        prefix, patches = pos_embed[:, : self._pos_embed_prefix], pos_embed[:, self._pos_embed_prefix :]
        resampled = resample_patch_pos_embed(patches, self.grid_size, self.pos_embed_interpolation)
        return torch.cat([prefix, resampled], dim=1)

    def load_backbone_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load weights saved for the full backbone at its native input size.

        The positional embedding is resampled to this teacher's grid, and weights of removed
        blocks and of the classifier head are ignored.

        Raises:
            ValueError: If keys the teacher needs are missing or unknown keys remain, listing a few.
        """
        own_keys = set(self.backbone.state_dict())
        adapted: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            if key.startswith("head.") or key.startswith("fc_norm."):
                continue
            if key.startswith("blocks.") and int(key.split(".")[1]) >= len(self.backbone.blocks):
                continue
            adapted[key] = value
        if "pos_embed" in adapted and adapted["pos_embed"].shape != self.backbone.pos_embed.shape:
            adapted["pos_embed"] = self._resample_pos_embed(adapted["pos_embed"])
        missing = sorted(own_keys - set(adapted))
        unexpected = sorted(set(adapted) - own_keys)
        if missing or unexpected:
            msg = (
                f"Teacher weights do not fit the architecture: {len(missing)} missing keys "
                f"(e.g. {missing[:5]}) and {len(unexpected)} unexpected keys (e.g. {unexpected[:5]}). "
                "Check that the weights belong to the chosen `teacher` architecture."
            )
            raise ValueError(msg)
        self.backbone.load_state_dict(adapted, strict=True)
        self.weights_loaded.fill_(True)

    def train(self, mode: bool = True) -> TeacherFeatureExtractor:
        """Keep the backbone in eval mode whatever the parent does (it has no trainable state)."""
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the final-norm patch tokens ``(B, N, D)`` of the shallow and the deep block."""
        # timm returns intermediates in block order, whatever the order of the indices.
        first, second = self.backbone.forward_intermediates(
            images,
            indices=sorted(self.layers),
            norm=True,
            output_fmt="NLC",
            intermediates_only=True,
        )
        return (first, second) if self.layers[0] < self.layers[1] else (second, first)


def build_teacher(
    name: str, layers: Sequence[int] | None, image_size: int, pretrained: bool
) -> TeacherFeatureExtractor:
    """The teacher ``name`` at ``image_size`` with random weights, its pretrained ones loaded when a stage starts.

    With ``pretrained=False`` the random weights count as loaded (nothing is fetched), with one warning.

    Example:
        >>> build_teacher("vit_small_patch14_dinov2", (7, 11), 56, pretrained=False).grid_size
        (4, 4)
    """
    teacher = TeacherFeatureExtractor(create_backbone(name), layers, image_size)
    if not pretrained:
        logger.warning(
            "Teacher '%s' keeps random weights (pretrained=False): fine for tests, meaningless for inspection.", name
        )
        teacher.weights_loaded.fill_(True)
    return teacher
