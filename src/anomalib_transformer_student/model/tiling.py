"""Tiling: large images inspected at their own resolution, tile by tile, with one seamless map.

A 4000 x 3000 image resized to 1036 px as a whole loses three quarters of its resolution, and a
5-pixel defect shrinks below one pixel. With tiling, the image is cut into ``tile_size`` squares
(in pixels of the original image), each resized to the teacher's ``image_size``, so
``tile_size == image_size`` inspects it at its native resolution.

Geometry. The image is edge-padded (centred, as anomalib's ``SquarePad`` places it) to a canvas
whose sides are multiples of the patch stride ``tile_size / grid`` (the original pixels one teacher
patch covers) and at least one tile. Tiles start at multiples of the patch stride, spread evenly
from one border of the canvas to the other, neighbours sharing at least ``overlap`` pixels, so any
size is covered completely and no tile is distorted. Because all tiles' patches lie on one grid,
their patch scores are stitched into one patch grid of the whole canvas (averaged where tiles
overlap); the map is upsampled and smoothed once, at full resolution, and cropped to the image, as
the whole-image path does with its square padding. There is no seam to hide: the smoothing never
sees a tile border.

An image that fits in one tile (both sides at most ``tile_size``) goes whole, exactly as without
tiling (:meth:`Tiling.layout` returns ``None``).

The user's options come as one group, :class:`TilingSettings` (``tiling`` of ``TransformerStudent``);
:meth:`TilingSettings.geometry` turns them into the :class:`Tiling` of a teacher.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch.nn import functional

from ..training.settings import positive_int

logger = logging.getLogger(__name__)

MAX_TILES_PER_IMAGE = 256


@dataclass(frozen=True)
class TilingSettings:
    """How large images are inspected tile by tile (``TransformerStudent``'s ``tiling``).

    On the anomalib CLI ``--model.tiling.tile_size 518``; in YAML ``tiling: {tile_size: 518}``; in Python
    ``TransformerStudent(tiling=TilingSettings(tile_size=518))`` or ``tiling={"tile_size": 518}``.

    Args:
        tile_size: The side of a tile in pixels of the original image, each tile resized to the model's
            ``image_size`` for the teacher (``tile_size == image_size`` is native resolution; larger tiles
            trade resolution for speed). A multiple of the teacher's patch grid (``image_size / 14`` for
            DINOv2, e.g. 74 at 1036 px). Images that fit in one tile go whole, as without tiling; the tiles'
            patch scores make one patch map of the image, upsampled and smoothed once at full resolution. At
            most ``MAX_TILES_PER_IMAGE`` (256) tiles per image. In training every tile of every image trains
            the students. ``None`` (default) inspects each image whole. Needs the model's default
            pre-processor and ``full_resolution_maps``.
        tile_overlap: Pixels of the original image that neighbouring tiles share at least (rounded up to
            whole patches); tiles are spread evenly to cover the image, so they often share more. Where tiles
            overlap, their patch scores are averaged.
        tile_batch_size: Most tiles the teacher takes at once in training and evaluation (a batch's tiles run
            in chunks of this size): bounds the teacher's memory, and on CPUs keeps the cost per tile that of a
            small batch. Exported graphs run all tiles of a batch at once.

    Example:
        >>> TilingSettings(tile_size=518).geometry(image_size=518, patch_size=14).grid
        37
        >>> TilingSettings(tile_overlap=28)
        Traceback (most recent call last):
        ValueError: tile_overlap=28 applies to tiles only: set tile_size too, or drop tile_overlap.
    """

    tile_size: int | None = None
    tile_overlap: int = 0
    tile_batch_size: int = 8

    def __post_init__(self) -> None:
        positive_int("tile_batch_size", self.tile_batch_size)
        if self.tile_size is None and self.tile_overlap:
            msg = f"tile_overlap={self.tile_overlap} applies to tiles only: set tile_size too, or drop tile_overlap."
            raise ValueError(msg)

    def geometry(
        self, image_size: int, patch_size: int, own_pre_processor: bool = True, full_resolution_maps: bool = True
    ) -> Tiling | None:
        """The :class:`Tiling` for a teacher of ``image_size`` and ``patch_size``, ``None`` without ``tile_size``.

        Raises:
            ValueError: If tiling is asked for with a custom pre-processor or without full-resolution maps.
        """
        tile_size = self.tile_size
        if tile_size is None:
            return None
        if not own_pre_processor:
            msg = (
                f"tile_size={tile_size} needs the model's own pre-processor, which tiles images at their original "
                "size: drop the custom pre_processor, or drop tile_size."
            )
            raise ValueError(msg)
        if not full_resolution_maps:
            msg = (
                f"tile_size={tile_size} returns maps at each image's own size: it needs full_resolution_maps=True "
                "(the default)."
            )
            raise ValueError(msg)
        tiling = Tiling(tile_size, self.tile_overlap, image_size=image_size, patch_size=patch_size)
        logger.info(
            "Images larger than %d x %d px are inspected in %d-px tiles, each resized to %d px for the teacher "
            "(neighbours share at least %d px; at most %d tiles per image).",
            tile_size,
            tile_size,
            tile_size,
            image_size,
            tiling.overlap,
            tiling.max_tiles,
        )
        return tiling


@dataclass(frozen=True)
class TileLayout:
    """Where the tiles of one image size lie.

    Attributes:
        image: ``(height, width)`` of the image.
        canvas: ``(height, width)`` of the edge-padded canvas the tiles cut.
        offset: ``(top, left)`` of the image in the canvas.
        tile: Side of a tile in image pixels.
        grid: Patches along a tile's side (the teacher's patch grid).
        origins: Top-left corner ``(y, x)`` of each tile in canvas pixels, row by row.
    """

    image: tuple[int, int]
    canvas: tuple[int, int]
    offset: tuple[int, int]
    tile: int
    grid: int
    origins: tuple[tuple[int, int], ...]

    @property
    def count(self) -> int:
        """Number of tiles."""
        return len(self.origins)

    @property
    def stride(self) -> int:
        """Image pixels per teacher patch."""
        return self.tile // self.grid

    @property
    def canvas_grid(self) -> tuple[int, int]:
        """The patch grid of the whole canvas."""
        return self.canvas[0] // self.stride, self.canvas[1] // self.stride

    @property
    def window(self) -> tuple[int, int, int, int]:
        """``(top, left, height, width)`` of the image in the canvas."""
        return (*self.offset, *self.image)


class Tiling:
    """Cut images into tiles for the teacher and stitch the tiles' patch scores into one grid.

    Args:
        tile_size: Side of a tile in pixels of the original image: a multiple of the teacher's patch
            grid (``image_size / patch_size`` patches per side), so that all tiles' patches line up.
        overlap: Pixels that neighbouring tiles share at least; rounded up to whole patches.
        image_size: Side of the square each tile is resized to for the teacher.
        patch_size: The teacher's patch size.
        max_tiles: Most tiles one image may be cut into.

    Raises:
        ValueError: If ``tile_size`` is smaller than one patch or not a multiple of the patch grid, or
            ``overlap`` is negative or (rounded to whole patches) not smaller than ``tile_size``; the
            message names valid values.

    Example:
        >>> tiling = Tiling(224, image_size=224, patch_size=14)
        >>> layout = tiling.layout(1000, 1400)
        >>> layout.count, layout.canvas, layout.canvas_grid
        (35, (1008, 1400), (72, 100))
        >>> tiling.layout(200, 150) is None  # fits in one tile: goes whole
        True
        >>> tiles = tiling.split(torch.rand(2, 3, 1000, 1400), layout)
        >>> tiles.shape
        torch.Size([70, 3, 224, 224])
        >>> stitch(torch.rand(70, 16, 16), layout).shape
        torch.Size([2, 72, 100])
    """

    def __init__(
        self,
        tile_size: int,
        overlap: int = 0,
        *,
        image_size: int,
        patch_size: int,
        max_tiles: int = MAX_TILES_PER_IMAGE,
    ) -> None:
        self.grid = image_size // patch_size
        if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < patch_size:
            msg = (
                f"tile_size={tile_size!r} is smaller than one {patch_size}-px patch of the teacher: use a tile of at "
                f"least {_round_up(patch_size, self.grid)} px (tile_size={image_size} inspects at native resolution "
                f"with image_size={image_size}), or tile_size=None to inspect each image whole."
            )
            raise ValueError(msg)
        if tile_size % self.grid:
            below = max(self.grid * (tile_size // self.grid), _round_up(patch_size, self.grid))
            msg = (
                f"tile_size={tile_size} must be a multiple of {self.grid} (the teacher's {self.grid} x {self.grid} "
                f"patch grid at image_size={image_size}), so that the patches of all tiles line up: use "
                f"tile_size={below} or {below + self.grid}."
            )
            raise ValueError(msg)
        stride = tile_size // self.grid
        if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
            msg = f"tile_overlap={overlap!r} must be a non-negative number of pixels, e.g. tile_overlap={stride}."
            raise ValueError(msg)
        rounded = _round_up(overlap, stride)
        if rounded >= tile_size:
            msg = (
                f"tile_overlap={overlap} (rounded up to whole {stride}-px patches: {rounded}) is not smaller than "
                f"tile_size={tile_size}: use at most tile_overlap={tile_size - stride}, e.g. "
                f"tile_overlap={_round_up(tile_size // 4, stride)}."
            )
            raise ValueError(msg)
        self.tile_size = tile_size
        self.overlap = overlap
        self.image_size = image_size
        self.patch_size = patch_size
        self.max_tiles = max_tiles
        self.stride = stride
        self._step = (tile_size - rounded) // stride  # most patches from one tile's start to the next's

    @property
    def spec(self) -> dict[str, int]:
        """What shapes the tiles (for the teacher-feature cache's fingerprint)."""
        return {"tile_size": self.tile_size, "tile_overlap": self.overlap}

    def fits(self, height: int, width: int) -> bool:
        """Whether an image of this size fits in one tile (and so goes whole, as without tiling)."""
        return height <= self.tile_size and width <= self.tile_size

    def layout(self, height: int, width: int) -> TileLayout | None:
        """The tiles of a ``height`` x ``width`` image, or ``None`` when it fits in one tile.

        Raises:
            ValueError: If the image would be cut into more than ``max_tiles`` tiles; the message
                names a ``tile_size`` that stays within it.
        """
        if self.fits(height, width):
            return None
        canvas, (rows, columns) = self._canvas_and_origins(height, width)
        count = len(rows) * len(columns)
        if count > self.max_tiles:
            msg = (
                f"tile_size={self.tile_size} cuts a {width} x {height} image into {count} tiles, more than the "
                f"maximum of {self.max_tiles} per image: use tile_size={self._smallest_tile_within(height, width)} "
                "or larger (with a larger image_size to keep the resolution), or crop the images."
            )
            raise ValueError(msg)
        return TileLayout(
            image=(height, width),
            canvas=canvas,
            offset=((canvas[0] - height) // 2, (canvas[1] - width) // 2),
            tile=self.tile_size,
            grid=self.grid,
            origins=tuple((y, x) for y in rows for x in columns),
        )

    def _canvas_and_origins(
        self, height: int, width: int
    ) -> tuple[tuple[int, int], tuple[tuple[int, ...], tuple[int, ...]]]:
        """The canvas of an image larger than one tile, and the tiles' starts along its rows and columns."""
        rows, columns = (max(self.tile_size, _round_up(side, self.stride)) for side in (height, width))
        return (rows, columns), (self._origins(rows), self._origins(columns))

    def _origins(self, length: int) -> tuple[int, ...]:
        """Tile starts along a canvas side: whole patches, evenly spread, the last tile ending at the border."""
        patches = (length - self.tile_size) // self.stride
        intervals = math.ceil(patches / self._step)
        if intervals == 0:
            return (0,)
        return tuple(self.stride * (index * patches // intervals) for index in range(intervals + 1))

    def _smallest_tile_within(self, height: int, width: int) -> int:
        """The smallest valid ``tile_size`` (same overlap) that cuts the image into at most ``max_tiles`` tiles."""
        tile = self.tile_size
        while True:
            tile += self.grid
            try:
                candidate = Tiling(tile, self.overlap, image_size=self.image_size, patch_size=self.patch_size)
            except ValueError:  # an overlap too large for this tile
                continue
            if candidate.fits(height, width) or candidate.count(height, width) <= self.max_tiles:
                return tile

    def count(self, height: int, width: int) -> int:
        """Number of tiles of a ``height`` x ``width`` image (1 when it fits in one tile), without the maximum."""
        if self.fits(height, width):
            return 1
        _, (rows, columns) = self._canvas_and_origins(height, width)
        return len(rows) * len(columns)

    def split(self, images: torch.Tensor, layout: TileLayout) -> torch.Tensor:
        """Cut images ``(B, C, H, W)`` into tiles ``(B * count, C, tile, tile)``, each image's tiles in a row.

        The canvas is edge-padded, as anomalib's ``SquarePad`` pads.
        """
        (top, left), (canvas_height, canvas_width) = layout.offset, layout.canvas
        height, width = layout.image
        padding = (left, canvas_width - width - left, top, canvas_height - height - top)
        canvas = functional.pad(images, padding, mode="replicate") if any(padding) else images
        tiles = [canvas[..., y : y + layout.tile, x : x + layout.tile] for y, x in layout.origins]
        return torch.stack(tiles, dim=1).flatten(0, 1)


def stitch(patch_maps: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """The tiles' patch maps ``(B * count, grid, grid)`` as one patch map ``(B, h, w)`` of the whole canvas.

    Each tile's patches land on the canvas's patch grid; where tiles overlap, their scores are
    averaged. Written as a sum of padded tiles, which exports as plain pads and adds.
    """
    grid = layout.grid
    rows, columns = layout.canvas_grid
    maps = patch_maps.reshape(-1, layout.count, grid, grid)
    total = patch_maps.new_zeros(maps.shape[0], rows, columns)
    coverage = patch_maps.new_zeros(rows, columns)
    ones = patch_maps.new_ones(grid, grid)
    for index, (y, x) in enumerate(layout.origins):
        top, left = y // layout.stride, x // layout.stride
        padding = (left, columns - grid - left, top, rows - grid - top)
        total = total + functional.pad(maps[:, index], padding)
        coverage = coverage + functional.pad(ones, padding)
    return total / coverage


def _round_up(value: int, multiple: int) -> int:
    return multiple * math.ceil(value / multiple)
