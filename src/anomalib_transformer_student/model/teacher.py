"""The frozen teacher: a timm Vision Transformer that returns patch tokens at two depths."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_TEACHER = "vit_base_patch14_reg4_dinov2.lvd142m"
DEFAULT_LAYERS = (7, 11)


def create_backbone(name: str) -> nn.Module:
    """Build the timm Vision Transformer ``name`` with random weights and no classifier head.

    Weights are loaded separately (see :mod:`anomalib_transformer_student.training.teacher_weights`), so
    that building a model never touches the network.

    Raises:
        ValueError: If timm does not know ``name`` or the model is not a ViT with patch tokens.
    """
    architecture, _ = timm.models.split_model_name_tag(name)
    if not timm.is_model(architecture):
        msg = (
            f"Unknown teacher '{name}'. Valid names are timm Vision Transformers; list them with "
            "`python -c \"import timm; print(timm.list_models('*vit*', pretrained=True))\"`."
        )
        raise ValueError(msg)
    backbone = timm.create_model(name, pretrained=False, num_classes=0)
    required = ("patch_embed", "blocks", "norm", "forward_intermediates")
    missing = [attribute for attribute in required if not hasattr(backbone, attribute)]
    if missing:
        msg = (
            f"Teacher '{name}' is not a Vision Transformer with intermediate blocks (it lacks {missing}). "
            "Choose a timm ViT such as 'vit_base_patch14_reg4_dinov2.lvd142m' or 'vit_small_patch16_224.dino'."
        )
        raise ValueError(msg)
    return backbone


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

    At construction the positional embedding is resampled once to the ``image_size`` grid
    (bicubic, without antialiasing, as DINOv2's own interpolation does), blocks deeper than the
    deepest requested layer are removed and the head is dropped, so that inference and export
    run only what is needed and the graph has static shapes.

    Args:
        backbone: A timm Vision Transformer (see :func:`create_backbone`).
        layers: Two block indices ``(shallow, deep)``; negative indices count from the end.
        image_size: Side of the square input; a multiple of the patch size.

    Example:
        >>> teacher = TeacherFeatureExtractor(create_backbone("vit_small_patch14_dinov2"), (7, 11), 224)
        >>> shallow, deep = teacher(torch.randn(1, 3, 224, 224))
        >>> shallow.shape
        torch.Size([1, 256, 384])
    """

    def __init__(self, backbone: nn.Module, layers: Sequence[int], image_size: int) -> None:
        super().__init__()
        self.depth = len(backbone.blocks)
        self.layers = normalise_layers(layers, self.depth)
        self.patch_size = int(backbone.patch_embed.patch_size[0])
        check_image_size(image_size, self.patch_size)
        self.image_size = int(image_size)
        self.grid_size = (image_size // self.patch_size, image_size // self.patch_size)
        self.embed_dim = int(backbone.num_features)
        self.num_prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 1))

        backbone.prune_intermediate_layers(indices=list(self.layers), prune_norm=False, prune_head=True)
        self._native_grid = tuple(backbone.patch_embed.grid_size)
        backbone.patch_embed.set_input_size(img_size=(image_size, image_size))
        backbone.dynamic_img_size = False
        if backbone.pos_embed is not None:
            backbone.pos_embed = nn.Parameter(self._resample_pos_embed(backbone, backbone.pos_embed.data))
        self.backbone = backbone.eval().requires_grad_(False)
        # Saved with the weights, so a checkpoint knows its teacher needs no fetching.
        self.register_buffer("weights_loaded", torch.tensor(False))

    def _resample_pos_embed(self, backbone: nn.Module, pos_embed: torch.Tensor) -> torch.Tensor:
        prefix = 0 if getattr(backbone, "no_embed_class", False) else self.num_prefix_tokens
        grid_tokens = pos_embed.shape[1] - prefix
        native_side = round(grid_tokens**0.5)
        return resample_abs_pos_embed(
            pos_embed,
            new_size=list(self.grid_size),
            old_size=[native_side, native_side],
            num_prefix_tokens=prefix,
            interpolation="bicubic",
            antialias=False,
        )

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
            adapted["pos_embed"] = self._resample_pos_embed(self.backbone, adapted["pos_embed"])
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
