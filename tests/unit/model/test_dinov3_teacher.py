"""DINOv3 teachers against timm's model run directly and a transcription of the official DINOv3 forward.

The reference forward is written out here from the authors' sources, independently of the package and of
timm: ``DinoVisionTransformer.prepare_tokens_with_masks`` and ``get_intermediate_layers`` (``norm=True``) of
facebookresearch/dinov3 ``dinov3/models/vision_transformer.py``, ``RopePositionEmbedding.forward``
(``dinov3/layers/rope_position_encoding.py``: ``normalize_coords="separate"``, float32 as the hub models
build it), ``SelfAttention`` with ``LinearKMaskedBias`` and ``rope_apply`` (``dinov3/layers/attention.py``),
``SelfAttentionBlock`` (``dinov3/layers/block.py``) and ``Mlp``/``SwiGLUFFN`` (``dinov3/layers/ffn_layers.py``),
with the hub's settings (``dinov3/hub/backbones.py``: LayerNorm eps 1e-5, 4 storage tokens, layer scale).
It computes the rotary embedding at the input's patch grid in every forward, as the official model does.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from anomalib_transformer_student import TransformerStudent
from anomalib_transformer_student.model.teacher import (
    SUPPORTED_FAMILIES,
    TeacherFeatureExtractor,
    create_backbone,
    default_layers,
    resolve_layers,
)
from anomalib_transformer_student.training.teacher_weights import (
    fetch_pretrained_state_dict,
    is_cached,
    teacher_state_dict,
)

PATCH, HEADS, LAYERS = 16, 6, (7, 11)
SIZES = (64, 112)  # 4 x 4 and 7 x 7 patches; timm's DINOv3 models are configured for 16 x 16 (256 px)
# ViT-S (GELU MLP, no query-value biases) and ViT-S+ with query-value biases (SwiGLU).
ARCHITECTURES = ("vit_small_patch16_dinov3", "vit_small_plus_patch16_dinov3_qkvb")
ALL_VARIANTS = [f"vit_{size}_patch16_dinov3{bias}" for size in ("small", "small_plus", "base", "large")
                for bias in ("", "_qkvb")]  # fmt: skip


def official_layout(state_dict: dict[str, torch.Tensor], query_value_mask: float = 1.0) -> dict[str, torch.Tensor]:
    """Write timm weights as an official DINOv3 ``.pth`` holds them (the reverse of timm's conversion).

    Query-key-value biases become one ``qkv.bias`` with a random key third, masked away by ``qkv.bias_mask``
    as in the official files (architectures without query-value biases get zeros there: what the official
    distilled models hold); ``query_value_mask`` is the mask's value for the other two thirds (1 in the
    official files). ``rope_embed.periods`` is what the official module computes in float32.
    """
    width = state_dict["cls_token"].shape[-1]
    renames = (("reg_token", "storage_tokens"), ("gamma_1", "ls1.gamma"), ("gamma_2", "ls2.gamma"),
               (".mlp.fc1_g.", ".mlp.w1."), (".mlp.fc1_x.", ".mlp.w2."))  # fmt: skip
    official = {}
    for key, value in state_dict.items():
        for old, new in renames:
            key = key.replace(old, new)
        official[key] = value.clone()
    if any(".mlp.w1." in key for key in official):
        official = {key.replace(".mlp.fc2.", ".mlp.w3."): value for key, value in official.items()}
    blocks = {int(key.split(".")[1]) for key in official if key.startswith("blocks.")}
    generator = torch.Generator().manual_seed(7)
    for index in sorted(blocks):
        prefix = f"blocks.{index}.attn."
        query = official.pop(prefix + "q_bias", torch.zeros(width))
        value = official.pop(prefix + "v_bias", torch.zeros(width))
        official[prefix + "qkv.bias"] = torch.cat([query, torch.randn(width, generator=generator), value])
        kept = torch.full((width,), query_value_mask)
        official[prefix + "qkv.bias_mask"] = torch.cat([kept, torch.zeros(width), kept])
    official["mask_token"] = torch.zeros(1, width)
    head = width // HEADS
    official["rope_embed.periods"] = 100.0 ** (2 * torch.arange(head // 4, dtype=torch.float32) / (head // 2))
    return official


def rope_sin_cos(periods: torch.Tensor, rows: int, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``RopePositionEmbedding.forward(H=rows, W=columns)`` in eval mode with ``normalize_coords="separate"``."""
    coords_h = torch.arange(0.5, rows, dtype=torch.float32) / rows
    coords_w = torch.arange(0.5, columns, dtype=torch.float32) / columns
    coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
    coords = 2.0 * coords - 1.0
    angles = 2 * math.pi * coords[:, :, None] / periods[None, None, :]
    angles = angles.flatten(1, 2).tile(2)
    return torch.sin(angles), torch.cos(angles)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def rope_apply(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """``SelfAttention.apply_rope`` for one of q, k: the prefix tokens (class, storage) keep their values."""
    prefix = x.shape[-2] - sin.shape[-2]
    rotated = x[:, :, prefix:] * cos + rotate_half(x[:, :, prefix:]) * sin
    return torch.cat([x[:, :, :prefix], rotated], dim=-2)


def official_tokens(official: dict[str, torch.Tensor], images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Final-norm patch tokens of LAYERS as the official DINOv3 model computes them, from its own tensors."""
    batch, _, height, width = images.shape
    rows, columns = height // PATCH, width // PATCH
    dim = official["cls_token"].shape[-1]

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (dim,), official[f"{name}.weight"], official[f"{name}.bias"], eps=1e-5)

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, official[f"{name}.weight"], official[f"{name}.bias"])

    x = F.conv2d(images, official["patch_embed.proj.weight"], official["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    class_token = official["cls_token"] + 0 * official["mask_token"]
    storage = official["storage_tokens"]
    x = torch.cat([class_token.expand(batch, -1, -1), storage.expand(batch, -1, -1), x], dim=1)
    sin, cos = rope_sin_cos(official["rope_embed.periods"], rows, columns)
    outputs = []
    for index in range(max(LAYERS) + 1):
        block = f"blocks.{index}"
        qkv_bias = official[f"{block}.attn.qkv.bias"] * official[f"{block}.attn.qkv.bias_mask"]
        qkv = F.linear(norm(x, f"{block}.norm1"), official[f"{block}.attn.qkv.weight"], qkv_bias)
        tokens = qkv.shape[1]
        q, k, v = (t.transpose(1, 2) for t in qkv.reshape(batch, tokens, 3, HEADS, dim // HEADS).unbind(2))
        attended = F.scaled_dot_product_attention(rope_apply(q, sin, cos), rope_apply(k, sin, cos), v)
        attended = attended.transpose(1, 2).reshape(batch, tokens, dim)
        x = x + official[f"{block}.ls1.gamma"] * linear(attended, f"{block}.attn.proj")
        hidden = norm(x, f"{block}.norm2")
        if f"{block}.mlp.w1.weight" in official:  # SwiGLUFFN
            hidden = F.silu(linear(hidden, f"{block}.mlp.w1")) * linear(hidden, f"{block}.mlp.w2")
            hidden = linear(hidden, f"{block}.mlp.w3")
        else:  # Mlp
            hidden = linear(F.gelu(linear(hidden, f"{block}.mlp.fc1")), f"{block}.mlp.fc2")
        x = x + official[f"{block}.ls2.gamma"] * hidden
        if index in LAYERS:
            outputs.append(norm(x, "norm")[:, 1 + storage.shape[1] :])
    return tuple(outputs)


def hub_cache_weights(name: str, state_dict: dict[str, torch.Tensor], cache: Path) -> dict[str, torch.Tensor]:
    """Weights as ``pretrained=True`` gets them: timm's own loading from a Hugging Face cache holding ``state_dict``.

    The cache is laid out as ``huggingface_hub`` writes it, for the repository timm names for ``name``; the Hub
    stays offline, so the real loading code runs without a network.
    """
    from huggingface_hub import constants

    repository = cache / f"models--{timm.models.get_pretrained_cfg(name).hf_hub_id.replace('/', '--')}"
    revision = "0" * 40
    (repository / "refs").mkdir(parents=True)
    (repository / "refs" / "main").write_text(revision)
    (repository / "snapshots" / revision).mkdir(parents=True)
    tensors = {key: value.contiguous() for key, value in state_dict.items()}
    save_file(tensors, repository / "snapshots" / revision / "model.safetensors")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_CACHE", str(cache))
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        patch.setenv("HF_HUB_OFFLINE", "1")
        assert is_cached(name)
        return fetch_pretrained_state_dict(name)


def random_source(name: str) -> torch.nn.Module:
    """timm's DINOv3 as timm builds it (dynamic input size), random and non-zero everywhere."""
    torch.manual_seed(5)
    source = timm.create_model(name, pretrained=False, num_classes=0).eval()
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return source


@pytest.fixture(scope="module", params=ARCHITECTURES)
def dinov3(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A random DINOv3, its weights from the Hub cache and in files of both layouts, and reference tokens per size."""
    name = request.param
    source = random_source(name)
    official = official_layout(source.state_dict())
    folder = tmp_path_factory.mktemp(name)
    files = {"timm_file": folder / "model.safetensors", "official_file": folder / "dinov3_vits16_pretrain.pth"}
    save_file({key: value.contiguous() for key, value in source.state_dict().items()}, files["timm_file"])
    torch.save(official, files["official_file"])
    hub = hub_cache_weights(f"{name}.lvd1689m", source.state_dict(), folder / "hub")
    references = {}
    for size in SIZES:
        images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            timm_tokens = source.forward_intermediates(
                images, indices=list(LAYERS), norm=True, output_fmt="NLC", intermediates_only=True
            )
            references[size] = {"images": images, "timm": timm_tokens, "official": official_tokens(official, images)}
    return {"name": name, "source": source, "hub": hub, "official": official, "files": files, "references": references}


def teacher_from_file(name: str, path: Path, image_size: int) -> TeacherFeatureExtractor:
    """The teacher as a user gets it from ``teacher_weights``: built at its size, the file converted and loaded."""
    teacher = TeacherFeatureExtractor(create_backbone(name), None, image_size)
    teacher.load_backbone_state_dict(teacher_state_dict(name, str(path)))
    return teacher


@pytest.mark.parametrize("image_size", SIZES)
def test_tokens_equal_timms_model_and_the_official_forward_for_every_source(dinov3: dict, image_size: int) -> None:
    """References: timm's DINOv3 ``forward_intermediates`` (final norm, patch tokens only), and the official forward.

    The weights come from the timm model itself, from the Hugging Face cache (``pretrained=True``), from a
    timm-layout file and from an official-layout file: each gives the tokens of the model in its source layout,
    and of the other.
    """
    teacher = TeacherFeatureExtractor(create_backbone(dinov3["name"]), None, image_size)
    reference = dinov3["references"][image_size]
    sources = {"timm model": dinov3["source"].state_dict(), "hub cache": dinov3["hub"]}
    sources.update({layout: teacher_state_dict(dinov3["name"], str(path)) for layout, path in dinov3["files"].items()})
    for source, state_dict in sources.items():
        teacher.load_backbone_state_dict(state_dict)
        actual = teacher(reference["images"])
        for model in ("timm", "official"):
            for tokens, expected in zip(actual, reference[model], strict=True):
                assert tokens.shape == (2, (image_size // PATCH) ** 2, 384)
                torch.testing.assert_close(tokens, expected, atol=1e-6, rtol=0, msg=f"{source} vs {model}")


def test_the_official_key_bias_mask_is_applied(tmp_path: Path) -> None:
    """A file whose mask switches every bias off: the official forward applies none, so neither may the teacher."""
    name = "vit_small_patch16_dinov3_qkvb"
    official = official_layout(random_source(name).state_dict(), query_value_mask=0.0)
    assert torch.count_nonzero(official["blocks.0.attn.qkv.bias"][:384])  # biases the mask must remove
    path = tmp_path / "dinov3_vits16_pretrain.pth"
    torch.save(official, path)
    teacher = teacher_from_file(name, path, 64)
    images = torch.randn(1, 3, 64, 64)
    for actual, expected in zip(teacher(images), official_tokens(official, images), strict=True):
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)
    assert not torch.count_nonzero(teacher.backbone.blocks[0].attn.q_bias)


def test_biases_an_architecture_has_no_place_for_name_its_qkvb_variant(tmp_path: Path) -> None:
    source = timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=False, num_classes=0, depth=1)
    torch.nn.init.normal_(source.blocks[0].attn.q_bias)
    path = tmp_path / "dinov3_vits16_pretrain.pth"
    torch.save(official_layout(source.state_dict()), path)
    with pytest.raises(ValueError, match=r"non-zero query/value biases.*'vit_small_patch16_dinov3_qkvb'"):
        teacher_state_dict("vit_small_patch16_dinov3", str(path))


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_every_variant_builds_at_a_multiple_of_16(name: str) -> None:
    """On the meta device: the structure, default layers and token shapes, without the cost of the weights."""
    backbone = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=False, device="meta")
    teacher = TeacherFeatureExtractor(backbone, None, 80)
    depth, width = {"small": (12, 384), "small_plus": (12, 384), "base": (12, 768), "large": (24, 1024)}[
        name.removeprefix("vit_").split("_patch")[0]
    ]
    assert teacher.layers == ((7, 11) if depth == 12 else (15, 23))
    assert (teacher.patch_size, teacher.num_prefix_tokens, len(teacher.backbone.blocks)) == (16, 5, depth)
    shallow, deep = teacher(torch.empty(2, 3, 80, 80, device="meta"))
    assert shallow.shape == deep.shape == (2, 25, width)


def test_a_multiple_of_16_works_and_another_size_names_the_nearest() -> None:
    model = TransformerStudent(teacher="vit_small_patch16_dinov3", pretrained=False, image_size=48, layers=(3, -2))
    assert model.model.teacher.grid_size == (3, 3)
    assert model.model.teacher.layers == (3, 10)  # explicit layers win over the default
    model.model.eval()
    output = model.model(torch.rand(1, 3, 48, 48))
    assert output.anomaly_map.shape == (1, 1, 48, 48)
    with pytest.raises(ValueError, match="image_size 40 must be a positive multiple of the teacher's patch size 16; "
                       "use 32 or 48 instead"):  # fmt: skip
        TransformerStudent(teacher="vit_small_patch16_dinov3", pretrained=False, image_size=40)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("vit_small_patch16_dinov3", (7, 11)), ("vit_base_patch16_dinov3.lvd1689m", (7, 11)),
     ("vit_large_patch16_dinov3.sat493m", (15, 23)), ("vit_huge_plus_patch16_dinov3", (20, 31)),
     ("vit_7b_patch16_dinov3", (26, 39)), ("vit_base_patch14_reg4_dinov2.lvd142m", (7, 11)),
     ("vit_large_patch14_dinov2", (15, 23)), ("vit_giant_patch14_dinov2", (26, 39))],
)  # fmt: skip
def test_default_layers_follow_the_depth(name: str, expected: tuple[int, int]) -> None:
    """Two thirds of the depth and the last block, as the paper's (7, 11) of 12 blocks."""
    assert default_layers(len(timm.create_model(name, num_classes=0, device="meta").blocks)) == expected


def test_explicit_layers_win_and_none_takes_the_default() -> None:
    assert resolve_layers(None, 24) == (15, 23)
    assert resolve_layers((3, -2), 24) == (3, 22)
    with pytest.raises(ValueError, match="at least two blocks"):
        default_layers(1)
    default = TransformerStudent(teacher="vit_small_patch16_dinov3", pretrained=False, image_size=32)
    assert default.model.teacher.layers == (7, 11)
    assert default.hparams["layers"] is None  # a checkpoint rebuilds the default; its record holds the blocks
    assert default.architecture["layers"] == [7, 11]


def test_the_default_teacher_keeps_the_papers_blocks() -> None:
    """``TransformerStudent()``: DINOv2 ViT-B/14-reg4, whose 12 blocks give the paper's (7, 11) (on the meta device)."""
    defaults = inspect.signature(TransformerStudent).parameters
    assert defaults["teacher"].default == "vit_base_patch14_reg4_dinov2.lvd142m"
    assert defaults["layers"].default is None
    backbone = timm.create_model(defaults["teacher"].default, num_classes=0, device="meta")
    assert TeacherFeatureExtractor(backbone, None, 1036).layers == (7, 11)


@pytest.mark.parametrize(
    ("name", "reason"),
    [("resnet18", "ResNet, not as a Vision Transformer"), ("convnext_tiny.dinov3_lvd1689m", "ConvNeXt"),
     ("swin_tiny_patch4_window7_224", "SwinTransformer"),
     ("beit_base_patch16_224", "Beit"), ("vit_relpos_small_patch16_224", "VisionTransformerRelPos"),
     ("samvit_base_patch16", "VisionTransformerSAM"), ("naflexvit_base_patch16_gap", "NaFlexVit"),
     ("vit_base_r50_s16_384", "HybridEmbed")],
)  # fmt: skip
def test_models_that_cannot_teach_are_refused_naming_the_families(name: str, reason: str) -> None:
    with pytest.raises(ValueError, match=f"Teacher '{name}' cannot serve as the teacher") as error:
        TransformerStudent(teacher=name, pretrained=False, image_size=64)
    assert reason in str(error.value)
    assert SUPPORTED_FAMILIES in str(error.value)


def test_a_backbone_built_for_dynamic_sizes_is_refused_naming_the_fix() -> None:
    """Before: ``AssertionError: feature shape must be cached on create`` from inside timm, at the first forward."""
    backbone = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0, device="meta")
    with pytest.raises(ValueError, match=r"dynamic_img_size=True; build it with `create_backbone\(name\)`"):
        TeacherFeatureExtractor(backbone, None, 64)
