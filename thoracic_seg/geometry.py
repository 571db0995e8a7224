"""A CT grid as SimpleITK describes it, and a mask stored as a box inside such a grid."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


COORD_TOLERANCE = 1e-6  # voxels / mm: absorbs float noise of NIfTI headers (float32) and DS strings


@dataclass(frozen=True)
class Grid:
    """A CT grid as SimpleITK describes it: ``size`` (x, y, z) voxels, ``spacing`` (x, y, z) mm,
    ``origin`` = LPS mm of voxel (0, 0, 0), ``direction`` 3x3 row-major with the axis directions
    as columns. Patient position of continuous index (i, j, k):
    ``origin + direction @ (spacing * (i, j, k))``; integer indices are voxel centres."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: Any) -> "Grid":
        """From a SimpleITK image or an ``ImageFileReader`` after ``ReadImageInformation()``."""
        if image.GetDimension() != 3:
            raise ValueError(f"need a 3D image, got {image.GetDimension()}D")
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return self.size[2], self.size[1], self.size[0]

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return self.spacing[2], self.spacing[1], self.spacing[0]

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    @functools.cached_property
    def index_to_lps(self) -> np.ndarray:
        """3x3 matrix ``direction @ diag(spacing)``: continuous index (i, j, k) -> LPS offset, mm."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3) * np.asarray(self.spacing)

    def continuous_index(self, points_lps: np.ndarray) -> np.ndarray:
        """(N, 3) LPS mm -> (N, 3) continuous voxel index (i=x column, j=y row, k=z slice)."""
        offsets = np.asarray(points_lps, dtype=np.float64) - np.asarray(self.origin)
        return np.linalg.solve(self.index_to_lps, offsets.T).T


@dataclass
class BoxMask:
    """A boolean mask that is zero outside ``array``; ``offset`` = (z, y, x) voxel of ``array[0, 0, 0]``."""

    offset: tuple[int, int, int]
    array: np.ndarray  # bool (dz, dy, dx)

    @classmethod
    def empty(cls) -> "BoxMask":
        return cls((0, 0, 0), np.zeros((0, 0, 0), dtype=bool))

    @property
    def box(self) -> tuple[slice, slice, slice]:
        return tuple(slice(o, o + n) for o, n in zip(self.offset, self.array.shape))  # type: ignore[return-value]

    def count(self) -> int:
        return int(np.count_nonzero(self.array))

    def to_full(self, shape_zyx: Sequence[int]) -> np.ndarray:
        """The mask on the whole grid, bool (Z, Y, X)."""
        full = np.zeros(tuple(shape_zyx), dtype=bool)
        if self.array.size:
            full[self.box] = self.array
        return full

    def union(self, other: "BoxMask") -> "BoxMask":
        if not other.array.size:
            return self
        if not self.array.size:
            return other
        lo = np.minimum(self.offset, other.offset)
        hi = np.maximum(np.add(self.offset, self.array.shape), np.add(other.offset, other.array.shape))
        out = BoxMask(tuple(int(v) for v in lo), np.zeros(tuple(hi - lo), dtype=bool))
        for part in (self, other):
            start = np.subtract(part.offset, lo)
            region = tuple(slice(s, s + n) for s, n in zip(start, part.array.shape))
            out.array[region] |= part.array
        return out
