"""SiameseSpatial: compare the two sides position by position, not as one flattened vector.

A small shared conv trunk (3x3 conv + BatchNorm + ReLU blocks with zero padding, downsampling
by ``stride``, then ``blocks`` more at the feature resolution and a 1x1 projection to
``features`` channels) turns every lighting tile of each side into a feature map; each tile is
processed on its own, so features never mix lightings and a test tile is only ever compared
with the same lighting's golden tile. At every position of a tile, the test feature is matched
with the nearest golden feature within a ``neighbourhood`` x ``neighbourhood`` window, and the
golden feature with the nearest test one (a defect that removes copper and one that adds it
both leave a feature without a match), which tolerates the misalignment of real AOI shots of
up to ``neighbourhood // 2`` feature cells. The pair's distance is the largest of these
per-position distances over all positions and tiles: one small local defect decides, as it
does on the line, instead of being averaged away with every other feature.

The tiles enter the trunk as they are. Standardising each tile by its own mean and spread (as
this model did first) turned the few pixels of an edge at the border of an otherwise uniform
tile into the largest distance of a board, and subtracting the mean alone ranked real boards
worse too (DeepPCB scans, benchmarks/RESULTS.md): a lamp's drift between shots is learned from
the pairs instead.

No layer depends on the image size; the weights are tens of thousands, not millions. The
forward pass returns the distance itself (``(B,)``), which is also the exported graph's only
output.
"""

from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

SQUARED_EPS = 1e-12  # keeps the gradient of sqrt finite at zero (identical sides)
WINDOW_CHUNK = 8  # tiles per step of the training's nearest-neighbour search: its temporaries stay in cache


