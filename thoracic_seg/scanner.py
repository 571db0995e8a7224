"""Other scanners: a CT as another scanner would show it (thicker slices, another reconstruction kernel,
more noise, another calibration), for training (:class:`ScannerAugmentation`, ``train_multi_organ.py
--augment-scanner``) and for scoring a held-out patient "as if from another scanner" (:func:`rerender`).

Both go through :func:`render_slices`, which works in HU or in a patient's z-score units (the training
cache, phase 3) through the linear map :class:`Units`. Arrays are (Z, Y, X) in z-y-x order; numpy and
torch only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

#: Noise, the sigma (HU) of the white noise added, on top of the scan's own: soft-tissue noise is about
#: 10-20 HU on a standard-dose chest CT at 2.5-3 mm and 25-50 HU on a low-dose PET/CT attenuation CT or
#: at 1.25 mm (noise grows as 1 / sqrt(dose x slice thickness)). Training adds it on the network grid,
#: where the 512 -> 256 resize has kept 0.3 (white) to 0.6 (a standard kernel's) of the scan's noise:
#: 40 HU there is about 65 HU on the scan's grid, a margin above the noisiest of those scans.
NOISE_HU: tuple[float, float] = (0.0, 40.0)
#: Reconstruction kernel: ``(1 + a) x - a G(x)`` with G a Gaussian blur. a = -1 is the blur (a softer
#: kernel), a > 0 an unsharp mask (a sharper lung or bone kernel: edges overshoot, noise gets finer and
#: stronger). A Gaussian of sigma 0.5-1.5 mm halves the contrast at 3.7-1.2 lp/cm: enough to take a
#: standard body kernel (MTF50 about 4 lp/cm) to the softest, and the unsharp mask lifts the band in
#: which sharp lung kernels (MTF50 up to about 7 lp/cm) exceed it.
KERNEL_AMOUNT: tuple[float, float] = (-1.0, 1.0)
KERNEL_SIGMA_MM: tuple[float, float] = (0.5, 1.5)
DEFAULT_KERNEL_SIGMA_MM = 1.0
#: Calibration, HU' = gain x HU + shift: water is calibrated to 0 +- 4 HU, but another vendor or tube
#: voltage moves fat and soft tissue by 10-20 HU and bone by a few percent.
GAIN: tuple[float, float] = (0.95, 1.05)
SHIFT_HU: tuple[float, float] = (-20.0, 20.0)
#: Slice thickness (mm), drawn between the patient's own slice spacing and this: planning and PET/CT
#: scans are reconstructed at 1-5 mm. Thinner slices than the scan's cannot be made (the detail is not
#: there); they differ from it mostly by their noise, which NOISE_HU covers.
MAX_SLICE_MM = 5.0
#: The chance that a training slice is re-rendered; the others keep the native scanner's look.
DEFAULT_P = 0.5
GAUSSIAN_TRUNCATE = 4.0  # kernel radius in sigmas, as scipy.ndimage.gaussian_filter
_SLICES_PER_CHUNK = 32  # bounds rerender's float32 working memory


@dataclass(frozen=True)
class Rendition:
    """How another scanner shows a CT, validated on creation (``ValueError`` naming the value).

    ``slice_mm``: thickness of the slices (a rectangular slice profile; None: the scan's own);
    ``kernel``: the amount a of :data:`KERNEL_AMOUNT`'s formula (>= -1; 0: the scan's own kernel) with
    Gaussian ``kernel_sigma_mm``; ``noise_hu``: sigma of the white noise added before the kernel, which
    shapes it as a reconstruction kernel shapes quantum noise; ``gain`` and ``shift_hu``: HU' = gain x HU
    + shift.
    """

    slice_mm: float | None = None
    kernel: float = 0.0
    kernel_sigma_mm: float = DEFAULT_KERNEL_SIGMA_MM
    noise_hu: float = 0.0
    gain: float = 1.0
    shift_hu: float = 0.0

    def __post_init__(self) -> None:
        rules = (("slice_mm", lambda v: v is None or v > 0, "> 0 mm or None"),
                 ("kernel", lambda v: v >= -1, ">= -1 (-1: a full Gaussian blur)"),
                 ("kernel_sigma_mm", lambda v: v > 0, "> 0 mm"), ("noise_hu", lambda v: v >= 0, ">= 0 HU"),
                 ("gain", lambda v: v > 0, "> 0"), ("shift_hu", lambda v: True, "a number of HU"))
        for name, ok, rule in rules:
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"{name} must be a finite number, got {value!r}")
                object.__setattr__(self, name, float(value))
            if not ok(value):
                raise ValueError(f"{name} must be {rule}, got {value!r}")


@dataclass(frozen=True)
class Units:
    """The units of a volume: a value is (HU - ``mean``) / ``std``, clipped to ``window`` (HU) when given,
    as phase 3 made the training cache. ``Units()`` is plain HU."""

    mean: float = 0.0
    std: float = 1.0
    window: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mean) and math.isfinite(self.std) and self.std > 0):
            raise ValueError(f"units need a finite mean and a std > 0 HU, got mean {self.mean}, std {self.std}")

    @classmethod
    def of_cache(cls, record: Mapping[str, Any], where: str) -> Units:
        """The units of a patient's training cache from its ``meta.json`` ``record``; ``ValueError``
        naming ``where`` when the record lacks them (re-run phase 3)."""
        try:
            low, high = (float(v) for v in record["window"])
            return cls(float(record["mean"]), float(record["std"]), (low, high))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where} holds no valid window, mean and std ({exc}); re-run "
                             "normalize_ct_and_masks.py --overwrite") from None


HU = Units()


# ---- The operations (float32 torch tensors (N, Y, X), N slices) ---------------------------------
def slab_weights(slice_mm: float | None, spacing_mm: float) -> np.ndarray:
    """float64 (2r + 1,) weights of slices z - r .. z + r making a slice ``slice_mm`` thick centred on z
    from slices ``spacing_mm`` apart (each taken as thick as the spacing): the overlap of a rectangular
    profile with each slice, summing to 1. ``[1.0]`` when ``slice_mm`` is None or not thicker than the
    spacing. 5 mm from 3 mm: [0.2, 0.6, 0.2]; 4 mm from 1 mm: [1, 2, 2, 2, 1] / 8."""
    if not (math.isfinite(spacing_mm) and spacing_mm > 0):
        raise ValueError(f"slice spacing must be > 0 mm, got {spacing_mm!r}")
    if slice_mm is None or slice_mm <= spacing_mm:
        return np.ones(1)
    half = slice_mm / 2
    r = math.ceil(half / spacing_mm + 0.5) - 1
    centres = np.arange(-r, r + 1) * spacing_mm
    overlap = np.minimum(centres + spacing_mm / 2, half) - np.maximum(centres - spacing_mm / 2, -half)
    return overlap / overlap.sum()


def thicken(volume_zyx: Any, centres: Sequence[int] | np.ndarray, weights: np.ndarray) -> torch.Tensor:
    """float32 (N, Y, X): for each of the N slice indices ``centres``, the ``weights``-weighted sum
    (:func:`slab_weights`) of the slices around it, indices clamped to the volume as in
    ``grid.context_indices``. ``volume_zyx`` (Z, Y, X) any numeric array, a memory map will do: only the
    slices needed are read."""
    centres = np.asarray(centres, dtype=np.int64).reshape(-1)
    weights = np.asarray(weights, dtype=np.float64)
    r = (len(weights) - 1) // 2
    rows = np.clip(centres[:, None] + np.arange(-r, r + 1), 0, len(volume_zyx) - 1)
    low = int(rows.min())
    block = torch.from_numpy(np.array(volume_zyx[low:int(rows.max()) + 1])).to(torch.float32)
    if r == 0:
        return block[torch.from_numpy(rows[:, 0] - low)]
    # One product: mix[n, slice] = the weight of that slice in slice n (clamped ends add up).
    mix = np.zeros((len(centres), len(block)), dtype=np.float32)
    np.add.at(mix, (np.arange(len(centres))[:, None], rows - low), weights[None].astype(np.float32))
    return (torch.from_numpy(mix) @ block.reshape(len(block), -1)).reshape(len(centres), *block.shape[1:])


def gaussian_weights(sigma_px: float) -> torch.Tensor:
    """float32 (2r + 1,) normalised Gaussian of ``sigma_px`` pixels, r = round(4 sigma) as scipy's."""
    r = int(GAUSSIAN_TRUNCATE * sigma_px + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma_px) ** 2)
    return torch.from_numpy(w / w.sum()).to(torch.float32)


