"""Phase 4 (loading): a PyTorch dataset of axial slices read through memory maps of the phase 3
training cache (already in the network's LPS orientation, ``thoracic_seg/grid.py``), with
anatomy-safe augmentation and a tumour-oversampling sampler.

    ds = MultiOrganDataset("train", data_root="DATA", splits_dir="splits", augment=True)
    loader = DataLoader(ds, batch_size=16, sampler=make_tumour_oversampling_sampler(ds), num_workers=2)

Construction reads only each patient's ``meta.json`` and ``.npy`` headers; an item reads one slice
from a memory map each worker process opens on first use (nothing decompressed per item).
``compact=True`` items keep the cache's float16 / uint8 (4x less DataLoader transport, 12 MB per
batch of 16 at 256 px otherwise); :func:`batch_to_device` widens them on the training device.
``context_slices=K`` (2.5D) serves 2K + 1 channels by ``grid.context_indices``, the rule that
training, evaluation and prediction share; the mask is the middle slice's. ``ds[(i, seed)]`` is item i
augmented by a generator seeded with ``seed`` (what training's sampler asks for).
"""
from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, WeightedRandomSampler

from thoracic_seg import organs
from thoracic_seg.grid import (
    CACHE_CT_DTYPE, CACHE_MASK_DTYPE, cache_voxel_mm, check_context_slices, context_indices,
)
from thoracic_seg.layout import (
    CACHE_CT, CACHE_MASK, CACHE_META, DEFAULT_DATA_ROOT, DEFAULT_SPLITS_DIR, cache_dir, read_cache_meta,
)
from thoracic_seg.scanner import ScannerAugmentation, Units
from thoracic_seg.splits import SPLIT_NAMES, load_split

log = logging.getLogger(__name__)

DEFAULT_TUMOUR_FRACTION = 0.3
DEFAULT_MAX_OPEN_PATIENTS = 128  # two memory maps (two file descriptors) per open patient


def read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, bool]:
    """``(shape, dtype, fortran_order)`` of a ``.npy`` file, reading only its header."""
    fmt = np.lib.format
    with open(path, "rb") as handle:
        version = fmt.read_magic(handle)
        readers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"{path}: unsupported .npy format version {version}")
        shape, fortran, dtype = readers[version](handle)
    return tuple(shape), np.dtype(dtype), bool(fortran)


