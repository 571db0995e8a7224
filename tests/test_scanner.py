"""Other scanners (thoracic_seg/scanner.py): each operation on tiny arrays with exact numbers, HU and
z-score units through one implementation, rerender keeping shape, dtype and grid, and the training
augmentation's draws."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from thoracic_seg import scanner
from thoracic_seg.grid import cache_voxel_mm
from thoracic_seg.scanner import (
    HU, Rendition, ScannerAugmentation, Units, gaussian_blur, gaussian_weights, kernel_filter, render_slices,
    rerender, slab_weights, thicken,
)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- Slice thickness ----------------------------------------------------------------------------
@pytest.mark.parametrize("slice_mm, spacing_mm, expected", [
    (5.0, 3.0, [0.2, 0.6, 0.2]),
    (4.0, 1.0, [0.125, 0.25, 0.25, 0.25, 0.125]),
    (9.0, 3.0, [1 / 3, 1 / 3, 1 / 3]),
    (7.5, 2.5, [1 / 3, 1 / 3, 1 / 3]),
    (3.0, 3.0, [1.0]),
    (1.25, 3.0, [1.0]),  # thinner slices cannot be made
    (None, 3.0, [1.0]),
])
def test_slab_weights_are_a_rectangular_slice_profile(slice_mm, spacing_mm, expected):
    weights = slab_weights(slice_mm, spacing_mm)
    np.testing.assert_allclose(weights, expected, rtol=1e-12)
    assert weights.sum() == pytest.approx(1.0)


def test_slab_weights_refuse_a_bad_spacing():
    with pytest.raises(ValueError, match="slice spacing must be > 0 mm, got 0"):
        slab_weights(5.0, 0)


def test_thickening_a_ramp_gives_the_ramp_and_clamps_at_the_ends():
    ramp = np.arange(10, dtype=np.float32)[:, None, None] * np.ones((1, 2, 3), np.float32)
    thick = thicken(ramp, np.arange(10), slab_weights(4.0, 1.0))
    assert thick.dtype == torch.float32 and thick.shape == (10, 2, 3)
    assert thick[:, 0, 0].tolist() == [0.5, 1.125, 2, 3, 4, 5, 6, 7, 7.875, 8.5]  # ends: slices repeated
    assert torch.equal(thicken(ramp, [4], np.ones(1)), torch.from_numpy(ramp[[4]]))


# ---- Kernel ---------------------------------------------------------------------------------------
def test_gaussian_weights_and_the_blur_of_a_delta():
    w = gaussian_weights(1.0)
    assert len(w) == 9 and float(w.sum()) == pytest.approx(1.0)
    assert float(w[4]) == pytest.approx(1 / (1 + 2 * sum(math.exp(-x * x / 2) for x in (1, 2, 3, 4))), rel=1e-6)
    delta = torch.zeros(1, 11, 11)
    delta[0, 5, 5] = 1
    blurred = gaussian_blur(delta, (1.0, 0.5))
    assert float(blurred.sum()) == pytest.approx(1.0)
    np.testing.assert_allclose(blurred[0, 1:10, 3:8].numpy(), np.outer(w, gaussian_weights(0.5)), atol=1e-7)
    image = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 12, 9)).astype(np.float32))
    reference = np.stack([ndimage.gaussian_filter(s, (1.5, 0.7), mode="nearest") for s in image.numpy()])
    np.testing.assert_allclose(gaussian_blur(image, (1.5, 0.7)).numpy(), reference, atol=1e-6)


def test_kernel_filter_blurs_sharpens_and_keeps_flat_regions():
    edge = torch.zeros(1, 9, 9)
    edge[:, :, 5:] = 100.0
    assert kernel_filter(edge, (1.0, 1.0), 0.0) is edge
    assert torch.equal(kernel_filter(edge, (1.0, 1.0), -1.0), gaussian_blur(edge, (1.0, 1.0)))
    sharp = kernel_filter(edge, (1.0, 1.0), 1.0)
    assert float(sharp.min()) < -10 and float(sharp.max()) > 110  # the overshoot of a sharp kernel
    assert torch.allclose(sharp[:, :, 0], torch.zeros(1, 9), atol=1e-3)  # far from the edge: unchanged
    flat = torch.full((1, 6, 6), 40.0)
    assert torch.allclose(kernel_filter(flat, (1.0, 1.0), 0.7), flat)


# ---- One implementation: HU and z-score units ----------------------------------------------------
def test_noise_is_drawn_from_the_generator_in_hu_converted_to_the_units():
    units = Units(mean=-500.0, std=400.0)
    noisy = render_slices(np.zeros((1, 256, 256), np.float32), [0], Rendition(noise_hu=20.0),
                          voxel_mm_zyx=(3, 1, 1), units=units, generator=seeded(0))
    assert torch.equal(noisy, torch.randn((1, 256, 256), generator=seeded(0)) * 0.05)
    assert float(noisy.std()) * units.std == pytest.approx(20.0, rel=0.01)
    assert abs(float(noisy.mean())) * units.std < 0.3


def test_rendering_in_units_equals_rendering_in_hu_then_normalising():
    hu = np.random.default_rng(1).uniform(-1000, 400, size=(6, 16, 16)).astype(np.float32)
    units = Units(mean=-400.0, std=450.0)
    rendition = Rendition(slice_mm=6.0, kernel=0.8, kernel_sigma_mm=1.2, noise_hu=30.0, gain=1.04, shift_hu=-15.0)
    options = dict(voxel_mm_zyx=(2.5, 0.9, 0.9))
    in_hu = render_slices(hu, [0, 3, 5], rendition, units=HU, generator=seeded(5), **options)
    in_units = render_slices((hu - units.mean) / units.std, [0, 3, 5], rendition, units=units,
                             generator=seeded(5), **options)
    np.testing.assert_allclose(in_units.numpy(), ((in_hu - units.mean) / units.std).numpy(), atol=2e-5)


def test_gain_shift_and_the_window_in_units():
    units = Units(mean=-300.0, std=350.0, window=(-1000.0, 400.0))
    hu = np.array([-1000, -500, 0, 200, 400], np.float32).reshape(1, 1, 5)
    out = render_slices((hu - units.mean) / units.std, [0], Rendition(gain=1.05, shift_hu=10.0),
                        voxel_mm_zyx=(3, 1, 1), units=units)
    expected = (np.clip(hu * 1.05 + 10, -1000, 400) - units.mean) / units.std
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)  # -1000 -> -1040 is clipped back to air


@pytest.mark.parametrize("record, message", [
    ({}, "holds no valid window, mean and std"),
    ({"window": [-1000, 400], "mean": -500, "std": 0}, "std > 0 HU"),
])
def test_units_of_a_cache_record_are_checked(record, message):
    assert Units.of_cache({"window": [-1000, 400], "mean": -500, "std": 400}, "P1") == Units(-500, 400, (-1000, 400))
    with pytest.raises(ValueError, match=message):
        Units.of_cache(record, "P1: meta.json")


# ---- rerender: a held-out patient as if from another scanner ------------------------------------
def test_rerender_without_changes_is_the_identity_and_keeps_the_dtype():
    hu = np.random.default_rng(2).integers(-1024, 3000, size=(5, 8, 8)).astype(np.int16)
    assert np.array_equal(rerender(hu, (3, 0.8, 0.8)), hu)
    as_float = hu.astype(np.float32)
    out = rerender(as_float, (3, 0.8, 0.8), noise_hu=10.0)
    assert out.dtype == np.float32 and out.shape == hu.shape


def test_rerender_keeps_the_grid_and_is_deterministic_per_seed():
    hu = np.full((21, 15, 15), -800, dtype=np.int16)
    hu[10, 7, 7] = 1000  # one bright voxel: its image stays centred on it
    options = dict(slice_mm=2.5, kernel=-1.0, kernel_sigma_mm=1.0)  # slices weighted 1/4, 1/2, 1/4
    out = rerender(hu, (1.25, 0.9, 0.9), **options)
    assert out.shape == hu.shape and out.dtype == np.int16
    assert np.unravel_index(np.argmax(out), out.shape) == (10, 7, 7)
    assert np.array_equal(out[9], out[11]) and np.array_equal(out[10, 5], out[10, 9])  # symmetric about it
    assert out[10, 7, 7] < 1000 and out[11, 7, 7] > -800
    assert (out[12] == -800).all() and (out[10, 0] == -800).all()
    first, again, other = (rerender(hu, (1.25, 0.9, 0.9), **options, noise_hu=25.0, seed=s) for s in (3, 3, 4))
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_rerender_noise_statistics_and_integer_clipping():
    flat = np.zeros((40, 32, 32), np.float32)  # more slices than one chunk
    noisy = rerender(flat, (2, 1, 1), noise_hu=20.0, seed=0)
    assert noisy.std() == pytest.approx(20.0, rel=0.02) and abs(noisy.mean()) < 0.5
    assert not np.array_equal(noisy[:32], noisy[32:].repeat(4, axis=0)[:32])
    bright = np.full((2, 3, 3), 32000, np.int16)
    assert rerender(bright, (2, 1, 1), shift_hu=1000.0).max() == 32767
    assert np.array_equal(rerender(bright, (2, 1, 1), shift_hu=0.4), bright)


@pytest.mark.parametrize("volume, spacing, options, message", [
    (np.zeros((4, 4)), (1, 1, 1), {}, r"expected a non-empty \(Z, Y, X\) CT, got shape \(4, 4\)"),
    (np.zeros((2, 4, 4), bool), (1, 1, 1), {}, "expected a CT of integer or float HU, got dtype bool"),
    (np.zeros((2, 4, 4)), (1, 0, 1), {}, r"spacing_zyx must be three positive mm values \(z, y, x\), got \(1, 0, 1\)"),
    (np.zeros((2, 4, 4)), (1, 1), {}, "spacing_zyx must be three positive mm values"),
    (np.zeros((2, 4, 4)), (1, 1, 1), {"noise_hu": -5}, "noise_hu must be >= 0 HU, got -5"),
    (np.zeros((2, 4, 4)), (1, 1, 1), {"kernel": -2}, r"kernel must be >= -1 \(-1: a full Gaussian blur\), got -2"),
    (np.zeros((2, 4, 4)), (1, 1, 1), {"slice_mm": 0}, "slice_mm must be > 0 mm or None, got 0"),
    (np.zeros((2, 4, 4)), (1, 1, 1), {"kernel_sigma_mm": float("nan")}, "kernel_sigma_mm must be a finite number"),
    (np.zeros((2, 4, 4)), (1, 1, 1), {"gain": 0}, "gain must be > 0, got 0"),
    (np.zeros((2, 4, 4)), (1, 1, 1), {"shift_hu": True}, "shift_hu must be a finite number, got True"),
])
def test_rerender_refuses_bad_arguments(volume, spacing, options, message):
    with pytest.raises(ValueError, match=message):
        rerender(volume, spacing, **options)


# ---- The training augmentation ---------------------------------------------------------------------
def test_scanner_augmentation_draws_within_its_ranges_and_half_the_time():
    augmentation = ScannerAugmentation()
    generator = seeded(0)
    draws = [augmentation.draw(1.25, generator) for _ in range(400)]
    done = [d for d in draws if d is not None]
    assert 170 <= len(done) <= 230
    for d in done:
        assert 1.25 < d.slice_mm <= scanner.MAX_SLICE_MM
        assert -1 <= d.kernel <= 1 and 0.5 <= d.kernel_sigma_mm <= 1.5 and 0 <= d.noise_hu <= 40
        assert 0.95 <= d.gain <= 1.05 and -20 <= d.shift_hu <= 20
    assert all(d is None or d.slice_mm is None for d in (ScannerAugmentation(p=1).draw(5.0) for _ in range(5)))


def test_scanner_augmentation_is_deterministic_per_seed_and_p0_reads_the_slices():
    volume = np.random.default_rng(3).normal(size=(6, 16, 16)).astype(np.float16)
    units, voxel = Units(-400.0, 450.0, (-1000.0, 400.0)), (3.0, 1.5, 1.5)
    plain = ScannerAugmentation(p=0)(volume, [1, 2, 3], voxel_mm_zyx=voxel, units=units)
    assert plain.dtype == torch.float32 and torch.equal(plain, torch.from_numpy(volume[1:4].astype(np.float32)))
    always = ScannerAugmentation(p=1)
    a, b, c = (always(volume, [1, 2, 3], voxel_mm_zyx=voxel, units=units, generator=seeded(s)) for s in (7, 7, 8))
    assert a.shape == (3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("options, message", [
    ({"p": 1.5}, r"p must be a probability in \[0, 1\], got 1.5"),
    ({"noise_hu": (-1.0, 5.0)}, "noise_hu must be >= 0 HU, got -1.0"),
    ({"kernel": (0.5, -0.5)}, r"kernel must be a range \(low, high\) with low <= high, got \(0.5, -0.5\)"),
    ({"max_slice_mm": 0.0}, "slice_mm must be > 0 mm or None, got 0.0"),
])
def test_scanner_augmentation_refuses_bad_ranges(options, message):
    with pytest.raises(ValueError, match=message):
        ScannerAugmentation(**options)


# ---- The cache's voxel size -----------------------------------------------------------------------
BASE = {"original_spacing_xyz": [0.8, 0.9, 3.0], "original_shape_zyx": [10, 512, 400], "size": 256,
        "orientation": {"stored": "LPS", "network": "LPS"}}


@pytest.mark.parametrize("record, expected", [
    (BASE, (3.0, 0.9 * 512 / 256, 0.8 * 400 / 256)),
    (BASE | {"crop": {"method": "body", "threshold_hu": -500, "margin_mm": 10, "box_yx": [10, 20, 300]}},
     (3.0, 0.9 * 300 / 256, 0.8 * 300 / 256)),
    (BASE | {"orientation": {"stored": "PLS", "network": "LPS"}}, (3.0, 0.8 * 400 / 256, 0.9 * 512 / 256)),
])
def test_cache_voxel_mm(record, expected):
    assert cache_voxel_mm(record, "P1") == pytest.approx(expected)


def test_cache_voxel_mm_names_a_record_without_geometry():
    with pytest.raises(ValueError, match="P1: meta.json has no grid geometry .*re-run normalize_ct_and_masks.py"):
        cache_voxel_mm({"orientation": BASE["orientation"]}, "P1: meta.json")