def gaussian_blur(images: torch.Tensor, sigma_px_yx: Sequence[float]) -> torch.Tensor:
    """float32 (N, Y, X) blurred in-plane by a Gaussian of ``sigma_px_yx`` pixels (rows, columns),
    edges continued by their nearest pixel (``scipy.ndimage.gaussian_filter(mode="nearest")``)."""
    out = images[:, None]
    for axis, sigma in enumerate(sigma_px_yx):
        w = gaussian_weights(float(sigma))
        r = (len(w) - 1) // 2
        if r == 0:
            continue
        shape, pad = ((1, 1, len(w), 1), (0, 0, r, r)) if axis == 0 else ((1, 1, 1, len(w)), (r, r, 0, 0))
        out = F.conv2d(F.pad(out, pad, mode="replicate"), w.reshape(shape))
    return out[:, 0]


def kernel_filter(images: torch.Tensor, sigma_px_yx: Sequence[float], amount: float) -> torch.Tensor:
    """float32 (N, Y, X) as another reconstruction kernel: ``(1 + amount) x - amount G(x)``, G the
    :func:`gaussian_blur` of ``sigma_px_yx``; -1 is G(x), 0 the images themselves, > 0 sharper."""
    if amount == 0:
        return images
    return torch.lerp(images, gaussian_blur(images, sigma_px_yx), -amount)