# ---- Augmentation ----------------------------------------------------------------------------
class SliceAugmentation:
    """Random in-plane rotation, scaling, optional elastic warp and intensity jitter of one slice.

    One transform and one jitter for every image channel (bilinear) and the mask (nearest neighbour), so
    labels move with the anatomy and no new label value appears. No left-right flip: lungs are labelled by
    side (3 right, 4 left) and a mirrored thorax is not an anatomy the model will meet. Outside the
    original slice the image gets its minimum (air) and the mask background.

    Args:
        max_rotation_deg: rotation drawn uniformly in [-max, +max] degrees.
        scale_range: isotropic zoom drawn uniformly in this range (1 = none).
        elastic_alpha: displacement amplitude as a fraction of the slice size (0 = no elastic warp).
        elastic_grid: control points per side of the smooth random displacement field.
        intensity_scale, intensity_shift: image * U(1 +- scale) + U(+- shift), in z-score units.
        p: probability of augmenting a given slice at all.
    """

    def __init__(
        self,
        max_rotation_deg: float = 10.0,
        scale_range: tuple[float, float] = (0.9, 1.1),
        elastic_alpha: float = 0.0,
        elastic_grid: int = 4,
        intensity_scale: float = 0.1,
        intensity_shift: float = 0.1,
        p: float = 0.8,
    ) -> None:
        if not 0 <= max_rotation_deg <= 30:
            raise ValueError(f"max_rotation_deg must be in [0, 30] (small), got {max_rotation_deg}")
        if not 0.5 <= scale_range[0] <= scale_range[1] <= 2.0:
            raise ValueError(f"scale_range must be (low, high) with 0.5 <= low <= high <= 2, "
                             f"got {scale_range}")
        if not 0 <= elastic_alpha <= 0.1:
            raise ValueError(f"elastic_alpha must be in [0, 0.1] of the slice size, got {elastic_alpha}")
        if elastic_grid < 2:
            raise ValueError(f"elastic_grid must be >= 2, got {elastic_grid}")
        if intensity_scale < 0 or intensity_shift < 0:
            raise ValueError(f"intensity jitter must be >= 0, got scale {intensity_scale}, "
                             f"shift {intensity_shift}")
        if not 0 <= p <= 1:
            raise ValueError(f"p must be a probability in [0, 1], got {p}")
        self.max_rotation_deg = max_rotation_deg
        self.scale_range = scale_range
        self.elastic_alpha = elastic_alpha
        self.elastic_grid = elastic_grid
        self.intensity_scale = intensity_scale
        self.intensity_shift = intensity_shift
        self.p = p

    def __repr__(self) -> str:
        return (f"SliceAugmentation(max_rotation_deg={self.max_rotation_deg}, "
                f"scale_range={self.scale_range}, elastic_alpha={self.elastic_alpha}, "
                f"intensity_scale={self.intensity_scale}, intensity_shift={self.intensity_shift}, "
                f"p={self.p})")

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``image`` float32 (C, S, S), C = 2K + 1 context slices, ``mask`` int64 (S, S) -> augmented
        copies, same shapes."""
        def uniform(low: float, high: float) -> float:
            return low + (high - low) * float(torch.rand((), generator=generator))

        if uniform(0, 1) >= self.p:
            return image, mask
        angle = math.radians(uniform(-self.max_rotation_deg, self.max_rotation_deg))
        zoom = uniform(*self.scale_range)
        cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
        theta = torch.tensor([[[cos, -sin, 0.0], [sin, cos, 0.0]]], dtype=torch.float32)
        size = image.shape[-2:]
        grid = F.affine_grid(theta, [1, 1, *size], align_corners=False)
        if self.elastic_alpha > 0:
            coarse = torch.randn((1, 2, self.elastic_grid, self.elastic_grid), generator=generator)
            field = F.interpolate(coarse, size=tuple(size), mode="bicubic", align_corners=False)
            grid = grid + 2 * self.elastic_alpha * field.permute(0, 2, 3, 1)
        floor = image.amin()
        warped = F.grid_sample((image - floor)[None], grid, mode="bilinear",
                               padding_mode="zeros", align_corners=False)[0] + floor
        warped_mask = F.grid_sample(mask[None, None].to(torch.float32), grid, mode="nearest",
                                    padding_mode="zeros", align_corners=False)[0, 0]
        gain = uniform(1 - self.intensity_scale, 1 + self.intensity_scale)
        shift = uniform(-self.intensity_shift, self.intensity_shift)
        return warped * gain + shift, warped_mask.round().to(torch.int64)


# ---- Dataset ---------------------------------------------------------------------------------
class MultiOrganDataset(Dataset):
    """Axial slices of the phase 3 training cache of a split or a list of patients.

    Every item ``ds[i]`` (or ``ds[(i, seed)]``: augmented by a generator seeded with ``seed``, the same
    item for the same seed in any process) is a dict: ``image`` float32 (C, S, S) z-scored CT,
    C = 2 x ``context_slices`` + 1 (the slice in the middle channel); ``mask`` int64 (S, S) labels 0-7;
    ``annotated`` bool (8,) (a 0 in the mask of an unannotated structure means "unknown", not
    "background"); ``patient_id`` str;
    ``slice_index`` int (z index in the patient's volume, 0 = first slice of the CT).

    Attributes:
        patients: list of P patient ids.
        index: int32 (N, 2) array of (patient index, slice index), one row per item.
        annotated: bool (P, 8).
        slice_labels: uint8 (N,), bit k set when label k occurs on the item's slice.
        shapes: int64 (P, 3) cached volume shapes (Z, S, S).

    Args:
        split: "train", "val", "test" (read from ``<splits_dir>/<split>.txt``) or a list of ids.
        data_root: data folder holding ``processed/training_cache``.
        splits_dir: folder of the split files.
        augment: False, True (default :class:`SliceAugmentation`) or a callable ``(image, mask) -> (image,
            mask)`` (given ``generator=`` for a seeded item); for training only.
        scanner: None, True (default ``scanner.ScannerAugmentation``) or one: the slices read as another
            scanner would show them, before ``augment`` (needs the ``meta.json`` window, mean, std and
            geometry); for training only.
        compact: items keep the cache's float16 ``image`` and uint8 ``mask`` (see the module docstring).
        return_meta: ignored, items are always dicts (accepted for callers of the first contract).
        max_open_patients: memory maps kept open per process (least recently used are closed).
        context_slices: neighbours on each side served as extra channels (0: the slice alone).
    """

    def __init__(
        self,
        split: str | Sequence[str],
        data_root: Path | str = DEFAULT_DATA_ROOT,
        splits_dir: Path | str = DEFAULT_SPLITS_DIR,
        augment: bool | Any = False,
        return_meta: bool = True,
        max_open_patients: int = DEFAULT_MAX_OPEN_PATIENTS,
        compact: bool = False,
        context_slices: int = 0,
        scanner: bool | ScannerAugmentation | None = None,
    ) -> None:
        self.data_root = Path(data_root)
        self.compact = compact
        self.context_slices = check_context_slices(context_slices)
        if isinstance(split, str):
            if split not in SPLIT_NAMES:
                raise ValueError(f"split must be one of {', '.join(SPLIT_NAMES)} or a list of "
                                 f"patient ids, got {split!r}")
            patients = load_split(splits_dir, split)
        else:
            patients = list(split)
        if not patients:
            raise ValueError(f"no patients in split {split!r}")
        if len(set(patients)) != len(patients):
            raise ValueError(f"patients listed twice in {split!r}")
        if max_open_patients < 1:
            raise ValueError(f"max_open_patients must be >= 1, got {max_open_patients}")
        self.patients: list[str] = patients
        self.max_open_patients = max_open_patients
        self.augment = SliceAugmentation() if augment is True else (augment or None)
        self.scanner = ScannerAugmentation() if scanner is True else (scanner or None)
        #: per patient, the cache's units and voxel size (mm), for ``scanner``
        self.scanner_grids: list[tuple[Units, tuple[float, float, float]]] = []

        shapes = np.zeros((len(patients), 3), dtype=np.int64)
        self.annotated = np.zeros((len(patients), organs.NUM_CLASSES), dtype=bool)
        slice_labels = []
        for p, pid in enumerate(patients):
            shapes[p], self.annotated[p], bits, grid = self._read_patient_header(pid)
            slice_labels.append(bits)
            if grid is not None:
                self.scanner_grids.append(grid)
        self.shapes = shapes
        self.slice_labels = np.concatenate(slice_labels).astype(np.uint8)
        counts = shapes[:, 0]
        self.index = np.empty((int(counts.sum()), 2), dtype=np.int32)
        self.index[:, 0] = np.repeat(np.arange(len(patients), dtype=np.int32), counts)
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        self.index[:, 1] = np.arange(len(self.index)) - starts
        self._maps: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._owner_pid = os.getpid()

    def _read_patient_header(self, pid: str) -> tuple[tuple[int, ...], list[bool], np.ndarray,
                                                      tuple[Units, tuple[float, float, float]] | None]:
        meta = read_cache_meta(self.data_root, pid)
        folder = cache_dir(self.data_root, pid)
        grid = None
        if self.scanner is not None:
            where = f"{pid}: {folder / CACHE_META}"
            grid = (Units.of_cache(meta, where), cache_voxel_mm(meta, where))
        shape = tuple(int(n) for n in meta["shape_zyx"])
        for name, dtype in ((CACHE_CT, CACHE_CT_DTYPE), (CACHE_MASK, CACHE_MASK_DTYPE)):
            path = folder / name
            if not path.is_file():
                raise FileNotFoundError(f"{pid}: {path} is missing; rerun normalize_ct_and_masks.py "
                                        "--overwrite for this patient")
            found_shape, found_dtype, fortran = read_npy_header(path)
            if found_shape != shape or found_dtype != np.dtype(dtype) or fortran:
                raise ValueError(
                    f"{pid}: {path} holds {found_dtype} {found_shape}"
                    f"{' (Fortran order)' if fortran else ''}, expected {np.dtype(dtype)} {shape} "
                    "(meta.json); rerun normalize_ct_and_masks.py --overwrite for this patient"
                )
        if len(meta["annotated"]) != organs.NUM_CLASSES:
            raise ValueError(f"{pid}: meta.json has {len(meta['annotated'])} annotated flags, "
                             f"expected {organs.NUM_CLASSES}")
        bits = np.asarray(meta["slice_labels"], dtype=np.uint8)
        if bits.shape != (shape[0],):
            raise ValueError(f"{pid}: meta.json has {bits.size} slice_labels for {shape[0]} slices")
        return shape, [bool(a) for a in meta["annotated"]], bits, grid

    # -- memory maps, opened lazily in each process ------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = OrderedDict()  # open memory maps never travel to another process
        return state

    def _volumes(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        if self._owner_pid != os.getpid():  # forked worker: open our own maps
            self._maps = OrderedDict()
            self._owner_pid = os.getpid()
        maps = self._maps.get(p)
        if maps is None:
            folder = cache_dir(self.data_root, self.patients[p])
            maps = (np.load(folder / CACHE_CT, mmap_mode="r"), np.load(folder / CACHE_MASK, mmap_mode="r"))
            self._maps[p] = maps
            if len(self._maps) > self.max_open_patients:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(p)
        return maps

    # -- items -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        i, seed = key if isinstance(key, tuple) else (key, None)
        if not -len(self) <= i < len(self):
            raise IndexError(f"slice {i} out of range for a dataset of {len(self)} slices")
        generator = None if seed is None else torch.Generator().manual_seed(int(seed))
        p, z = (int(v) for v in self.index[i])
        ct, mask = self._volumes(p)
        # Copy the slice out of the read-only map; widen it with torch (numpy's float16 ->
        # float32 conversion is ~10x slower).
        if self.scanner is not None:
            units, voxel_mm = self.scanner_grids[p]
            image = self.scanner(ct, context_indices(z, len(ct), self.context_slices), voxel_mm_zyx=voxel_mm,
                                 units=units, generator=generator)
        elif self.context_slices:
            image = torch.from_numpy(np.array(ct[context_indices(z, len(ct), self.context_slices)]))
        else:
            image = torch.from_numpy(np.array(ct[z]))[None]
        labels = torch.from_numpy(np.array(mask[z]))
        augmenting = self.augment is not None or self.scanner is not None
        if augmenting or not self.compact:
            image, labels = image.to(torch.float32), labels.to(torch.int64)
        if self.augment is not None:
            extra = {} if generator is None else {"generator": generator}
            image, labels = self.augment(image, labels, **extra)
        if augmenting and self.compact:
            image, labels = image.to(torch.float16), labels.to(torch.uint8)
        return {
            "image": image,
            "mask": labels,
            "annotated": torch.from_numpy(self.annotated[p].copy()),
            "patient_id": self.patients[p],
            "slice_index": z,
        }

    def slice_has_label(self, label: int) -> np.ndarray:
        """bool (N,): whether each item's slice contains ``label`` (from meta.json, no mask read)."""
        label = organs.structure(label).label
        return (self.slice_labels >> label) & 1 == 1

    def __repr__(self) -> str:
        return (f"MultiOrganDataset({len(self.patients)} patients, {len(self)} slices, "
                f"augment={self.augment!r}, scanner={self.scanner!r}, compact={self.compact}, "
                f"context_slices={self.context_slices})")


def batch_to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """A collated batch on ``device`` with ``image`` float32 (B, C, S, S), ``mask`` int64 (B, S, S)
    and ``annotated`` bool (B, 8), whatever dtypes it was loaded with (see ``compact``)."""
    out = dict(batch)
    out["image"] = batch["image"].to(device, non_blocking=True).to(torch.float32)
    out["mask"] = batch["mask"].to(device, non_blocking=True).to(torch.int64)
    out["annotated"] = batch["annotated"].to(device, non_blocking=True)
    return out


def make_tumour_oversampling_sampler(
    dataset: MultiOrganDataset,
    tumour_fraction: float = DEFAULT_TUMOUR_FRACTION,
    num_samples: int | None = None,
    label: int = organs.GTV,
    generator: torch.Generator | None = None,
) -> WeightedRandomSampler:
    """A sampler drawing slices with ``label`` (default GTV) a ``tumour_fraction`` of the time.

    Tumour slices are a few percent of a thorax CT. Draws ``num_samples`` (default ``len(dataset)``) items
    with replacement; uniform when no slice, or every slice, holds the label.
    """
    if not 0 < tumour_fraction < 1:
        raise ValueError(f"tumour_fraction must be in (0, 1), got {tumour_fraction}")
    has = dataset.slice_has_label(label)
    n_with = int(has.sum())
    weights = np.ones(len(dataset), dtype=np.float64)
    if 0 < n_with < len(dataset):
        weights[has] = tumour_fraction / n_with
        weights[~has] = (1 - tumour_fraction) / (len(dataset) - n_with)
    else:
        log.warning("%d of %d slices hold label %d: sampling uniformly", n_with, len(dataset), label)
    return WeightedRandomSampler(torch.from_numpy(weights), num_samples or len(dataset),
                                 replacement=True, generator=generator)
