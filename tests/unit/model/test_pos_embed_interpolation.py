"""The teacher's positional embedding against transcriptions of the official DINOv2 and DINO code, and timm's own.

The references are written out here from the authors' sources, independently of the package:
``interpolate_pos_encoding`` and ``prepare_tokens_with_masks`` of facebookresearch/dinov2
(``dinov2/models/vision_transformer.py``, flags from ``dinov2/hub/backbones.py``), and
``interpolate_pos_encoding`` of facebookresearch/dino (``vision_transformer.py``).
"""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models import vision_transformer
from torch.nn import functional as F

from anomalib_transformer_student.model.teacher import TeacherFeatureExtractor, create_backbone, pos_embed_interpolation
from anomalib_transformer_student.training.teacher_weights import teacher_state_dict

from .test_teacher_sources import official_layout

PATCH = 14
LAYERS = (7, 11)
# Model name -> whether it has registers. dinov2/hub/backbones.py builds the `*_reg` models with
# interpolate_antialias=True, interpolate_offset=0.0; the others keep DinoVisionTransformer's 0.1 and False.
DINOV2_MODELS = {"vit_small_patch14_reg4_dinov2": True, "vit_small_patch14_dinov2": False}
OFFICIAL_FLAGS = {True: {"offset": 0.0, "antialias": True}, False: {"offset": 0.1, "antialias": False}}
SIZES = (224, 448, 1036)


