"""Phase 4 loading (dataset_multi_organ.py): slice index from headers, memory-mapped items,
DataLoader workers, anatomy-safe and other-scanner augmentation, tumour oversampling."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dataset_multi_organ import (
    MultiOrganDataset, SliceAugmentation, batch_to_device, make_tumour_oversampling_sampler, read_npy_header,
)
from thoracic_seg import organs
from thoracic_seg.grid import context_indices, context_stack
from thoracic_seg.layout import PROCESSED_FORMAT, DataLayout, slice_label_bits
from thoracic_seg.scanner import ScannerAugmentation
from thoracic_seg.splits import load_split

SIZE = 32


def write_cache(root: Path, pid: str, slices: int, annotated=None, seed: int = 0,
                tumour_slices=()) -> tuple[np.ndarray, np.ndarray]:
    """A phase 3 training cache for one patient: random CT, lungs on every slice, a tumour on
    ``tumour_slices``. Returns (ct float16, mask uint8)."""
    rng = np.random.default_rng(seed)
    ct = rng.normal(size=(slices, SIZE, SIZE)).astype(np.float16)
    mask = np.zeros((slices, SIZE, SIZE), dtype=np.uint8)
    mask[:, 8:24, 4:14] = organs.RIGHT_LUNG
    mask[:, 8:24, 18:28] = organs.LEFT_LUNG
    for z in tumour_slices:
        mask[z, 12:16, 6:10] = organs.GTV
    folder = DataLayout(root).training_cache / pid
    folder.mkdir(parents=True)
    np.save(folder / "ct.npy", ct)
    np.save(folder / "mask.npy", mask)
    meta = {"format": PROCESSED_FORMAT, "patient_id": pid, "shape_zyx": [slices, SIZE, SIZE],
            "annotated": annotated or [True] * 8, "slice_labels": slice_label_bits(mask),
            "orientation": {"stored": "LPS", "network": "LPS"}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return ct, mask


@pytest.fixture()
def cache(tmp_path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    root = tmp_path / "DATA"
    volumes = {
        "A": write_cache(root, "A", 5, seed=1, tumour_slices=(2,)),
        "B": write_cache(root, "B", 3, seed=2, annotated=[True, True, False, True, True, False, True, True]),
        "C": write_cache(root, "C", 4, seed=3, tumour_slices=(0, 1)),
    }
    return root, volumes


def test_index_is_built_from_headers(cache) -> None:
    root, _ = cache
    ds = MultiOrganDataset(["A", "B", "C"], data_root=root)
    assert len(ds) == 12 and ds.patients == ["A", "B", "C"]
    assert ds.index.dtype == np.int32 and ds.index.shape == (12, 2)
    np.testing.assert_array_equal(ds.index[:, 0], [0] * 5 + [1] * 3 + [2] * 4)
    np.testing.assert_array_equal(ds.index[:, 1], [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3])
    assert ds.annotated.dtype == bool and ds.annotated.shape == (3, 8)
    assert ds.annotated[1].tolist() == [True, True, False, True, True, False, True, True]
    np.testing.assert_array_equal(np.flatnonzero(ds.slice_has_label(organs.GTV)), [2, 8, 9])


def test_construction_reads_no_voxel(tmp_path) -> None:
    """A cache whose .npy files hold only their headers still indexes: no voxel is read."""
    root = tmp_path / "DATA"
    write_cache(root, "A", 4)
    for name, dtype in (("ct.npy", np.float16), ("mask.npy", np.uint8)):
        path = DataLayout(root).training_cache / "A" / name
        with open(path, "r+b") as handle:
            np.lib.format.read_magic(handle)
            np.lib.format.read_array_header_1_0(handle)
            handle.truncate(handle.tell())
    ds = MultiOrganDataset(["A"], data_root=root)
    assert len(ds) == 4
    header = read_npy_header(DataLayout(root).training_cache / "A" / "ct.npy")
    assert header == ((4, SIZE, SIZE), np.float16, False)
    with pytest.raises(ValueError):  # the data really is gone
        ds[0]


def test_items_equal_the_cached_volumes(cache) -> None:
    root, volumes = cache
    ds = MultiOrganDataset(["A", "B", "C"], data_root=root)
    for i in range(len(ds)):
        item = ds[i]
        pid, z = item["patient_id"], item["slice_index"]
        ct, mask = volumes[pid]
        assert item["image"].dtype == torch.float32 and item["image"].shape == (1, SIZE, SIZE)
        assert item["mask"].dtype == torch.int64 and item["mask"].shape == (SIZE, SIZE)
        assert item["annotated"].dtype == torch.bool and item["annotated"].shape == (8,)
        np.testing.assert_array_equal(item["image"][0].numpy(), ct[z].astype(np.float32))
        np.testing.assert_array_equal(item["mask"].numpy(), mask[z])
        assert item["annotated"].tolist() == ds.annotated[ds.patients.index(pid)].tolist()
    assert ds[-1]["patient_id"] == "C" and ds[-1]["slice_index"] == 3
    with pytest.raises(IndexError, match="slice 12 out of range for a dataset of 12 slices"):
        ds[12]


def test_context_indices_clamp_at_the_ends_of_a_3_slice_volume() -> None:
    """K = 2 on a 3-slice volume: each slice with two neighbours per side, repeated at the ends."""
    assert context_indices(0, 3, 2).tolist() == [0, 0, 0, 1, 2]
    assert context_indices(1, 3, 2).tolist() == [0, 0, 1, 2, 2]
    assert context_indices(2, 3, 2).tolist() == [0, 1, 2, 2, 2]
    assert context_indices(np.array([0, 2]), 3, 1).tolist() == [[0, 0, 1], [1, 2, 2]]
    assert context_indices(1, 3, 0).tolist() == [1]
    for bad in (-1, 9, 1.5, True):
        with pytest.raises(ValueError, match="context slices must be an integer in 0-8"):
            context_indices(0, 3, bad)


def test_context_items_stack_the_neighbours_and_keep_the_middle_mask(cache) -> None:
    """Patient B has 3 slices: the hand-written stacks of slices (z-2 .. z+2, clamped)."""
    root, volumes = cache
    ct, mask = volumes["B"]
    ds = MultiOrganDataset(["B"], data_root=root, context_slices=2)
    expected = {0: [0, 0, 0, 1, 2], 1: [0, 0, 1, 2, 2], 2: [0, 1, 2, 2, 2]}
    for z, stack in expected.items():
        item = ds[z]
        assert item["image"].shape == (5, SIZE, SIZE) and item["image"].dtype == torch.float32
        np.testing.assert_array_equal(item["image"].numpy(), ct[stack].astype(np.float32))
        np.testing.assert_array_equal(item["mask"].numpy(), mask[z])
    np.testing.assert_array_equal(context_stack(ct, 1, 3, 2), ct[[[0, 0, 1, 2, 2], [0, 1, 2, 2, 2]]])
    compact = MultiOrganDataset(["B"], data_root=root, context_slices=1, compact=True, augment=True)
    assert compact[0]["image"].shape == (3, SIZE, SIZE) and compact[0]["image"].dtype == torch.float16
    # K = 0 is the single slice, as before.
    single = MultiOrganDataset(["B"], data_root=root)
    np.testing.assert_array_equal(single[1]["image"].numpy(), ct[[1]].astype(np.float32))


def test_compact_items_widen_to_the_same_batch(cache) -> None:
    root, volumes = cache
    compact = MultiOrganDataset(["A", "B", "C"], data_root=root, compact=True)
    item = compact[6]
    assert item["image"].dtype == torch.float16 and item["image"].shape == (1, SIZE, SIZE)
    assert item["mask"].dtype == torch.uint8 and item["mask"].shape == (SIZE, SIZE)
    np.testing.assert_array_equal(item["image"][0].numpy(), volumes["B"][0][1])
    full = MultiOrganDataset(["A", "B", "C"], data_root=root)
    loaders = [DataLoader(ds, batch_size=5) for ds in (compact, full)]
    for small, wide in zip(*loaders):
        small = batch_to_device(small, "cpu")
        assert small["image"].dtype == torch.float32 and small["mask"].dtype == torch.int64
        assert torch.equal(small["image"], wide["image"]) and torch.equal(small["mask"], wide["mask"])
        assert torch.equal(small["annotated"], wide["annotated"])
        assert small["patient_id"] == wide["patient_id"]
    augmented = MultiOrganDataset(["A"], data_root=root, compact=True, augment=SliceAugmentation(p=1.0))
    assert augmented[0]["image"].dtype == torch.float16 and augmented[0]["mask"].dtype == torch.uint8


def test_pickling_drops_open_memory_maps(cache) -> None:
    root, volumes = cache
    ds = MultiOrganDataset(["A", "B", "C"], data_root=root)
    ds[0], ds[7]
    assert len(ds._maps) == 2
    clone = pickle.loads(pickle.dumps(ds))
    assert len(clone._maps) == 0
    np.testing.assert_array_equal(clone[7]["mask"].numpy(), volumes["B"][1][2])


def test_open_memory_maps_are_bounded(cache) -> None:
    root, _ = cache
    ds = MultiOrganDataset(["A", "B", "C"], data_root=root, max_open_patients=2)
    for i in (0, 5, 8, 0):
        ds[i]
    assert list(ds._maps) == [2, 0]  # least recently used (B) closed


def test_dataloader_with_two_workers(cache) -> None:
    root, volumes = cache
    ds = MultiOrganDataset(["A", "B", "C"], data_root=root)
    ds[0]  # maps opened in the parent must not leak into the workers
    loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=2,
                        generator=torch.Generator().manual_seed(0))
    seen = []
    for batch in loader:
        assert batch["image"].shape[1:] == (1, SIZE, SIZE) and batch["mask"].dtype == torch.int64
        assert batch["annotated"].shape[1:] == (8,)
        for image, mask, pid, z in zip(batch["image"], batch["mask"], batch["patient_id"],
                                       batch["slice_index"].tolist()):
            np.testing.assert_array_equal(image[0].numpy(), volumes[pid][0][z].astype(np.float32))
            np.testing.assert_array_equal(mask.numpy(), volumes[pid][1][z])
            seen.append((pid, z))
    assert sorted(seen) == sorted((ds.patients[p], z) for p, z in ds.index.tolist())


def test_split_names_and_errors(cache, tmp_path) -> None:
    root, _ = cache
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "train.txt").write_text("A\n\n# a comment\nC\n")
    assert load_split(splits, "train") == ["A", "C"]
    assert MultiOrganDataset("train", data_root=root, splits_dir=splits).patients == ["A", "C"]
    with pytest.raises(ValueError, match="split must be one of train, val, test or a list"):
        MultiOrganDataset("training", data_root=root, splits_dir=splits)
    with pytest.raises(FileNotFoundError, match=r"split file .*val.txt not found; run prepare_train"):
        MultiOrganDataset("val", data_root=root, splits_dir=splits)
    with pytest.raises(FileNotFoundError, match="Z: no training cache .*run normalize_ct_and_masks.py"):
        MultiOrganDataset(["A", "Z"], data_root=root)
    with pytest.raises(ValueError, match="listed twice"):
        MultiOrganDataset(["A", "A"], data_root=root)


def test_cache_that_disagrees_with_its_meta(cache) -> None:
    root, _ = cache
    np.save(DataLayout(root).training_cache / "B" / "ct.npy", np.zeros((3, SIZE, SIZE), np.float32))
    expected = r"B: .*ct.npy holds float32 \(3, 32, 32\), expected float16 \(3, 32, 32\)"
    with pytest.raises(ValueError, match=expected):
        MultiOrganDataset(["A", "B"], data_root=root)


# --------------------------------------------------------------------------------------------
# Augmentation: the lungs keep their side
# --------------------------------------------------------------------------------------------
def lungs_slice(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.zeros((size, size), dtype=torch.int64)
    mask[16:48, 6:28] = organs.RIGHT_LUNG  # patient right = image left (low x, LPS)
    mask[16:48, 36:58] = organs.LEFT_LUNG
    image = torch.where(mask > 0, -1.0, 0.5)[None].to(torch.float32)
    return image, mask


AUGMENTATIONS = [
    SliceAugmentation(p=1.0),
    SliceAugmentation(max_rotation_deg=15, scale_range=(0.8, 1.2), elastic_alpha=0.03, p=1.0),
]


@pytest.mark.parametrize("augment", AUGMENTATIONS, ids=["default", "elastic"])
def test_augmentation_never_moves_a_lung_to_the_other_side(augment) -> None:
    generator = torch.Generator().manual_seed(0)
    image, mask = lungs_slice()
    only_left = torch.where(mask == organs.LEFT_LUNG, mask, 0)
    moved = 0
    for _ in range(100):
        out_image, out_mask = augment(image, only_left, generator)
        assert out_image.shape == image.shape and out_image.dtype == torch.float32
        assert out_mask.shape == mask.shape and out_mask.dtype == torch.int64
        assert set(out_mask.unique().tolist()) <= {0, organs.LEFT_LUNG}  # never a right lung

        out_image, out_mask = augment(image, mask, generator)
        assert set(out_mask.unique().tolist()) <= {0, organs.RIGHT_LUNG, organs.LEFT_LUNG}
        cols = torch.arange(mask.shape[1], dtype=torch.float32)
        right_x = cols[torch.nonzero(out_mask == organs.RIGHT_LUNG)[:, 1]].mean()
        left_x = cols[torch.nonzero(out_mask == organs.LEFT_LUNG)[:, 1]].mean()
        assert right_x < 32 < left_x
        # The mask moved with the image: lung pixels are dark in the augmented image too.
        lung = out_mask > 0
        assert (out_image[0][lung] < out_image[0][~lung].mean()).float().mean() > 0.97
        moved += int(not torch.equal(out_mask, mask))
    assert moved > 90  # it does augment


def test_augmentation_is_reproducible_and_validated() -> None:
    image, mask = lungs_slice()
    a = SliceAugmentation(p=1.0)(image, mask, torch.Generator().manual_seed(3))
    b = SliceAugmentation(p=1.0)(image, mask, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    untouched = SliceAugmentation(p=0.0)(image, mask)
    assert untouched[0] is image and untouched[1] is mask
    with pytest.raises(ValueError, match=r"max_rotation_deg must be in \[0, 30\]"):
        SliceAugmentation(max_rotation_deg=90)
    with pytest.raises(ValueError, match="scale_range"):
        SliceAugmentation(scale_range=(1.2, 0.8))
    with pytest.raises(ValueError, match="p must be a probability"):
        SliceAugmentation(p=1.5)


def test_dataset_applies_augmentation(cache) -> None:
    root, volumes = cache
    torch.manual_seed(0)
    ds = MultiOrganDataset(["A"], data_root=root, augment=True)
    assert isinstance(ds.augment, SliceAugmentation)
    items = [ds[1] for _ in range(10)]
    assert any(not torch.equal(it["mask"], torch.from_numpy(volumes["A"][1][1]).long()) for it in items)
    for it in items:
        assert set(it["mask"].unique().tolist()) <= {0, organs.RIGHT_LUNG, organs.LEFT_LUNG}


# --------------------------------------------------------------------------------------------
# Other scanners (thoracic_seg/scanner.py)
# --------------------------------------------------------------------------------------------
SCANNER_META = {"window": [-1000, 400], "mean": -300.0, "std": 350.0, "size": SIZE,
                "original_shape_zyx": [8, 64, 64], "original_spacing_xyz": [0.7, 0.7, 2.5]}


def write_ramp_cache(root: Path, pid: str = "R") -> tuple[np.ndarray, np.ndarray]:
    """8 slices whose values rise by 0.25 per slice (exact in float16) plus the phase 3 normalisation
    and geometry the scanner augmentation needs (voxels 2.5 x 1.4 x 1.4 mm)."""
    ct, mask = write_cache(root, pid, 8, seed=4)
    ct = np.broadcast_to(0.25 * np.arange(8, dtype=np.float16)[:, None, None], ct.shape).copy()
    folder = DataLayout(root).training_cache / pid
    np.save(folder / "ct.npy", ct)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps(meta | SCANNER_META))
    return ct, mask


@pytest.mark.parametrize("k", [0, 1])
def test_scanner_thick_slices_read_the_neighbours_and_leave_the_mask(tmp_path, k) -> None:
    """Thickness only (other amounts 0): a thicker slice of a ramp is the ramp inside the volume
    (symmetric weights), while the end slices take in their neighbours; with K = 0 too."""
    root = tmp_path / "DATA"
    ct, mask = write_ramp_cache(root)
    only_thickness = ScannerAugmentation(p=1, noise_hu=(0, 0), kernel=(0, 0), gain=(1, 1), shift_hu=(0, 0),
                                         max_slice_mm=10.0)
    ds = MultiOrganDataset(["R"], data_root=root, scanner=only_thickness, context_slices=k)
    assert ds.scanner_grids[0][1] == pytest.approx((2.5, 1.4, 1.4))
    for z in range(8):
        item = ds[(z, 100 + z)]
        assert item["image"].dtype == torch.float32 and item["image"].shape == (2 * k + 1, SIZE, SIZE)
        assert item["mask"].dtype == torch.int64 and np.array_equal(item["mask"].numpy(), mask[z])
        channels = context_indices(z, 8, k)
        if z in (0, 7):
            assert np.abs(item["image"][k].numpy() - ct[z]).min() > 0  # a neighbour was read
        if channels.min() >= 2 and channels.max() <= 5:  # the thickest profile (4 slices) stays inside
            np.testing.assert_allclose(item["image"].numpy(), ct[channels].astype(np.float32), atol=1e-5)


def test_scanner_items_are_deterministic_per_seed_with_both_augmentations(tmp_path) -> None:
    root = tmp_path / "DATA"
    ct, mask = write_ramp_cache(root)
    ds = MultiOrganDataset(["R"], data_root=root, scanner=True, augment=True, compact=True, context_slices=1)
    assert isinstance(ds.scanner, ScannerAugmentation) and "scanner=ScannerAugmentation(p=0.5" in repr(ds)
    changed = 0
    for z in range(8):
        a, b, c = ds[(z, 11)], ds[(z, 11)], ds[(z, 12)]
        assert a["image"].dtype == torch.float16 and a["mask"].dtype == torch.uint8
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        changed += not torch.equal(a["image"], c["image"])
    assert changed >= 6
    scanner_only = MultiOrganDataset(["R"], data_root=root, scanner=ScannerAugmentation(p=1))
    for z in range(8):
        item = scanner_only[z]  # unseeded: torch's global generator
        assert np.array_equal(item["mask"].numpy(), mask[z]) and not np.array_equal(item["image"][0].numpy(), ct[z])


def test_scanner_augmentation_needs_the_phase_3_normalisation(cache) -> None:
    root, _ = cache
    with pytest.raises(ValueError, match="A: .*meta.json holds no valid window, mean and std .*re-run "
                                         "normalize_ct_and_masks.py --overwrite"):
        MultiOrganDataset(["A"], data_root=root, scanner=True)


# --------------------------------------------------------------------------------------------
# Tumour oversampling
# --------------------------------------------------------------------------------------------
def test_tumour_oversampling_sampler(cache) -> None:
    root, _ = cache
    ds = MultiOrganDataset(["A", "B", "C"], data_root=root)
    tumour = ds.slice_has_label(organs.GTV)  # 3 of 12 slices
    sampler = make_tumour_oversampling_sampler(ds, tumour_fraction=0.5, num_samples=4000,
                                               generator=torch.Generator().manual_seed(0))
    weights = sampler.weights.numpy()
    assert weights[tumour].sum() == pytest.approx(0.5) and weights[~tumour].sum() == pytest.approx(0.5)
    assert np.allclose(weights[tumour], 0.5 / 3) and np.allclose(weights[~tumour], 0.5 / 9)
    drawn = np.array(list(sampler))
    assert len(drawn) == 4000 and abs(tumour[drawn].mean() - 0.5) < 0.04
    assert len(make_tumour_oversampling_sampler(ds)) == len(ds)
    with pytest.raises(ValueError, match=r"tumour_fraction must be in \(0, 1\), got 1.5"):
        make_tumour_oversampling_sampler(ds, tumour_fraction=1.5)


def test_sampler_without_tumour_is_uniform(cache) -> None:
    root, _ = cache
    ds = MultiOrganDataset(["B"], data_root=root)
    assert np.all(make_tumour_oversampling_sampler(ds).weights.numpy() == 1.0)
