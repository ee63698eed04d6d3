"""Tiling geometry, stitching, the whole-image path it reduces to, a seamless map, and its errors."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from anomalib.data import ImageBatch, PredictDataset
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from PIL import Image
from torch.utils.data import DataLoader

from anomalib_transformer_student import TransformerStudent
from anomalib_transformer_student.feature_cache.callback import FeatureCacheCallback, feature_fingerprint
from anomalib_transformer_student.feature_cache.run_folder import CacheRoot
from anomalib_transformer_student.feature_cache.store import FeatureStore
from anomalib_transformer_student.model.tiling import Tiling, stitch
from anomalib_transformer_student.training.data_checks import DataChecks

from ...factories import TeacherCalls, make_trainer, small_model

SIZE = 56  # the teacher's input: 4 x 4 patches


def _model(**overrides) -> TransformerStudent:
    torch.manual_seed(0)
    model = small_model(image_size=SIZE, layers=(1, 3), **overrides)
    model.post_processor = None  # raw maps
    return model.eval()


@pytest.mark.parametrize(
    ("height", "width", "tile", "image_size", "overlap", "count"),
    [
        (2000, 8000, 1036, 1036, 0, 2 * 8),  # a line-scan strip
        (3000, 4000, 1036, 1036, 0, 3 * 4),
        (2048, 2448, 1036, 1036, 100, 3 * 3),
        (1000, 1400, 224, 224, 0, 5 * 7),
        (1037, 500, 1036, 1036, 0, 2),  # one side below a tile: padded to one tile there
        (130, 250, 112, 56, 14, 2 * 3),  # tiles twice the teacher's input
    ],
)
def test_tiles_cover_the_image_on_one_patch_grid(
    height: int, width: int, tile: int, image_size: int, overlap: int, count: int
) -> None:
    layout = Tiling(tile, overlap, image_size=image_size, patch_size=14).layout(height, width)
    stride = layout.stride
    assert layout.count == count and layout.tile == tile and stride == tile // (image_size // 14)
    for side, canvas, offset in zip((height, width), layout.canvas, layout.offset, strict=True):
        assert canvas % stride == 0 and canvas >= tile
        assert canvas - side < stride or canvas == tile  # padded to whole patches (or to one tile) only
        assert offset == (canvas - side) // 2  # centred, as SquarePad pads
    coverage = torch.zeros(layout.canvas)
    for y, x in layout.origins:
        assert y % stride == 0 and x % stride == 0  # every tile's patches on the canvas's patch grid
        coverage[y : y + tile, x : x + tile] += 1
    assert coverage.min() >= 1 and coverage.shape == layout.canvas  # every pixel, and none beyond the canvas
    rounded_overlap = stride * math.ceil(overlap / stride)
    for axis in (0, 1):
        starts = sorted({origin[axis] for origin in layout.origins})
        assert starts[0] == 0 and starts[-1] == layout.canvas[axis] - tile
        assert all(tile - (b - a) >= rounded_overlap for a, b in itertools.pairwise(starts))


def test_an_image_within_one_tile_is_not_tiled() -> None:
    tiling = Tiling(224, image_size=224, patch_size=14)
    assert tiling.layout(224, 224) is None and tiling.layout(100, 224) is None
    assert tiling.layout(225, 224) is not None


def test_tiles_are_undistorted_crops_of_the_edge_padded_image() -> None:
    tiling = Tiling(112, 14, image_size=56, patch_size=14)
    images = torch.rand(2, 3, 130, 250, generator=torch.Generator().manual_seed(0))
    layout = tiling.layout(130, 250)
    tiles = tiling.split(images, layout).reshape(2, layout.count, 3, 112, 112)
    top, left = layout.offset
    for index, (y, x) in enumerate(layout.origins):
        for row in (0, 57, 111):
            for column in (0, 40, 111):
                # Canvas pixel -> image pixel, replicated at the borders.
                source = min(max(y + row - top, 0), 129), min(max(x + column - left, 0), 249)
                assert torch.equal(tiles[:, index, :, row, column], images[:, :, source[0], source[1]])


def test_stitching_places_each_tile_and_averages_overlaps() -> None:
    tiling = Tiling(112, 14, image_size=56, patch_size=14)
    layout = tiling.layout(130, 250)
    values = torch.arange(2 * layout.count, dtype=torch.float32)
    patch_maps = values[:, None, None].expand(-1, layout.grid, layout.grid)
    stitched = stitch(patch_maps, layout)
    assert stitched.shape == (2, *layout.canvas_grid)
    total, coverage = torch.zeros(2, *layout.canvas_grid), torch.zeros(layout.canvas_grid)
    for index, (y, x) in enumerate(layout.origins):
        top, left = y // layout.stride, x // layout.stride
        rows, columns = slice(top, top + layout.grid), slice(left, left + layout.grid)
        total[:, rows, columns] += values.reshape(2, -1)[:, index, None, None]
        coverage[rows, columns] += 1
    assert coverage.max() > 1  # the case has overlaps
    torch.testing.assert_close(stitched, total / coverage)


@pytest.mark.parametrize("size", [(50, 40), (112, 112), (112, 70)])
def test_an_image_within_one_tile_gives_todays_map_and_score(size: tuple[int, int]) -> None:
    whole, tiled = _model(), _model(tiling={"tile_size": 112})
    tiled.load_state_dict(whole.state_dict())
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for path in ("_predict", "forward"):
            expected, actual = getattr(whole, path)(images), getattr(tiled, path)(images)
            assert actual.anomaly_map.shape[-2:] == size
            torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, atol=1e-6, rtol=0)
            torch.testing.assert_close(actual.pred_score, expected.pred_score, atol=1e-6, rtol=0)


def test_tiled_map_has_the_images_size_and_both_paths_agree() -> None:
    model = _model(tiling={"tile_size": 112, "tile_overlap": 14})
    model.pre_processor.export_transform = model.pre_processor.transform  # same resize in both paths
    images = torch.rand(2, 3, 130, 250, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        step, exported = model._predict(images), model(images)
    assert step.anomaly_map.shape == (2, 1, 130, 250)
    torch.testing.assert_close(exported.anomaly_map, step.anomaly_map)
    top = step.anomaly_map.flatten(1).topk(max(1, int(130 * 250 * 0.001)), dim=1).values.mean(1)
    torch.testing.assert_close(step.pred_score, top)  # top-0.1 % mean of the full map


def test_tiles_reach_the_teacher_in_chunks_of_tile_batch_size() -> None:
    chunked, at_once = (
        _model(tiling={"tile_size": SIZE, "tile_batch_size": 4}),
        _model(tiling={"tile_size": SIZE, "tile_batch_size": 100}),
    )
    at_once.load_state_dict(chunked.state_dict())
    images = torch.rand(1, 3, 130, 250, generator=torch.Generator().manual_seed(3))
    assert chunked.tiling.layout(130, 250).count == 15
    teacher = TeacherCalls(chunked)
    with torch.no_grad():
        expected, actual = at_once._predict(images), chunked._predict(images)
    assert teacher.batches == [4, 4, 4, 3]
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, atol=1e-5, rtol=0)


def _largest_student_batch(model: TransformerStudent) -> list[int]:
    """A live list whose only element is the most tokens' rows (tiles) the forward student has seen at once."""
    largest = [0]

    def record(_module: torch.nn.Module, inputs: tuple[torch.Tensor], _output: object) -> None:
        largest[0] = max(largest[0], len(inputs[0]))

    model.model.forward_student.register_forward_hook(record)
    return largest