def dinov2_interpolate_pos_encoding(
    pos_embed: torch.Tensor, height: int, width: int, offset: float, antialias: bool
) -> torch.Tensor:
    """DinoVisionTransformer.interpolate_pos_encoding, with ``x.shape[1] - 1`` written as the patch count.

    The official code unpacks ``B, nc, w, h = x.shape``: its ``w`` is the image height, its ``h`` the width.
    """
    w, h = height, width
    npatch = (w // PATCH) * (h // PATCH)
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    pos_embed = pos_embed.float()
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0 = w // PATCH
    h0 = h // PATCH
    M = int(math.sqrt(N))
    assert N == M * M
    kwargs = {}
    if offset:
        sx = float(w0 + offset) / M
        sy = float(h0 + offset) / M
        kwargs["scale_factor"] = (sx, sy)
    else:
        kwargs["size"] = (w0, h0)
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2), mode="bicubic", antialias=antialias, **kwargs
    )
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def dino_interpolate_pos_encoding(pos_embed: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """facebookresearch/dino VisionTransformer.interpolate_pos_encoding (its ``w`` is the image height)."""
    w, h = height, width
    npatch = (w // patch) * (h // patch)
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0 = w // patch
    h0 = h // patch
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode="bicubic",
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def official_tokens(
    official: dict[str, torch.Tensor], blocks: torch.nn.Module, images: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Final-norm patch tokens of LAYERS as the official model computes them (``get_intermediate_layers``).

    Tokens are prepared from the official tensors (``prepare_tokens_with_masks``); the blocks and the norm are
    the timm source's, which hold the same weights.
    """
    batch, _, height, width = images.shape
    registers = official.get("register_tokens")
    flags = OFFICIAL_FLAGS[registers is not None]
    x = F.conv2d(images, official["patch_embed.proj.weight"], official["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat((official["cls_token"].expand(batch, -1, -1), x), dim=1)
    x = x + dinov2_interpolate_pos_encoding(official["pos_embed"], height, width, **flags)
    if registers is not None:
        x = torch.cat((x[:, :1], registers.expand(batch, -1, -1), x[:, 1:]), dim=1)
    num_prefix = 1 + (0 if registers is None else registers.shape[1])
    outputs = []
    for index, block in enumerate(blocks.blocks[: max(LAYERS) + 1]):
        x = block(x)
        if index in LAYERS:
            outputs.append(blocks.norm(x)[:, num_prefix:])
    return tuple(outputs)


def random_source(name: str) -> torch.nn.Module:
    torch.manual_seed(3)
    source = timm.create_model(name, pretrained=False, num_classes=0).eval()
    with torch.no_grad():  # non-zero everywhere, including tokens that initialise to zero
        for parameter in source.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return source


@pytest.fixture(scope="module", params=list(DINOV2_MODELS))
def dinov2(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A random DINOv2 in timm's layout, the same weights in the official layout, and both saved to files."""
    name = request.param
    source = random_source(name)
    official = official_layout(source.state_dict(), DINOV2_MODELS[name])
    folder = tmp_path_factory.mktemp(name)
    save_file({key: value.contiguous() for key, value in source.state_dict().items()}, folder / "model.safetensors")
    torch.save(official, folder / "dinov2_vits14_pretrain.pth")
    files = {"timm_file": folder / "model.safetensors", "official_file": folder / "dinov2_vits14_pretrain.pth"}
    return {"name": name, "source": source, "official": official, "files": files}


def build_teacher(dinov2: dict, weights: str, image_size: int) -> TeacherFeatureExtractor:
    """The teacher with the weights handed over in its backbone, or loaded from a file as users load them."""
    if weights == "backbone":
        return TeacherFeatureExtractor(copy.deepcopy(dinov2["source"]), LAYERS, image_size)
    teacher = TeacherFeatureExtractor(create_backbone(dinov2["name"]), LAYERS, image_size)
    teacher.load_backbone_state_dict(teacher_state_dict(dinov2["name"], str(dinov2["files"][weights])))
    return teacher


def expected_pos_embed(dinov2: dict, image_size: int) -> torch.Tensor:
    """The official positional embedding in timm's layout (without the class row where timm folds it)."""
    registers = DINOV2_MODELS[dinov2["name"]]
    official = dinov2_interpolate_pos_encoding(
        dinov2["official"]["pos_embed"], image_size, image_size, **OFFICIAL_FLAGS[registers]
    )
    return official[:, 1:] if registers else official


@pytest.mark.parametrize("weights", ["backbone", "timm_file", "official_file"])
@pytest.mark.parametrize("image_size", SIZES)
def test_pos_embed_is_the_official_interpolation(dinov2: dict, weights: str, image_size: int) -> None:
    """Reference: the official DINOv2 ``interpolate_pos_encoding`` with the hub's flags for the model."""
    teacher = build_teacher(dinov2, weights, image_size)
    expected = expected_pos_embed(dinov2, image_size)
    assert teacher.backbone.pos_embed.shape == expected.shape
    torch.testing.assert_close(teacher.backbone.pos_embed.data, expected, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def reference_tokens(dinov2: dict) -> dict[int, tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
    """Images and the official model's tokens per image size, computed once per model for every weight source."""
    return {}


# Every source at 224 and 448 px; at 1036 px (slow on CPU) the default one, timm's weights: the pos-embed
# test above already shows that all sources give the same positional embedding at every size.
@pytest.mark.parametrize(
    ("image_size", "weights"),
    [(224, "timm_file"), (224, "official_file"), (448, "timm_file"), (448, "official_file"), (1036, "timm_file")],
)
def test_tokens_are_the_official_models(dinov2: dict, reference_tokens: dict, image_size: int, weights: str) -> None:
    """Reference: block 7 and 11 patch tokens of the official DINOv2 forward, with the official interpolation."""
    if image_size not in reference_tokens:
        images = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(image_size))
        with torch.no_grad():
            reference_tokens[image_size] = images, official_tokens(dinov2["official"], dinov2["source"], images)
    images, expected = reference_tokens[image_size]
    teacher = build_teacher(dinov2, weights, image_size)
    for actual, reference in zip(teacher(images), expected, strict=True):
        assert actual.shape == (1, (image_size // PATCH) ** 2, 384)
        torch.testing.assert_close(actual, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("weights", ["backbone", "timm_file", "official_file"])
def test_native_size_leaves_the_pos_embed_untouched(dinov2: dict, weights: str) -> None:
    """Reference: the official model adds its 37 x 37 positional embedding as it is at 518 px."""
    teacher = build_teacher(dinov2, weights, 518)
    assert torch.equal(teacher.backbone.pos_embed.data, dinov2["source"].pos_embed.data)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("vit_base_patch14_reg4_dinov2.lvd142m", "dinov2_registers"),
     ("vit_small_patch14_reg4_dinov2", "dinov2_registers"), ("vit_large_patch14_dinov2.lvd142m", "dinov2"),
     ("vit_small_patch16_224.dino", "dino"), ("vit_base_patch8_224.dino", "dino"), ("vit_tiny_patch16_224", "timm"),
     ("vit_small_patch16_224", "timm")],
)  # fmt: skip
def test_interpolation_follows_the_weights_authors(name: str, expected: str) -> None:
    assert pos_embed_interpolation(timm.create_model(name, num_classes=0, device="meta")) == expected


@pytest.mark.parametrize(("name", "patch"), [("vit_small_patch16_224.dino", 16), ("vit_small_patch8_224.dino", 8)])
@pytest.mark.parametrize("image_size", [112, 448])
def test_dino_pos_embed_is_the_official_interpolation(name: str, patch: int, image_size: int) -> None:
    """Reference: facebookresearch/dino ``interpolate_pos_encoding`` (bicubic, offset 0.1, no antialiasing)."""
    source = random_source(name)
    teacher = TeacherFeatureExtractor(copy.deepcopy(source), LAYERS, image_size)
    expected = dino_interpolate_pos_encoding(source.pos_embed.data, image_size, image_size, patch)
    torch.testing.assert_close(teacher.backbone.pos_embed.data, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("image_size", [112, 448])
def test_other_vits_resample_as_timm_does(image_size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reference: timm's own ``set_input_size`` of the same model."""
    # Building a ViT through anomalib's TimmFeatureExtractor (as L2BT does) patches timm's resampling in
    # vision_transformer to antialias=False for the rest of the process; the teacher does not depend on that.
    monkeypatch.setattr(vision_transformer, "resample_abs_pos_embed", resample_abs_pos_embed)
    source = random_source("vit_tiny_patch16_224")
    teacher = TeacherFeatureExtractor(copy.deepcopy(source), LAYERS, image_size)
    source.set_input_size(img_size=(image_size, image_size))
    torch.testing.assert_close(teacher.backbone.pos_embed.data, source.pos_embed.data, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(DINOV2_MODELS))
def test_exported_teacher_does_not_interpolate(name: str) -> None:
    teacher = TeacherFeatureExtractor(create_backbone(name), LAYERS, 56)
    program = torch.export.export(teacher, (torch.randn(1, 3, 56, 56),))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert targets
    assert not [target for target in targets if "upsample" in target or "interpolate" in target]