def _block(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class SiameseSpatial(nn.Module):
    """Shared conv trunk per lighting tile; distance = max over positions of the neighbourhood
    nearest-feature distance between the sides, both ways."""

    output_names = ("distance",)

    def __init__(self, tiles: tuple[int, int], *, width: int = 32, stride: int = 2,
                 neighbourhood: int = 3, blocks: int = 2, features: int = 16) -> None:
        """``tiles``: (rows, columns) of lighting images in each assembled input; ``stride``:
        2 or 4 (the trunk's total downsampling); ``neighbourhood``: odd window size (1 = no shift
        tolerance); ``width``: the trunk's channels; ``blocks``: 3x3 blocks at the feature
        resolution after the two that downsample; ``features``: channels of the compared maps."""
        super().__init__()
        if stride not in (2, 4):
            raise ValueError(f"stride must be 2 or 4, got {stride}")
        if neighbourhood < 1 or neighbourhood % 2 == 0:
            raise ValueError(f"neighbourhood must be an odd number >= 1, got {neighbourhood}")
        if blocks < 0:
            raise ValueError(f"blocks must be >= 0, got {blocks}")
        self.tiles = tiles
        self.neighbourhood = neighbourhood
        half = max(1, width // 2)
        first_stride = 1 if stride == 2 else 2  # stride 4 halves the (costliest) first block's output
        self.trunk = nn.Sequential(*_block(3, half, first_stride), *_block(half, width, 2),
                                   *(layer for _ in range(blocks) for layer in _block(width, width, 1)))
        self.project = nn.Conv2d(width, features, kernel_size=1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """One side: ``(B, 3, H', W')`` assembled inputs -> ``(B * tiles, features, h, w)`` per-tile
        maps. A golden's maps can be kept and compared with many test shots (:meth:`compare`)."""
        rows, columns = self.tiles
        _, channels, height, width = images.shape
        tile_height, tile_width = height // rows, width // columns
        tiles = images.reshape(-1, channels, rows, tile_height, columns, tile_width)
        tiles = tiles.permute(0, 2, 4, 1, 3, 5).reshape(-1, channels, tile_height, tile_width)
        # NHWC: the layout oneDNN and cuDNN convolve fastest, and the matching's channel sums
        # run along contiguous memory
        return self.project(self.trunk(tiles.contiguous(memory_format=torch.channels_last)))

    def compare(self, test_maps: torch.Tensor, golden_maps: torch.Tensor) -> torch.Tensor:
        """The pair distance ``(B,)`` of two sides' :meth:`embed` maps (``(B * tiles, ...)`` each)."""
        squared = torch.maximum(*self._nearest_both_ways(test_maps, golden_maps))
        per_pair = squared.reshape(-1, self.tiles[0] * self.tiles[1] * squared[0].numel()).amax(dim=1)
        return torch.sqrt(per_pair + SQUARED_EPS)

    def forward(self, test: torch.Tensor, golden: torch.Tensor) -> torch.Tensor:
        """Per-pair defect score ``(B,)``: larger means more different from the golden."""
        both = self.embed(torch.cat([test, golden]))  # one pass: shared BatchNorm statistics
        return self.compare(*both.chunk(2))

    def distance(self, test: torch.Tensor, golden: torch.Tensor) -> torch.Tensor:
        """The same as calling the model: the per-pair distance ``(B,)``."""
        return self(test, golden)

    def _nearest_both_ways(self, test: torch.Tensor,
                           golden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per position: the squared L2 distance from the test feature to the nearest golden one
        within the neighbourhood, and from the golden feature to the nearest test one (windows
        clamped at the tile's edges)."""
        if self.neighbourhood == 1:
            squared = (test - golden).pow(2).sum(dim=1)
            return squared, squared
        if self.training:
            return self._nearest_chosen(test, golden), self._nearest_chosen(golden, test)
        return self._window_minima(test, golden)

    def _padded(self, maps: torch.Tensor) -> torch.Tensor:
        """``maps`` padded by the window's reach, edges repeated (a window clamped at the edges)."""
        reach = self.neighbourhood // 2
        return F.pad(maps, (reach, reach, reach, reach), mode="replicate")

    def _window_minima(self, test: torch.Tensor, golden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both ways of :meth:`_nearest_both_ways` from one pass over the window: the distance
        from test position p to golden p + s is the distance from golden p + s to test p, so each
        shift's distances are computed once and read shifted back for the golden side. The edge
        repeats of a clamped window only duplicate cells inside it, so the golden side takes its
        minimum over the cells inside the tile alone (the others read as the largest float)."""
        reach, (height, width) = self.neighbourhood // 2, test.shape[-2:]
        largest = torch.finfo(test.dtype).max
        test_side, golden_side = None, None
        for cell, squared in enumerate(self._window_squared(test, self._padded(golden))):
            row, column = divmod(cell, self.neighbourhood)
            # squared[p] pairs test p, golden p + s (s = (row, column) - reach): golden q reads squared[q - s]
            top, left = 2 * reach - row, 2 * reach - column
            seen_from_golden = F.pad(squared, (reach, reach, reach, reach), value=largest)[
                ..., top:top + height, left:left + width]
            if test_side is None:
                test_side, golden_side = squared, seen_from_golden
            else:
                test_side = torch.minimum(test_side, squared)
                golden_side = torch.minimum(golden_side, seen_from_golden)
        return test_side, golden_side

    def _nearest_chosen(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Training's one-way nearest distance: each position's nearest neighbour is found without
        autograd, then only that distance is computed with it. The value and the gradient are
        those of the minimum (its gradient flows to the chosen neighbour alone), at a fraction of
        the memory and time."""
        padded = self._padded(target)
        with torch.no_grad():
            parts = zip(source.split(WINDOW_CHUNK), padded.split(WINDOW_CHUNK), strict=True)
            choice = torch.cat([self._window_choice(*part) for part in parts])
        tiles, channels, height, width = source.shape
        rows = torch.arange(height, device=source.device).view(height, 1) + choice // self.neighbourhood
        columns = torch.arange(width, device=source.device).view(1, width) + choice % self.neighbourhood
        # gathered position by position in (tile, position, channel) order: no copy of channels_last maps
        index = (rows * padded.shape[-1] + columns).view(tiles, -1, 1).expand(-1, -1, channels)
        matched = _positions(padded).gather(1, index)
        return (_positions(source) - matched).pow(2).sum(dim=2).view(tiles, height, width)

    def _window_squared(self, source: torch.Tensor, padded: torch.Tensor) -> Iterator[torch.Tensor]:
        """Squared distances from each ``source`` position to each cell of the window around it
        in ``padded`` (the target padded by the reach), window cells in row-major order."""
        height, width = source.shape[-2:]
        for cell in range(self.neighbourhood ** 2):
            row, column = divmod(cell, self.neighbourhood)
            yield (source - padded[..., row:row + height, column:column + width]).pow(2).sum(dim=1)

    def _window_choice(self, source: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
        """Which window cell (row-major index) is nearest to each position."""
        nearest, choice = None, None
        for cell, squared in enumerate(self._window_squared(source, padded)):
            if nearest is None:
                nearest, choice = squared, torch.zeros_like(squared, dtype=torch.long)
            else:
                closer = squared < nearest
                nearest = torch.where(closer, squared, nearest)
                choice = torch.where(closer, cell, choice)
        return choice


def _positions(features: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, H * W, C)``: a view of a channels_last map, a copy of any other."""
    return features.permute(0, 2, 3, 1).reshape(features.shape[0], -1, features.shape[1])