def test_tiled_prediction_holds_one_chunks_tokens_and_gives_the_whole_batchs_maps() -> None:
    """Tiles are scored chunk by chunk (only their scores kept), and the maps are those of all tiles at once."""
    model = _model(tiling={"tile_size": SIZE, "tile_overlap": 14, "tile_batch_size": 4})
    images = torch.rand(2, 3, 130, 250, generator=torch.Generator().manual_seed(4))
    tiles, layout = model.pre_processor.teacher_input(images)
    assert len(tiles) == 2 * layout.count > 4
    largest = _largest_student_batch(model)
    with torch.no_grad():
        actual = model._predict(images)
        assert largest == [4]  # never more than tile_batch_size tiles' tokens at once
        model.model.teacher_batch_size = None
        shallow, deep = model.model.teacher_features(tiles)  # all tiles at once, as before chunking
        expected = model.model.predict(shallow, deep, tuple(tiles.shape[-2:]), layout=layout)
    assert largest == [len(tiles)]
    assert actual.anomaly_map.shape == (2, 1, 130, 250)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, atol=1e-5, rtol=0)
    torch.testing.assert_close(actual.pred_score, expected.pred_score, atol=1e-5, rtol=0)


def _fit_steps(model: TransformerStudent, batches: list, steps: int) -> list[float]:
    """Train ``model`` for ``steps`` batches with a plain Lightning trainer; return the logged ``train_loss``."""
    losses: list[float] = []

    class Losses(Callback):
        def on_train_batch_end(self, trainer: Trainer, *_args: object) -> None:
            losses.append(float(trainer.callback_metrics["train_loss_step"]))

    trainer = make_trainer(max_steps=steps, callbacks=[Losses()])
    trainer.fit(model.train(), train_dataloaders=DataLoader(batches, batch_size=None))
    return losses


