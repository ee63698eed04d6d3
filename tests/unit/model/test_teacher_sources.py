"""Teachers from anywhere: several timm ViTs, local weight files in timm's and DINOv2's layouts, clear failures.

Rotary-embedding ViTs (DINOv3, EVA02) train at any multiple of their patch; DINOv3 files in the official layout
are tested in ``test_dinov3_teacher.py``.
"""

from __future__ import annotations

import copy
import re
import socket
import threading
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from anomalib_transformer_student import TransformerStudent
from anomalib_transformer_student.model.teacher import TeacherFeatureExtractor
from anomalib_transformer_student.training import teacher_weights as weights_module
from anomalib_transformer_student.training.teacher_weights import (
    TeacherWeightsMismatchError,
    TeacherWeightsUnavailableError,
    fetch_pretrained_state_dict,
    hub_reachable,
    read_weights_file,
    teacher_state_dict,
)

IMAGE_SIZE = 112


@pytest.mark.parametrize(
    ("name", "width", "patch", "prefix"),
    [("vit_small_patch14_reg4_dinov2", 384, 14, 5), ("vit_small_patch8_224.dino", 384, 8, 1),
     ("vit_tiny_patch16_224", 192, 16, 1), ("vit_small_patch16_dinov3", 384, 16, 5),
     ("eva02_tiny_patch14_224.mim_in22k", 192, 14, 1)],
)  # fmt: skip
def test_any_timm_vit_trains_one_step(name: str, width: int, patch: int, prefix: int) -> None:
    torch.manual_seed(0)
    model = TransformerStudent(teacher=name, pretrained=False, image_size=IMAGE_SIZE, layers=(-4, -1))
    teacher = model.model.teacher
    assert (teacher.embed_dim, teacher.patch_size, teacher.num_prefix_tokens) == (width, patch, prefix)
    assert teacher.layers == (teacher.depth - 4, teacher.depth - 1)
    assert model.model.forward_student.layers[0].in_features == width
    optimizer = model.configure_optimizers()
    before = model.model.forward_student.layers[0].weight.detach().clone()
    model.model.train()
    loss = model.model(torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, model.model.forward_student.layers[0].weight)
    model.model.eval()
    output = model.model(torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert output.anomaly_map.shape == (1, 1, IMAGE_SIZE, IMAGE_SIZE)


def official_layout(state_dict: dict[str, torch.Tensor], registers: bool) -> dict[str, torch.Tensor]:
    """Reverse of the conversion: write timm weights as the official DINOv2 torch.hub file would hold them."""
    official = {key.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3."): value.clone()
                for key, value in state_dict.items()}  # fmt: skip
    width = official["cls_token"].shape[-1]
    official["mask_token"] = torch.zeros(1, width)
    if registers:
        official["register_tokens"] = official.pop("reg_token")
        class_position = torch.randn(1, 1, width)
        official["cls_token"] = official["cls_token"] - class_position
        official["pos_embed"] = torch.cat([class_position, official["pos_embed"]], dim=1)
    return official


def source_and_features(name: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    torch.manual_seed(1)
    source = timm.create_model(name, pretrained=False, num_classes=0)
    with torch.no_grad():  # random non-zero values everywhere, including tokens that init to zero
        for parameter in source.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    expected = TeacherFeatureExtractor(copy.deepcopy(source), (7, 11), IMAGE_SIZE)(images)
    return source, expected, images


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_local_timm_file_gives_identical_features(suffix: str, tmp_path: Path) -> None:
    """Reference: the features of our teacher built on the timm source model that wrote the file."""
    name = "vit_small_patch14_reg4_dinov2"
    source, expected, images = source_and_features(name)
    path = tmp_path / f"teacher{suffix}"
    state_dict = {key: value.contiguous() for key, value in source.state_dict().items()}
    save_file(state_dict, path) if suffix == ".safetensors" else torch.save(state_dict, path)
    model = TransformerStudent(teacher=name, teacher_weights=str(path), image_size=IMAGE_SIZE)
    assert not bool(model.model.teacher.weights_loaded)
    model.load_teacher_weights()
    assert bool(model.model.teacher.weights_loaded)
    for actual, reference in zip(model.model.teacher(images), expected, strict=True):
        torch.testing.assert_close(actual, reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("name", "registers"), [("vit_small_patch14_reg4_dinov2", True), ("vit_small_patch14_dinov2", False)]
)
def test_official_dinov2_file_is_converted(name: str, registers: bool, tmp_path: Path) -> None:
    """Reference: the features of our teacher built on the timm source model whose weights the file holds."""
    source, expected, images = source_and_features(name)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(official_layout(source.state_dict(), registers), path)
    model = TransformerStudent(teacher=name, teacher_weights=str(path), image_size=IMAGE_SIZE)
    model.load_teacher_weights()
    for actual, reference in zip(model.model.teacher(images), expected, strict=True):
        torch.testing.assert_close(actual, reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_wrapped_data_parallel_file_is_unwrapped(wrapper: str, tmp_path: Path) -> None:
    state_dict = timm.create_model("vit_small_patch14_dinov2", num_classes=0, device="meta").state_dict()
    saved = {f"module.{key}": torch.zeros(1) for key in state_dict}
    path = tmp_path / "checkpoint.pth"
    torch.save({wrapper: saved, "epoch": 3}, path)
    assert set(read_weights_file(path)) == set(state_dict)


def test_wrong_keys_are_listed(tmp_path: Path) -> None:
    state_dict = timm.create_model("vit_small_patch14_dinov2", num_classes=0).state_dict()
    state_dict["surprise.weight"] = torch.zeros(1)
    del state_dict["blocks.3.attn.qkv.weight"]
    path = tmp_path / "broken.pth"
    torch.save(state_dict, path)
    model = TransformerStudent(teacher="vit_small_patch14_dinov2", teacher_weights=str(path), image_size=IMAGE_SIZE)
    with pytest.raises(ValueError, match=r"blocks\.3\.attn\.qkv\.weight") as error:
        model.load_teacher_weights()
    assert "surprise.weight" in str(error.value)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "teacher.safetensors"
    model = TransformerStudent(teacher="vit_small_patch14_dinov2", teacher_weights=str(path), image_size=IMAGE_SIZE)
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        model.load_teacher_weights()


def test_unreadable_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.pth"):
        read_weights_file(path)


def test_weights_with_random_teacher_is_a_contradiction() -> None:
    with pytest.raises(ValueError, match="pretrained=False"):
        TransformerStudent(teacher="vit_small_patch14_dinov2", pretrained=False, teacher_weights="x.pth")


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.mark.usefixtures("empty_hub_cache")
def test_unreachable_hub_fails_fast_with_both_ways_out(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.monotonic()
    with pytest.raises(TeacherWeightsUnavailableError) as error:
        fetch_pretrained_state_dict("vit_small_patch14_dinov2.lvd142m")
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert "unreachable" in message
    assert "HF_HUB_OFFLINE=1" in message
    assert "pretrained=False" in message


@pytest.mark.usefixtures("empty_hub_cache")
def test_offline_mode_without_cache_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(weights_module, "hub_reachable", lambda *_: pytest.fail("offline mode must not probe"))
    with pytest.raises(TeacherWeightsUnavailableError, match="not in the local cache"):
        fetch_pretrained_state_dict("vit_small_patch14_dinov2.lvd142m")


def test_hanging_network_is_abandoned_after_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    released = threading.Event()

    def hang(*args, **kwargs):
        released.wait(30)
        raise TimeoutError("the connection hung")  # as a socket's timeout ends, once the test has its answer

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.monotonic()
    try:
        assert hub_reachable(timeout=0.5) is False
        assert time.monotonic() - start < 2
    finally:
        released.set()


def test_gated_repository_names_the_license_and_the_login(monkeypatch: pytest.MonkeyPatch) -> None:
    """DINOv3 weights are under Meta's license: a Hub that refuses them as gated must say how to get access."""
    gated = type("GatedRepoError", (RuntimeError,), {})  # huggingface_hub's class, by name, without a response

    def refuse(*args, **kwargs):
        raise gated("401 Client Error. Cannot access gated repo for url https://huggingface.co/timm/x.")

    monkeypatch.setattr(weights_module, "is_cached", lambda name: True)
    monkeypatch.setattr(weights_module.timm, "create_model", refuse)
    with pytest.raises(TeacherWeightsUnavailableError) as error:
        fetch_pretrained_state_dict("vit_small_patch16_dinov3.lvd1689m")
    message = str(error.value)
    assert "accept its license on the model's Hugging Face page" in message
    assert "HF_TOKEN" in message


def test_file_of_another_architecture_names_the_file_the_teacher_and_the_shapes(tmp_path: Path) -> None:
    path = tmp_path / "vit_small.safetensors"
    save_file(timm.create_model("vit_small_patch14_dinov2", num_classes=0).state_dict(), path)
    teacher = "vit_base_patch14_reg4_dinov2.lvd142m"
    with pytest.raises(TeacherWeightsMismatchError) as error:
        teacher_state_dict(teacher, str(path))
    message = str(error.value)
    assert str(path) in message and f"teacher '{teacher}'" in message
    assert re.search(r"tensors differ in shape \(.*: file \(.*384.*\), teacher \(.*768.*\)", message)
    assert "--model.teacher" in message


def test_unfetchable_weights_offer_a_local_weights_file_first() -> None:
    message = weights_module.unavailable_message("vit_small_patch14_dinov2.lvd142m", "offline")
    assert message.index("--model.teacher_weights FILE") < message.index("HF_HUB_OFFLINE=1")