def render_slices(volume_zyx: Any, centres: Sequence[int] | np.ndarray, rendition: Rendition, *,
                  voxel_mm_zyx: Sequence[float], units: Units = HU,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 (N, Y, X): the slices ``centres`` of ``volume_zyx`` (Z, Y, X in ``units``, voxels of
    ``voxel_mm_zyx`` mm) as the scanner of ``rendition`` shows them, in the same units: thicker
    slices (:func:`thicken`), white noise, the kernel (:func:`kernel_filter`), gain and shift, then
    the window of ``units`` if any. Noise is drawn from ``generator`` (None: torch's global one)."""
    dz, dy, dx = (float(v) for v in voxel_mm_zyx)
    images = thicken(volume_zyx, centres, slab_weights(rendition.slice_mm, dz))
    if rendition.noise_hu > 0:
        images += torch.randn(images.shape, generator=generator) * (rendition.noise_hu / units.std)
    sigma = rendition.kernel_sigma_mm
    images = kernel_filter(images, (sigma / dy, sigma / dx), rendition.kernel)
    if rendition.gain != 1 or rendition.shift_hu != 0:
        offset = ((rendition.gain - 1) * units.mean + rendition.shift_hu) / units.std
        images = images * rendition.gain + offset
    if units.window is not None:
        low, high = ((w - units.mean) / units.std for w in units.window)
        images = images.clamp_(low, high)
    return images


# ---- A held-out patient as if from another scanner -----------------------------------------------
def rerender(hu_zyx: np.ndarray, spacing_zyx: Sequence[float], *, slice_mm: float | None = None,
             kernel: float = 0.0, kernel_sigma_mm: float = DEFAULT_KERNEL_SIGMA_MM, noise_hu: float = 0.0,
             gain: float = 1.0, shift_hu: float = 0.0, seed: int = 0) -> np.ndarray:
    """A CT ``hu_zyx`` (Z, Y, X) HU, voxels ``spacing_zyx`` mm, as another scanner would show it
    (:class:`Rendition` says what each option does): same shape, dtype and grid (thicker slices are
    averaged along z and kept on the scan's own slice positions; integer dtypes are rounded and clipped
    to the dtype's range). The noise is drawn from a generator seeded by ``seed``: the same arguments
    give the same volume. ``ValueError`` for a bad volume, spacing or option."""
    rendition = Rendition(slice_mm, kernel, kernel_sigma_mm, noise_hu, gain, shift_hu)
    hu = np.asarray(hu_zyx)
    if hu.ndim != 3 or hu.size == 0:
        raise ValueError(f"expected a non-empty (Z, Y, X) CT, got shape {hu.shape}")
    if not (np.issubdtype(hu.dtype, np.integer) or np.issubdtype(hu.dtype, np.floating)):
        raise ValueError(f"expected a CT of integer or float HU, got dtype {hu.dtype}")
    spacing = [float(v) for v in spacing_zyx]
    if len(spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in spacing):
        raise ValueError(f"spacing_zyx must be three positive mm values (z, y, x), got {tuple(spacing_zyx)}")
    generator = torch.Generator().manual_seed(int(seed))
    out = np.empty(hu.shape, dtype=hu.dtype)
    for start in range(0, len(hu), _SLICES_PER_CHUNK):
        centres = np.arange(start, min(start + _SLICES_PER_CHUNK, len(hu)))
        chunk = render_slices(hu, centres, rendition, voxel_mm_zyx=spacing, generator=generator).numpy()
        if np.issubdtype(hu.dtype, np.integer):
            info = np.iinfo(hu.dtype)
            chunk = np.clip(np.rint(chunk), info.min, info.max)
        out[centres[0]:centres[-1] + 1] = chunk
    return out


# ---- Training ---------------------------------------------------------------------------------
class ScannerAugmentation:
    """Training slices re-rendered as another scanner would show them, with probability ``p``: a
    re-rendered slice gets every change at once (another scanner has its own noise, kernel, calibration
    and slice thickness), each amount drawn uniformly from its range (module constants; each range holds
    "no change"). Slice thickness is drawn between the patient's slice spacing and ``max_slice_mm``.
    Amounts are in HU and mm, brought to the cache's units and pixels by the patient's :class:`Units`
    and voxel size. Deterministic for a given ``generator`` state.
    """

    def __init__(self, p: float = DEFAULT_P, noise_hu: tuple[float, float] = NOISE_HU,
                 kernel: tuple[float, float] = KERNEL_AMOUNT,
                 kernel_sigma_mm: tuple[float, float] = KERNEL_SIGMA_MM, gain: tuple[float, float] = GAIN,
                 shift_hu: tuple[float, float] = SHIFT_HU, max_slice_mm: float = MAX_SLICE_MM) -> None:
        if not 0 <= p <= 1:
            raise ValueError(f"p must be a probability in [0, 1], got {p}")
        ranges = dict(kernel=kernel, kernel_sigma_mm=kernel_sigma_mm, noise_hu=noise_hu, gain=gain, shift_hu=shift_hu)
        for name, (low, high) in ranges.items():
            if not low <= high:
                raise ValueError(f"{name} must be a range (low, high) with low <= high, got {(low, high)}")
        for end in (0, 1):  # both ends must be valid renditions
            Rendition(max_slice_mm, **{name: bounds[end] for name, bounds in ranges.items()})
        self.p = float(p)
        self.ranges = {name: (float(low), float(high)) for name, (low, high) in ranges.items()}
        self.max_slice_mm = float(max_slice_mm)

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={bounds}" for name, bounds in self.ranges.items())
        return f"ScannerAugmentation(p={self.p}, {shown}, max_slice_mm={self.max_slice_mm})"

    def draw(self, spacing_z_mm: float, generator: torch.Generator | None = None) -> Rendition | None:
        """The rendition of one slice of a scan with slices ``spacing_z_mm`` apart (None: left as it is).
        Draws the same count of numbers from ``generator`` every time."""
        u = torch.rand(2 + len(self.ranges), generator=generator, dtype=torch.float64).tolist()
        if u[0] >= self.p:
            return None
        thickness = spacing_z_mm + u[1] * max(0.0, self.max_slice_mm - spacing_z_mm)
        amounts = {name: low + (high - low) * t for (name, (low, high)), t in zip(self.ranges.items(), u[2:])}
        return Rendition(thickness if thickness > spacing_z_mm else None, **amounts)

    def __call__(self, volume_zyx: Any, centres: Sequence[int] | np.ndarray, *, voxel_mm_zyx: Sequence[float],
                 units: Units, generator: torch.Generator | None = None) -> torch.Tensor:
        """float32 (N, Y, X): slices ``centres`` of a cached volume (Z, S, S) in ``units``, re-rendered
        or (with probability 1 - p) read as they are; one rendition for all N context slices."""
        rendition = self.draw(float(voxel_mm_zyx[0]), generator)
        if rendition is None:
            return thicken(volume_zyx, centres, np.ones(1))
        return render_slices(volume_zyx, centres, rendition, voxel_mm_zyx=voxel_mm_zyx, units=units,
                             generator=generator)