def test_tiled_training_steps_chunk_by_chunk_as_one_step_over_all_tiles() -> None:
    """With tiling, the students see at most ``tile_batch_size`` tiles at once; weights and loss are as unchunked."""
    generator = torch.Generator().manual_seed(5)
    batches = [
        ImageBatch(image=torch.rand(2, 3, 112, 140, generator=generator), image_path=[f"{step}-a", f"{step}-b"])
        for step in range(3)
    ]
    options = {"feature_cache": False, "lr": 1e-3}
    reference = _model(**options, tiling={"tile_size": SIZE, "tile_batch_size": 100})
    reference.automatic_optimization = True  # the whole batch's tiles in one loss, unchunked
    assert reference.tiling.layout(112, 140).count == 6  # 12 tiles per batch
    expected = _fit_steps(reference, batches, 3)
    for tile_batch_size in (1, 5, 100):
        model = _model(**options, tiling={"tile_size": SIZE, "tile_batch_size": tile_batch_size})
        assert not model.automatic_optimization
        largest = _largest_student_batch(model)
        losses = _fit_steps(model, batches, 3)
        assert largest == [min(tile_batch_size, 12)]
        torch.testing.assert_close(losses, expected, atol=1e-6, rtol=0)
        for name, weights in model.model.named_parameters():
            if "student" in name:
                torch.testing.assert_close(weights, reference.model.get_parameter(name), atol=1e-5, rtol=0)
        initial = _model(**options).model.forward_student.state_dict()
        assert not torch.equal(model.model.forward_student.state_dict()["layers.0.weight"], initial["layers.0.weight"])


@pytest.mark.parametrize(
    ("option", "named"), [("gradient_clip_val", "gradient clipping"), ("accumulate_grad_batches", "accumulation")]
)
def test_tiled_training_refuses_the_trainers_automatic_clipping_and_accumulation(option: str, named: str) -> None:
    """Tiled training steps by hand (chunk by chunk): Lightning refuses what only its automatic optimisation does."""
    trainer = make_trainer(max_steps=1, **{option: 2})
    batches = [ImageBatch(image=torch.rand(1, 3, 112, 112), image_path=["a"])]
    with pytest.raises(MisconfigurationException, match=f"{named} is not supported for manual optimization"):
        trainer.fit(
            _model(tiling={"tile_size": SIZE}, feature_cache=False),
            train_dataloaders=DataLoader(batches, batch_size=None),
        )


@pytest.mark.parametrize("purpose", ["training", "evaluation"])
def test_feature_caches_serve_a_chunk_of_a_batchs_tiles_under_the_tiles_keys(tmp_path: Path, purpose: str) -> None:
    """A chunk of tiles (``tiles=``) reads and writes the very entries the whole batch's call does."""
    paths = []
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(name.encode())
        paths.append(str(tmp_path / name))
    callback = FeatureCacheCallback()
    root = CacheRoot(tmp_path / "cache")
    slot = callback._caches[purpose]
    slot.store, slot.active = FeatureStore(root, root.create_run({}), dtype=slot.dtype), True
    tiles = torch.rand(2 * 3, 3, 4, 4, generator=torch.Generator().manual_seed(6))  # 2 images, 3 tiles each
    seen = []

    def teacher(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(len(images))
        return images.flatten(2).mT, -images.flatten(2).mT

    chunked = [callback.tokens(purpose, tiles[4:], paths, teacher, 3, tiles=range(4, 6))]  # second image's tiles 1, 2
    whole = callback.tokens(purpose, tiles, paths, teacher, 3)
    assert seen == [2, 4]  # only the four other tiles were computed
    chunked = [
        callback.tokens(purpose, tiles[part.start : part.stop], paths, teacher, 3, tiles=part)
        for part in (range(0, 4), range(4, 6))
    ]
    assert seen == [2, 4]  # all from the cache
    for index in (0, 1):
        torch.testing.assert_close(torch.cat([part[index] for part in chunked]), whole[index], atol=1e-3, rtol=0)
    torch.testing.assert_close(whole[0], teacher(tiles)[0], atol=1e-3, rtol=0)
    slot.store.close()


def test_uniform_image_gives_a_map_without_seams_at_tile_borders() -> None:
    """Without positional embedding, a uniform image gives every patch the same score: the map is flat.

    Flat across tile borders too, where tiles smoothed one by one (with the zero padding the smoothing
    has at a map's border) would dip.
    """
    model = _model(tiling={"tile_size": SIZE})
    model.model.teacher.backbone.pos_embed.data.zero_()
    image = torch.full((1, 3, 4 * SIZE, 5 * SIZE), 0.5)  # 4 x 5 tiles, no padding
    with torch.no_grad():
        anomaly_map = model._predict(image).anomaly_map[0, 0]
    reach = 40  # the smoothing's reach from the image's border, where it falls off as the whole-image map does
    interior = anomaly_map[reach:-reach, reach:-reach]
    assert interior.std() < 1e-5 * interior.mean()

    # What the test guards against: each tile's map smoothed on its own, then placed.
    layout = model.tiling.layout(*image.shape[-2:])
    single = model.model.anomaly_map_generator.smooth(torch.full((1, 4, 4), float(interior.mean())), (SIZE, SIZE))
    placed = single[0, 0].repeat(4, 5)
    assert layout.count == 20
    assert placed[reach:-reach, reach:-reach].std() > 0.05 * interior.mean()


def test_tiling_options_from_the_constructor() -> None:
    model = _model(tiling={"tile_size": 112, "tile_overlap": 14})
    assert (model.tiling.tile_size, model.tiling.overlap) == (112, 14)
    assert model.hparams["tiling"]["tile_size"] == 112  # checkpoints rebuild the tiled model
    fingerprints = {feature_fingerprint(m, "weights", "training", "float16", None) for m in (model, _model())}
    assert _model().tiling is None and len(fingerprints) == 2  # the tiling is part of the features' fingerprint


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"tiling": {"tile_size": 8}}, "tile_size=8 is smaller than one 14-px patch"),
        ({"tiling": {"tile_size": 101}}, "use tile_size=100 or 104"),  # SIZE 56: 4 x 4 patches
        ({"tiling": {"tile_size": 102}}, "use tile_size=100 or 104"),
        ({"tiling": {"tile_size": 112, "tile_overlap": -1}}, "tile_overlap=-1 must be a non-negative"),
        ({"tiling": {"tile_size": 112, "tile_overlap": 112}}, "not smaller than tile_size=112"),
        ({"tiling": {"tile_size": 112, "tile_overlap": 100}}, "rounded up to whole 28-px patches: 112"),
        ({"tiling": {"tile_overlap": 14}}, "set tile_size too"),
        ({"tiling": {"tile_size": 112}, "full_resolution_maps": False}, "needs full_resolution_maps=True"),
        ({"tiling": {"tile_size": 112}, "pre_processor": False}, "needs the model's own pre-processor"),
        ({"tiling": {"tile_size": 112, "tile_batch_size": 0}}, "tile_batch_size must be a positive integer, got 0"),
    ],
)
def test_bad_tiling_fails_at_construction_naming_the_setting(options: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
        small_model(image_size=SIZE, layers=(1, 3), **options)


def test_too_many_tiles_fail_naming_a_tile_size_that_works() -> None:
    tiling = Tiling(56, image_size=56, patch_size=14, max_tiles=16)
    with pytest.raises(ValueError, match=r"cuts a 400 x 300 image into 48 tiles, more than the maximum of 16") as error:
        tiling.layout(300, 400)
    suggested = int(str(error.value).split("use tile_size=")[1].split()[0])
    assert Tiling(suggested, image_size=56, patch_size=14, max_tiles=16).layout(300, 400).count <= 16
    with pytest.raises(ValueError, match="more than the maximum of 16"):
        Tiling(suggested - 4, image_size=56, patch_size=14, max_tiles=16).layout(300, 400)


def test_too_many_tiles_are_refused_before_any_work(tmp_path: Path) -> None:
    Image.new("RGB", (8000, 2000)).save(tmp_path / "strip.png")
    checks = DataChecks(input_size=SIZE, patch_size=14, tiling=Tiling(56, image_size=SIZE, patch_size=14))
    with pytest.raises(ValueError, match=r"tile_size=56 cuts a 8000 x 2000 image into \d+ tiles.*use tile_size="):
        checks.check_dataset(PredictDataset(tmp_path), "predict")
    model = _model(tiling={"tile_size": 56})
    with pytest.raises(ValueError, match="tile_size=56 cuts a 8000 x 2000 image"):
        model.to_onnx(tmp_path / "export", input_size=(2000, 8000))
    assert not (tmp_path / "export").exists()
