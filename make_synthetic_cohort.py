"""Phase 1 (demo data): write a synthetic NSCLC-Radiomics-like cohort as real DICOM.

    (nothing) -> DATA/raw/synthetic/<PatientID>/<study>/<series>/*.dcm  +  DATA/synthetic_truth/

Each patient is a thoracic CT series and an RTSTRUCT in another study/series folder, linked only by
UIDs, laid out as a TCIA download; ROI names and sets vary as in the real collection (:class:`Variant`).
The true label map ``<truth>/<PatientID>.nii.gz`` (uint8 0-7, CT grid) is the rasterisation of the
very polygons written to the RTSTRUCT; ``<truth>/cohort.json`` records each patient's ROI names and
labels. Everything is a function of the seed: the same arguments give byte-identical files. Polygons
are filled by ``thoracic_seg/rtstruct_read.py`` (``fill_polygons_2d``), the RTSTRUCT is written by
``thoracic_seg/rtstruct_write.py``.

Usage: python make_synthetic_cohort.py --data-root DATA --patients 20 --size 128 --slices 40
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import time
import uuid
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RTStructureSetStorage
from tqdm import tqdm

from thoracic_seg import organs
from thoracic_seg.batch import write_nifti, write_text_atomic
from thoracic_seg.layout import DataLayout
from thoracic_seg.rtstruct_read import fill_polygons_2d
from thoracic_seg.rtstruct_write import CTReference, RoiContours, add_structure_set, write_rtstruct

log = logging.getLogger(__name__)

# ---- Constants -------------------------------------------------------------------------------
RESCALE_INTERCEPT = -1024  # stored value = HU + 1024
HU_MIN, HU_MAX = -1024, 3071  # what 12 bits above the intercept can hold
MIN_SIZE, MAX_SIZE = 32, 1024
MIN_SLICES, MAX_SLICES = 8, 400
PTV_MARGIN_MM = 10.0
RIB_RADIUS_MM = (3.5, 6.0)
COHORT_JSON = "cohort.json"
PATIENT_ID_PATTERN = re.compile(r"SYN-\d{3,}")
_UID_NAMESPACE = uuid.UUID("6f1d3c52-5b8e-4a4f-9a53-7d2b0c1e9f41")  # this generator's UIDs

#: Mean Hounsfield values of the tissues (noise is added on top).
HU = {
    "air": -1000.0, "fat": -100.0, "muscle": 45.0, "lung": -850.0, "blood": 40.0,
    "esophagus": 35.0, "bone_cortex": 900.0, "bone_cancellous": 320.0, "rib": 700.0,
    "csf": 15.0, "cord": 35.0, "tumour": 35.0, "vessel": 30.0,
}

DEFAULT_NAMES = {
    "gtv": ("GTV-1", "gtv-2", "gtv-3"), "lung_right": "Lung-Right", "lung_left": "Lung-Left",
    "lungs_total": "Lungs-Total", "heart": "Heart", "esophagus": "Esophagus",
    "spinal_cord": "Spinal-Cord", "ptv": "PTV", "external": "External", "lungs_gtv": "Lungs-GTV",
}
FRENCH_NAMES = {
    "gtv": ("GTV primaire", "gtv-2", "gtv-3"), "lung_right": "POUMON D", "lung_left": "POUMON G",
    "lungs_total": "POUMONS", "heart": "COEUR", "esophagus": "OESOPHAGE",
    "spinal_cord": "MOELLE", "ptv": "PTV", "external": "CONTOUR EXTERNE", "lungs_gtv": "POUMONS-GTV",
}


@dataclass(frozen=True)
class Variant:
    """Which ROIs a patient's RTSTRUCT has, and two anatomical options.

    The anatomy always has both lungs, heart, esophagus and cord (so they are always in the
    true label map); these flags only decide what is *contoured* and under which names.
    """

    heart_contour: bool = True
    esophagus_contour: bool = True
    extra_gtvs: int = 0  # 0-2 extra tumours, ROIs gtv-2 and gtv-3
    lungs_total: bool = False  # one ROI "Lungs-Total" instead of right and left lungs
    french_names: bool = False
    unrelated_rois: bool = False  # "External" (body) and "Lungs-GTV"
    lung_cavity: bool = False  # an air cavity in one lung: an inner contour (hole)
    esophagus_lumen: bool = False  # air inside the esophagus wall (still esophagus)


#: Variants of the first six patients of every cohort: each option occurs at least once.
VARIANT_CYCLE: tuple[Variant, ...] = (
    Variant(esophagus_lumen=True),
    Variant(heart_contour=False, extra_gtvs=1, lung_cavity=True),
    Variant(lungs_total=True, unrelated_rois=True),
    Variant(french_names=True, esophagus_contour=False, extra_gtvs=1, esophagus_lumen=True),
    Variant(extra_gtvs=2, unrelated_rois=True, lung_cavity=True),
    Variant(heart_contour=False, esophagus_contour=False, lungs_total=True, french_names=True),
)


def variant_for(index: int, rng: np.random.Generator) -> Variant:
    """The variant of cohort patient ``index`` (0-based): :data:`VARIANT_CYCLE` first (so a cohort of
    6 or more has every variant), then random draws with roughly the real collection's frequencies
    (heart contoured in ~1/3 of patients)."""
    if index < len(VARIANT_CYCLE):
        return VARIANT_CYCLE[index]
    return Variant(
        heart_contour=bool(rng.random() < 0.35),
        esophagus_contour=bool(rng.random() < 0.85),
        extra_gtvs=int(rng.choice([0, 0, 0, 1, 2])),
        lungs_total=bool(rng.random() < 0.15),
        french_names=bool(rng.random() < 0.2),
        unrelated_rois=bool(rng.random() < 0.3),
        lung_cavity=bool(rng.random() < 0.2),
        esophagus_lumen=bool(rng.random() < 0.4),
    )


# ---- Geometry and rasterisation (pure functions) ---------------------------------------------
@dataclass(frozen=True)
class Grid:
    """The CT grid: ``size`` x ``size`` pixels of ``spacing`` mm, ``slices`` slices ``thickness``
    mm apart. ``origin`` (x, y, z) is the centre of the first voxel in LPS mm; identity direction."""

    size: int
    slices: int
    spacing: float
    thickness: float
    origin: tuple[float, float, float]

    @property
    def z_positions(self) -> np.ndarray:
        """Slice positions in mm, increasing (float64, ``slices``)."""
        return np.round(self.origin[2] + self.thickness * np.arange(self.slices), 3)

    def to_index(self, polygon_mm: np.ndarray) -> np.ndarray:
        """(N, 2) x, y in mm -> (N, 2) column, row in voxel-index units (voxel centres at integers)."""
        return (polygon_mm - np.asarray(self.origin[:2])) / self.spacing


def _star_polygon(center: tuple[float, float], radius: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """(N, 2) x, y of a star-shaped closed curve (never self-intersecting), rounded to 0.01 mm:
    the RTSTRUCT stores exactly these numbers and the truth map rasterises exactly these."""
    pts = np.stack([center[0] + radius * np.cos(theta), center[1] + radius * np.sin(theta)], axis=1)
    return np.round(pts, 2)


@dataclass
class Blob:
    """A smooth closed curve: an ellipse (semi-axes ``ax`` along x, ``ay`` along y, in mm)
    whose radius is perturbed by harmonics 2..K+1 with relative amplitudes ``amp`` and phases
    that drift slowly with z, so consecutive slices differ a little."""

    ax: float
    ay: float
    amp: np.ndarray
    phase: np.ndarray
    drift: np.ndarray  # rad / mm

    @classmethod
    def random(cls, rng: np.random.Generator, ax: float, ay: float, roughness: float = 0.06,
               harmonics: int = 3) -> "Blob":
        k = np.arange(2, harmonics + 2)
        return cls(ax, ay, rng.uniform(0.3, 1.0, harmonics) * roughness / np.sqrt(k - 1),
                   rng.uniform(0, 2 * np.pi, harmonics), rng.uniform(-0.02, 0.02, harmonics))

    @classmethod
    def ellipse(cls, ax: float, ay: float) -> "Blob":
        """A plain ellipse, no perturbation."""
        return cls(ax, ay, np.zeros(1), np.zeros(1), np.zeros(1))

    def radius(self, theta: np.ndarray, z: float, scale: float = 1.0) -> np.ndarray:
        """Radius in mm at angles ``theta`` (rad, from +x towards +y) on slice ``z``."""
        base = 1.0 / np.sqrt((np.cos(theta) / self.ax) ** 2 + (np.sin(theta) / self.ay) ** 2)
        k = np.arange(2, self.amp.size + 2)[:, None]
        wobble = 1.0 + (self.amp[:, None] * np.cos(k * theta + (self.phase + self.drift * z)[:, None])).sum(0)
        return scale * base * wobble

    def max_radius(self) -> float:
        return max(self.ax, self.ay) * (1.0 + float(self.amp.sum()))

    def min_radius(self) -> float:
        return min(self.ax, self.ay) * (1.0 - float(self.amp.sum()))


def _n_points(mean_radius_mm: float, spacing: float) -> int:
    """Vertices of a contour: about one per half voxel of perimeter, 12 to 200."""
    return int(np.clip(2 * np.pi * mean_radius_mm / max(0.5 * spacing, 0.5), 12, 200))


def _theta(n: int) -> np.ndarray:
    return np.linspace(0.0, 2 * np.pi, n, endpoint=False)


def _smooth_step(x: float) -> float:
    x = float(np.clip(x, 0.0, 1.0))
    return x * x * (3 - 2 * x)


# ---- Anatomy ---------------------------------------------------------------------------------
@dataclass
class Tumour:
    """An ellipsoid-like tumour: centre (x, y, z) mm, radii (rx, ry, rz) mm, bumpy outline."""

    center: np.ndarray
    rz: float
    outline: Blob

    def bounding_radius(self) -> float:
        return max(self.outline.max_radius(), self.rz)

    def polygon(self, z: float, spacing: float, margin: float = 0.0) -> np.ndarray | None:
        """Cross-section at slice ``z``, grown by ``margin`` mm (the PTV); None when too small.

        A grown section contains the plain one: both the z factor and the radius grow."""
        rz = self.rz + margin
        k = 1.0 - ((z - self.center[2]) / rz) ** 2
        if k <= 0:
            return None
        scale = np.sqrt(k)
        if scale * (self.outline.min_radius() + margin) < 1.0:
            return None
        theta = _theta(_n_points(scale * (self.outline.ax + margin), spacing))
        r = scale * (self.outline.radius(theta, z) + margin)
        return _star_polygon((self.center[0], self.center[1]), r, theta)


@dataclass
class Anatomy:
    """Per-patient anatomical parameters (mm, LPS). ``slice_shapes(z)`` turns them into polygons.

    Body, fat, muscle, two lungs with vessels and sometimes a cavity, heart, aorta, esophagus
    sometimes with an air lumen, vertebra with the spinal cord in its canal, ribs, sternum, one to
    three tumours; all vary per patient and smoothly along z.
    """

    grid: Grid
    variant: Variant
    cx: float
    cy: float
    body: Blob
    fat_mm: float
    lungs: dict[str, Blob]  # "lung_right", "lung_left"
    lung_x: dict[str, float]
    lung_y: float
    lung_base_u: float
    lung_apex_u: float
    heart: Blob
    heart_xy: tuple[float, float]
    heart_u: tuple[float, float]
    vertebra_y: float
    vertebra_r: float
    canal_r: float
    cord_r: float
    esophagus: Blob
    esophagus_xy: tuple[float, float]
    lumen_r: float
    aorta_r: float
    ribs: list[tuple[float, float]]  # (angle rad, radius mm)
    vessels: list[tuple[str, np.ndarray, np.ndarray, float]]  # lung, point at z0, slope, radius
    tumours: list[Tumour]
    cavity: tuple[str, float, float] | None  # lung, z centre, radius
    hu_offsets: dict[str, float]
    noise_hu: float
    z_first: float = 0.0
    z_last: float = 1.0

    def u(self, z: float) -> float:
        """Fraction of the scanned length: 0 at the lowest (inferior) slice, 1 at the top."""
        return (z - self.z_first) / max(self.z_last - self.z_first, 1e-6)

    def lung_scale(self, u: float) -> float:
        up = np.clip((u - self.lung_base_u) / 0.2, 0, 1) ** 0.5
        down = np.clip((self.lung_apex_u - u) / 0.35, 0, 1) ** 0.6
        return float(up * down)

    def heart_scale(self, u: float) -> float:
        lo, hi = self.heart_u
        t = (u - lo) / (hi - lo)
        return float(np.sin(np.pi * t) ** 0.6) if 0 < t < 1 else 0.0

    def lung_center(self, side: str, u: float) -> tuple[float, float]:
        # Near the diaphragm only the posterior recesses remain: the centre moves back.
        back = 0.12 * self.body.ay * (1 - _smooth_step((u - self.lung_base_u) / 0.25))
        return self.lung_x[side], self.lung_y + back

    def inner_axes(self, body_scale: float, inset_mm: float) -> tuple[float, float]:
        """Semi-axes (mm) of an ellipse about the body centre that stays ``inset_mm`` inside
        the skin on a slice whose body is scaled by ``body_scale`` (whatever the wobble)."""
        wobble = 1.0 - float(self.body.amp.sum())
        return (self.body.ax * body_scale * wobble - inset_mm, self.body.ay * body_scale * wobble - inset_mm)

    def _ray_to_chest_wall(self, x: float, y: float, theta: np.ndarray, body_scale: float) -> np.ndarray:
        """Distance (mm) from (x, y), inside the chest, along directions ``theta`` to the
        chest-wall ellipse: lungs are clipped to it so ribs never lie inside a lung."""
        a, b = self.inner_axes(body_scale, self.fat_mm + 2 * RIB_RADIUS_MM[1] + 4.0)
        px, py = (x - self.cx) / a, (y - self.cy) / b
        dx, dy = np.cos(theta) / a, np.sin(theta) / b
        qa, qb, qc = dx * dx + dy * dy, 2 * (px * dx + py * dy), px * px + py * py - 1.0
        return (-qb + np.sqrt(np.maximum(qb * qb - 4 * qa * qc, 0.0))) / (2 * qa)

    def inside_body(self, center_xy: np.ndarray, radius: float) -> bool:
        """True when a disc of ``radius`` mm about ``center_xy`` lies within the muscle layer."""
        a, b = self.inner_axes(0.96, self.fat_mm)  # 0.96: the narrowest body scale
        angles = _theta(24)
        px = center_xy[0] + radius * np.cos(angles) - self.cx
        py = center_xy[1] + radius * np.sin(angles) - self.cy
        return bool(np.all((px / a) ** 2 + (py / b) ** 2 < 1.0))

    def slice_shapes(self, z: float) -> dict[str, Any]:
        """Polygons (lists of (N, 2) x, y mm arrays, rounded to 0.01 mm, LPS: +x = patient left = image
        right, +y = posterior = image down, +z = head) on slice ``z``; the RTSTRUCT stores them exactly.

        Keys of structures that get an ROI: ``body``, ``lung_right``, ``lung_left`` (outer contour plus,
        with a cavity, the hole), ``heart``, ``esophagus``, ``spinal_cord``, ``gtv`` (a list per tumour),
        ``ptv``. The rest only shape the Hounsfield values.
        """
        sp = self.grid.spacing
        u = self.u(z)
        out: dict[str, Any] = {}
        body_scale = 0.96 + 0.06 * u
        theta = _theta(_n_points(self.body.ax * body_scale, sp))
        r_body = self.body.radius(theta, z, body_scale)
        out["body"] = [_star_polygon((self.cx, self.cy), r_body, theta)]
        out["muscle"] = [_star_polygon((self.cx, self.cy), r_body - self.fat_mm, theta)]

        # Mediastinal fat: between the lungs, in front of the spine.
        out["mediastinum"] = [_star_polygon(
            (self.cx + 8, self.cy - 0.05 * self.body.ay),
            Blob(0.30 * self.body.ax, 0.55 * self.body.ay, self.heart.amp, self.heart.phase,
                 self.heart.drift).radius(theta, z), theta)]

        # Heart (lower part of the scan), anterior and to the patient's left (+x).
        hs = self.heart_scale(u)
        out["heart"] = []
        if hs > 0.2:
            th = _theta(_n_points(self.heart.ax * hs, sp))
            out["heart"] = [_star_polygon(self.heart_xy, self.heart.radius(th, z, hs), th)]

        # Lungs, indented by the heart, with vessels and maybe a cavity (a hole = inner contour).
        ls = self.lung_scale(u)
        for side in ("lung_right", "lung_left"):
            out[side] = []
            out[side + "_vessels"] = []
            if ls < 0.15:
                continue
            lcx, lcy = self.lung_center(side, u)
            blob = self.lungs[side]
            th = _theta(_n_points(blob.ax * ls, sp))
            r = blob.radius(th, z, ls)
            if hs > 0:
                towards = np.arctan2(self.heart_xy[1] - lcy, self.heart_xy[0] - lcx)
                depth = (0.30 if side == "lung_left" else 0.15) * hs
                r = r * (1 - depth * np.clip(np.cos(th - towards), 0, 1) ** 2)
            r = np.minimum(r, self._ray_to_chest_wall(lcx, lcy, th, body_scale))
            out[side].append(_star_polygon((lcx, lcy), r, th))
            if self.cavity and self.cavity[0] == side:
                _, cz, cr = self.cavity
                k = 1 - ((z - cz) / cr) ** 2
                room = float(r.min()) * np.cos(np.pi / th.size) - 4.0  # inscribed, minus a wall
                rc = min(cr * np.sqrt(max(k, 0.0)), room)
                if k > 0 and rc >= 2.0:
                    tc = _theta(_n_points(rc, sp))
                    out[side].append(_star_polygon((lcx, lcy), np.full(tc.size, rc), tc))
            for lung, p0, slope, vr in self.vessels:
                if lung == side:
                    p = p0 + slope * (z - self.z_first)
                    tv = _theta(12)
                    out[side + "_vessels"].append(_star_polygon(
                        (lcx + p[0] * ls, lcy + p[1] * ls), np.full(12, vr), tv))

        # Spine: vertebral body (cortex + cancellous core), canal, cord, posterior arch.
        vy, vr = self.vertebra_y, self.vertebra_r
        tv = _theta(_n_points(vr, sp))
        out["vertebra"] = [_star_polygon((self.cx, vy), np.full(tv.size, vr), tv)]
        out["vertebra_core"] = [_star_polygon((self.cx, vy), np.full(tv.size, vr - 2.5), tv)]
        canal_y = vy + vr + self.canal_r + 1.5
        out["arch"] = [_star_polygon((self.cx, canal_y + self.canal_r + 3.0),
                                     Blob.ellipse(self.canal_r + 12, 7.0).radius(tv, z), tv)]
        out["arch_ring"] = [_star_polygon((self.cx, canal_y), np.full(tv.size, self.canal_r + 3.0), tv)]
        tc = _theta(_n_points(self.canal_r, sp))
        out["canal"] = [_star_polygon((self.cx, canal_y), np.full(tc.size, self.canal_r), tc)]
        tcord = _theta(_n_points(self.cord_r, sp))
        cord_r = self.cord_r * (1 + 0.1 * np.sin(2 * np.pi * u))
        out["spinal_cord"] = [_star_polygon((self.cx, canal_y - 0.5), np.full(tcord.size, cord_r), tcord)]

        # Esophagus just in front of the vertebra, slightly left; aorta to its left.
        ex = self.esophagus_xy[0] + 4.0 * np.sin(2 * np.pi * u)
        ey = self.esophagus_xy[1]
        te = _theta(_n_points(self.esophagus.ax, sp))
        out["esophagus"] = [_star_polygon((ex, ey), self.esophagus.radius(te, z), te)]
        out["lumen"] = []
        lumen = self.lumen_r * np.sin(np.pi * np.clip(u * 1.6 - 0.2, 0, 1))
        if lumen >= 1.0:
            tl = _theta(16)
            out["lumen"] = [_star_polygon((ex, ey), np.full(16, lumen), tl)]
        ta = _theta(_n_points(self.aorta_r, sp))
        out["aorta"] = [_star_polygon((ex + self.esophagus.ax + self.aorta_r + 3, ey - 2),
                                      np.full(ta.size, self.aorta_r), ta)]

        # Ribs around the inner chest wall (their angle drifts with z: they run obliquely),
        # and the sternum in front in the upper part.
        out["ribs"] = []
        for angle, rib_r in self.ribs:
            a = angle + 0.004 * (z - self.z_first)
            rr = float(self.body.radius(np.array([a]), z, body_scale)[0]) - self.fat_mm - rib_r - 3
            centre = (self.cx + rr * np.cos(a), self.cy + rr * np.sin(a))
            tr = _theta(12)
            out["ribs"].append(_star_polygon(centre, np.full(12, rib_r), tr))
        out["sternum"] = []
        if u > 0.3:
            ry = float(self.body.radius(np.array([-np.pi / 2]), z, body_scale)[0]) - self.fat_mm - 7
            ts = _theta(16)
            out["sternum"] = [_star_polygon((self.cx, self.cy - ry), Blob.ellipse(13.0, 6.0).radius(ts, z), ts)]

        out["gtv"] = [[p] if (p := t.polygon(z, sp)) is not None else [] for t in self.tumours]
        out["ptv"] = [p for t in self.tumours if (p := t.polygon(z, sp, PTV_MARGIN_MM)) is not None]
        return out


def sample_grid(rng: np.random.Generator, size: int, slices: int, body_half_width: float) -> Grid:
    """Field of view 350-500 mm (wide enough for the body), slices 2.5-3 mm apart."""
    fov = max(rng.uniform(350.0, 500.0), 2 * body_half_width + 40.0)
    spacing = round(fov / size, 4)
    thickness = float(rng.choice([2.5, 2.75, 3.0]))
    ox = round(-spacing * (size - 1) / 2 + rng.uniform(-15, 15), 2)
    oy = round(-spacing * (size - 1) / 2 + rng.uniform(-25, 10), 2)
    oz = round(rng.uniform(-420.0, -80.0), 2)
    return Grid(size, slices, spacing, thickness, (ox, oy, oz))


def sample_anatomy(rng: np.random.Generator, size: int, slices: int, variant: Variant) -> Anatomy:
    """Draw one patient's anatomy (all mm, LPS) and CT grid."""
    ax, ay = rng.uniform(135.0, 175.0), rng.uniform(95.0, 125.0)
    grid = sample_grid(rng, size, slices, ax * 1.05)
    cx, cy = rng.uniform(-10, 10), rng.uniform(-8, 8)
    body = Blob.random(rng, ax, ay, roughness=0.03)
    fat = rng.uniform(8.0, 20.0)

    lung_y = cy + rng.uniform(-0.02, 0.06) * ay
    lungs, lung_x = {}, {}
    for side, sign in (("lung_right", -1.0), ("lung_left", 1.0)):
        lx = rng.uniform(0.26, 0.30) * ax
        lungs[side] = Blob.random(rng, lx, rng.uniform(0.55, 0.66) * ay, roughness=0.05)
        lung_x[side] = cx + sign * rng.uniform(0.44, 0.48) * ax
    heart = Blob.random(rng, rng.uniform(0.26, 0.32) * ax, rng.uniform(0.30, 0.36) * ay, 0.05)
    heart_xy = (cx + rng.uniform(0.08, 0.16) * ax, cy - rng.uniform(0.22, 0.30) * ay)
    heart_u = (rng.uniform(-0.05, 0.08), rng.uniform(0.45, 0.62))

    vertebra_r = rng.uniform(14.0, 19.0)
    canal_r = rng.uniform(7.0, 9.5)
    vertebra_y = cy + ay - fat - vertebra_r - 2 * canal_r - 25.0
    eso = Blob.random(rng, rng.uniform(6.5, 10.0), rng.uniform(5.5, 8.0), roughness=0.08, harmonics=2)
    eso_xy = (cx + rng.uniform(0.0, 10.0), vertebra_y - vertebra_r - eso.ay - 3.0)

    ribs = []
    for base in (0.0, np.pi):  # patient left (+x) then right
        n = int(rng.integers(5, 8))
        for a in np.linspace(-1.0, 1.15, n) + rng.normal(0, 0.05, n):
            ribs.append((float(base + (a if base == 0 else -a)), float(rng.uniform(*RIB_RADIUS_MM))))

    vessels = []
    for side in ("lung_right", "lung_left"):
        b = lungs[side]
        for _ in range(int(rng.integers(6, 14))):
            rho, phi = np.sqrt(rng.uniform(0.02, 0.5)), rng.uniform(0, 2 * np.pi)
            p0 = np.array([rho * b.ax * np.cos(phi), rho * b.ay * np.sin(phi)])
            slope = rng.normal(0, 0.15, 2)
            vessels.append((side, p0, slope, float(rng.uniform(1.2, 3.0))))

    anatomy = Anatomy(
        grid=grid, variant=variant, cx=cx, cy=cy, body=body, fat_mm=fat, lungs=lungs,
        lung_x=lung_x, lung_y=lung_y, lung_base_u=rng.uniform(0.0, 0.06),
        lung_apex_u=rng.uniform(0.95, 1.05), heart=heart, heart_xy=heart_xy, heart_u=heart_u,
        vertebra_y=vertebra_y, vertebra_r=vertebra_r, canal_r=canal_r,
        cord_r=rng.uniform(4.0, 5.5), esophagus=eso, esophagus_xy=eso_xy,
        lumen_r=rng.uniform(2.0, 4.0) if variant.esophagus_lumen else 0.0,
        aorta_r=rng.uniform(10.0, 13.0), ribs=ribs, vessels=vessels, tumours=[], cavity=None,
        hu_offsets={k: float(rng.normal(0, 8)) for k in HU}, noise_hu=float(rng.uniform(8, 22)),
        z_first=float(grid.z_positions[0]), z_last=float(grid.z_positions[-1]),
    )
    _place_tumours_and_cavity(rng, anatomy, variant)
    return anatomy


def _place_tumours_and_cavity(rng: np.random.Generator, an: Anatomy, variant: Variant) -> None:
    """Primary tumour in or against one lung, extra tumours near the hila or in the other lung,
    a cavity in the other lung. Tumours are kept apart by more than two PTV margins, so the PTV
    sections of two tumours never overlap (an overlap would read as a hole)."""
    z0, length = an.z_first, an.z_last - an.z_first
    t = an.grid.thickness
    side = str(rng.choice(["lung_right", "lung_left"]))
    other = "lung_left" if side == "lung_right" else "lung_right"

    def make(center_xy, u, r_xy) -> Tumour:
        rz = float(np.clip(r_xy * rng.uniform(0.8, 1.2), 1.6 * t, max(0.3 * length, 1.6 * t)))
        outline = Blob.random(rng, r_xy * rng.uniform(0.85, 1.15), r_xy * rng.uniform(0.85, 1.15),
                              roughness=0.12, harmonics=4)
        return Tumour(np.array([center_xy[0], center_xy[1], z0 + u * length]), rz, outline)

    def in_lung(s: str, rho_range, u) -> tuple[float, float]:
        b = an.lungs[s]
        rho, phi = rng.uniform(*rho_range), rng.uniform(0, 2 * np.pi)
        lcx, lcy = an.lung_center(s, u)
        scale = max(an.lung_scale(u), 0.5)
        return lcx + rho * scale * b.ax * np.cos(phi), lcy + rho * scale * b.ay * np.sin(phi)

    def fits(cand: Tumour) -> bool:  # the PTV too stays inside the body
        return an.inside_body(cand.center[:2], cand.outline.max_radius() + PTV_MARGIN_MM)

    for attempt in range(200):
        u = rng.uniform(0.4, 0.8)
        r = rng.uniform(10.0, 26.0) * (1.0 if attempt < 100 else 0.6)
        primary = make(in_lung(side, (0.2, 0.85), u), u, r)
        if fits(primary):
            an.tumours.append(primary)
            break
    else:  # pragma: no cover - 200 draws in a thorax always find room
        raise RuntimeError("could not place the primary tumour")

    cavity_center = None
    if variant.lung_cavity:
        cu = rng.uniform(0.3, 0.7)
        an.cavity = (other, z0 + cu * length, float(rng.uniform(7.0, 14.0)))
        cavity_center = np.array([*an.lung_center(other, cu), z0 + cu * length])

    for _ in range(variant.extra_gtvs):
        for attempt in range(200):
            u = rng.uniform(0.2, 0.85)
            r = rng.uniform(6.0, 13.0) * (1.0 if attempt < 100 else 0.6)
            if rng.random() < 0.6:  # a hilar node, beside the mediastinum
                s = str(rng.choice(["lung_right", "lung_left"]))
                sign = -1.0 if s == "lung_right" else 1.0
                xy = (an.cx + sign * rng.uniform(0.2, 0.3) * an.body.ax, an.cy + rng.uniform(-0.1, 0.1) * an.body.ay)
            else:
                xy = in_lung(str(rng.choice([side, other])), (0.2, 0.8), u)
            cand = make(xy, u, r)
            far = fits(cand) and all(np.linalg.norm(cand.center - o.center) > cand.bounding_radius() + o.bounding_radius()
                      + 2 * PTV_MARGIN_MM + 3 for o in an.tumours)
            if cavity_center is not None:
                far &= np.linalg.norm(cand.center - cavity_center) > cand.bounding_radius() + an.cavity[2] + 15
            if far:
                an.tumours.append(cand)
                break
        else:  # pragma: no cover - 200 draws in a thorax always find room
            raise RuntimeError("could not place an extra tumour")


# ---- Images: Hounsfield values and the true label map ----------------------------------------
def render_slice(an: Anatomy, shapes: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """Hounsfield values of one slice, float32 (rows = y, cols = x), noise included."""
    g = an.grid
    shape = (g.size, g.size)
    hu = np.full(shape, HU["air"], np.float32)

    def paint(polys: list, tissue: str, where: np.ndarray | None = None, value: float | None = None):
        if not polys:
            return
        mask = fill_polygons_2d([g.to_index(p) for p in polys], shape)
        if where is not None:
            mask &= where
        hu[mask] = (HU[tissue] + an.hu_offsets[tissue]) if value is None else value

    paint(shapes["body"], "fat")
    inside = hu > -500
    paint(shapes["muscle"], "muscle")
    paint(shapes["mediastinum"], "fat")
    rows = an.grid.origin[1] + an.grid.spacing * np.arange(g.size)
    for side in ("lung_right", "lung_left"):
        if not shapes[side]:
            continue
        mask = fill_polygons_2d([g.to_index(p) for p in shapes[side][:1]], shape)
        # Gravity: the posterior lung is denser.
        gradient = 60.0 * (rows - an.lung_y) / an.lungs[side].ay
        lung_hu = HU["lung"] + an.hu_offsets["lung"] + np.broadcast_to(gradient[:, None], shape)
        hu[mask] = lung_hu[mask]
        paint(shapes[side + "_vessels"], "vessel", where=mask)
        if len(shapes[side]) > 1:
            paint(shapes[side][1:], "air", value=HU["air"])
    paint(shapes["ribs"], "rib")
    paint(shapes["sternum"], "rib")
    paint(shapes["aorta"], "blood")
    paint(shapes["heart"], "blood")
    paint(shapes["esophagus"], "esophagus")
    paint(shapes["lumen"], "air", value=HU["air"])
    paint(shapes["arch"], "bone_cortex")
    paint(shapes["arch_ring"], "bone_cortex")
    paint(shapes["vertebra"], "bone_cortex")
    paint(shapes["vertebra_core"], "bone_cancellous")
    paint(shapes["canal"], "csf")
    paint(shapes["spinal_cord"], "cord")
    for polys in shapes["gtv"]:
        paint(polys, "tumour")
    hu += rng.normal(0.0, an.noise_hu, shape).astype(np.float32)
    hu[~inside] = HU["air"] + rng.normal(0.0, 5.0, int((~inside).sum())).astype(np.float32)
    return hu


def label_slice(an: Anatomy, shapes: dict[str, Any], with_ptv: bool) -> np.ndarray:
    """True labels of one slice, uint8 (rows, cols): each structure's polygons filled even-odd,
    then painted from the lowest to the highest organs.PRIORITY so the winner is on top."""
    g = an.grid
    shape = (g.size, g.size)
    polys_by_label = {
        organs.GTV: [p for polys in shapes["gtv"] for p in polys],
        organs.PTV: shapes["ptv"] if with_ptv else [],
        organs.RIGHT_LUNG: shapes["lung_right"], organs.LEFT_LUNG: shapes["lung_left"],
        organs.HEART: shapes["heart"], organs.ESOPHAGUS: shapes["esophagus"],
        organs.SPINAL_CORD: shapes["spinal_cord"],
    }
    labels = np.zeros(shape, np.uint8)
    for label in reversed(organs.PRIORITY):
        polys = polys_by_label[label]
        if label == organs.GTV:  # one ROI per tumour: fill each on its own, then unite
            mask = np.zeros(shape, bool)
            for tumour_polys in shapes["gtv"]:
                if tumour_polys:
                    mask |= fill_polygons_2d([g.to_index(p) for p in tumour_polys], shape)
        elif polys:
            mask = fill_polygons_2d([g.to_index(p) for p in polys], shape)
        else:
            continue
        labels[mask] = label
    return labels


# ---- ROIs ------------------------------------------------------------------------------------
@dataclass
class Roi:
    """One RTSTRUCT ROI: its name, what it means, and its polygons per slice index."""

    name: str
    label: int | None  # organs label, organs.BOTH_LUNGS, or None (not ours)
    interpreted_type: str
    color: tuple[int, int, int]
    contours: list[list[np.ndarray]] = field(default_factory=list)


def build_rois(an: Anatomy, slice_shapes: list[dict[str, Any]], with_ptv: bool) -> list[Roi]:
    """The RTSTRUCT's ROIs for this patient's variant (names, which ROIs, see :class:`Variant`); the
    caller shuffles them, as real structure sets list ROIs in no particular order. No PTV unless
    ``with_ptv`` (``--ptv``: the GTV grown by 10 mm).
    """
    v = an.variant
    names = FRENCH_NAMES if v.french_names else DEFAULT_NAMES
    rois: list[Roi] = []

    def add(name, label, kind, col, pick):
        rois.append(Roi(name, label, kind, col, [pick(s) for s in slice_shapes]))

    def color(label: int) -> tuple[int, int, int]:
        return organs.structure(label).color

    for i in range(len(an.tumours)):
        add(names["gtv"][i], organs.GTV, "GTV", color(organs.GTV), lambda s, i=i: s["gtv"][i])
    if with_ptv:
        add(names["ptv"], organs.PTV, "PTV", color(organs.PTV), lambda s: s["ptv"])
    if v.lungs_total:
        add(names["lungs_total"], organs.BOTH_LUNGS, "ORGAN", (0, 200, 255), lambda s: s["lung_right"] + s["lung_left"])
    else:
        add(names["lung_right"], organs.RIGHT_LUNG, "ORGAN", color(organs.RIGHT_LUNG), lambda s: s["lung_right"])
        add(names["lung_left"], organs.LEFT_LUNG, "ORGAN", color(organs.LEFT_LUNG), lambda s: s["lung_left"])
    if v.heart_contour:
        add(names["heart"], organs.HEART, "ORGAN", color(organs.HEART), lambda s: s["heart"])
    if v.esophagus_contour:
        add(names["esophagus"], organs.ESOPHAGUS, "ORGAN", color(organs.ESOPHAGUS), lambda s: s["esophagus"])
    add(names["spinal_cord"], organs.SPINAL_CORD, "ORGAN", color(organs.SPINAL_CORD), lambda s: s["spinal_cord"])
    if v.unrelated_rois:
        add(names["external"], None, "EXTERNAL", (0, 128, 0), lambda s: s["body"])
        add(names["lungs_gtv"], None, "ORGAN", (100, 100, 255), lambda s: s["lung_right"][:1] + s["lung_left"][:1])
    return rois


# ---- DICOM writing ---------------------------------------------------------------------------
def _ds_text(value: float) -> str:
    """A decimal string (VR DS, at most 16 characters) that parses back to ``value``'s digits."""
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _uid(*parts: object) -> str:
    """A deterministic ``2.25.<UUID>`` UID (name-based UUID version 5, PS3.5 B.2).

    ``pydicom.uid.generate_uid(prefix=None, ...)`` ignores its entropy and returns a random one."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '|'.join(str(p) for p in parts)).int}"


def _new_instance(sop_class: str, sop: str, modality: str, patient_id: str, sex: str, study: str, series: str,
                  study_id: str, series_number: int, date_time: tuple[str, str]) -> Dataset:
    """A dataset with file meta (Explicit VR Little Endian) and the attributes the CT slices and the
    RTSTRUCT share: patient, general study and series (``date_time``: their date and time),
    general equipment, SOP common."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop_class, sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName, ds.PatientID, ds.PatientSex = patient_id.replace("-", "^"), patient_id, sex
    ds.PatientBirthDate = ds.AccessionNumber = ds.ReferringPhysicianName = ""
    ds.PatientIdentityRemoved = "YES"
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality, ds.Manufacturer = sop_class, sop, modality, "SYNTHETIC"
    ds.StudyDate = ds.SeriesDate = date_time[0]
    ds.StudyTime = ds.SeriesTime = date_time[1]
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.StudyID, ds.SeriesNumber = study, series, study_id, series_number
    return ds


def write_ct_series(folder: Path, an: Anatomy, hu_volume: np.ndarray, uids: dict[str, str],
                    patient_id: str, sex: str, rng: np.random.Generator) -> list[Dataset]:
    """Write the CT slices (CT Image Storage, one file each) with shuffled file names and
    InstanceNumbers; stored values int16 = HU + 1024 (rescale slope 1, intercept -1024).

    ``hu_volume`` is float (Z, rows, cols) HU; returns the slices' headers (no pixel data) by slice
    index (z up).
    """
    g = an.grid
    folder.mkdir(parents=True, exist_ok=True)
    file_order = rng.permutation(g.slices)  # file name number of each slice
    instance_order = rng.permutation(g.slices) + 1
    stored = (np.clip(np.rint(hu_volume), HU_MIN, HU_MAX) - RESCALE_INTERCEPT).astype("<i2")
    headers = []
    for k, z in enumerate(g.z_positions):
        ds = _new_instance(CTImageStorage, _uid(uids["ct_series"], "slice", k), "CT", patient_id, sex,
                           uids["ct_study"], uids["ct_series"], uids["study_id"], 1, ("20140101", "101500"))
        ds.ContentDate, ds.ContentTime = ds.StudyDate, ds.StudyTime
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyDescription = "Synthetic thorax CT"
        ds.SeriesDescription = "CT THORAX"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = _ds_text(g.thickness)
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = int(instance_order[k])
        ds.ImagePositionPatient = [_ds_text(g.origin[0]), _ds_text(g.origin[1]), _ds_text(z)]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = uids["frame"]
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds_text(z)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = g.size
        ds.PixelSpacing = [_ds_text(g.spacing), _ds_text(g.spacing)]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = str(RESCALE_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = stored[k].tobytes()
        pydicom.dcmwrite(folder / f"{int(file_order[k]):06d}.dcm", ds, enforce_file_format=True)
        del ds.PixelData  # the RTSTRUCT needs the headers only
        headers.append(ds)
    return headers


def rtstruct_of(an: Anatomy, rois: list[Roi], uids: dict[str, str], reference: CTReference,
                patient_id: str, sex: str) -> Dataset:
    """The RT Structure Set of ``rois`` (ROINumbers 1, 2, ... in list order) drawn on the CT
    ``reference``: one CLOSED_PLANAR contour per polygon at its slice's z (a hole is one more
    polygon of the same ROI on the slice), filled in by ``rtstruct_write.add_structure_set``."""
    ds = _new_instance(RTStructureSetStorage, uids["rtstruct"], "RTSTRUCT", patient_id, sex, uids["rt_study"],
                       uids["rt_series"], uids["study_id"], 2, ("20190225", "093000"))
    ds.StructureSetDate, ds.StructureSetTime = ds.StudyDate, ds.StudyTime
    ds.SeriesDescription = ds.StructureSetLabel = "RTSTRUCT"
    ds.StructureSetName, ds.OperatorsName, ds.InstanceNumber = "Synthetic", "", 1
    z = an.grid.z_positions
    add_structure_set(ds, reference, [
        RoiContours(roi.name, roi.color, roi.interpreted_type, [
            (k, np.column_stack([poly, np.full(len(poly), z[k])])) for k, polys in enumerate(roi.contours)
            for poly in polys]) for roi in rois], algorithm="MANUAL", observation_labels=False)
    return ds


# ---- Patients and cohorts --------------------------------------------------------------------
def _check_arguments(size: int, slices: int, seed: int) -> None:
    for name, value, lo, hi in (("size", size, MIN_SIZE, MAX_SIZE), ("slices", slices, MIN_SLICES, MAX_SLICES)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not lo <= value <= hi:
            raise ValueError(f"{name} must be an integer in {lo}-{hi}, got {value!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")


def _patient_rng(seed: int, patient_id: str, size: int, slices: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(patient_id.encode()), int(size), int(slices)])


def _make_patient(out_dir: Path, truth_dir: Path, patient_id: str, *, seed: int, size: int,
                  slices: int, with_ptv: bool, variant: Variant,
                  rng: np.random.Generator | None = None) -> dict[str, Any]:
    """Build one patient in a hidden folder, then move it into place; return its cohort record."""
    rng = rng if rng is not None else _patient_rng(seed, patient_id, size, slices)
    an = sample_anatomy(rng, size, slices, variant)
    g = an.grid
    shapes = [an.slice_shapes(float(z)) for z in g.z_positions]
    hu = np.stack([render_slice(an, s, rng) for s in shapes])
    labels = np.stack([label_slice(an, s, with_ptv) for s in shapes])
    rois = build_rois(an, shapes, with_ptv)
    order = rng.permutation(len(rois))
    rois = [rois[i] for i in order]

    key = (seed, patient_id, size, slices, with_ptv)
    uids = {name: _uid(*key, name) for name in ("ct_study", "ct_series", "frame", "rt_study", "rt_series", "rtstruct")}
    number = int(rng.integers(10000, 99999))
    uids["study_id"] = str(number)
    sex = str(rng.choice(["M", "F"]))
    ct_rel = Path(patient_id) / f"01-01-2014-StudyID-{number}" / f"1.000000-{int(rng.integers(10000, 99999))}"
    rt_rel = (Path(patient_id) / f"02-25-2019-CTLUNG-{number}" / f"2.000000-{int(rng.integers(10000, 99999))}"
              / "000000.dcm")

    staging = out_dir / ".partial" / patient_id
    shutil.rmtree(staging, ignore_errors=True)
    ct = write_ct_series(staging / ct_rel.relative_to(patient_id), an, hu, uids, patient_id, sex, rng)
    rtstruct = rtstruct_of(an, rois, uids, CTReference.from_datasets(ct), patient_id, sex)
    write_rtstruct(rtstruct, staging / rt_rel.relative_to(patient_id))
    final = out_dir / patient_id
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    with contextlib.suppress(OSError):  # only empty once no patient is staged
        (out_dir / ".partial").rmdir()

    import SimpleITK as sitk

    image = sitk.GetImageFromArray(labels)
    image.SetOrigin((g.origin[0], g.origin[1], float(g.z_positions[0])))
    image.SetSpacing((g.spacing, g.spacing, g.thickness))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    truth_dir.mkdir(parents=True, exist_ok=True)
    write_nifti(image, truth_dir / f"{patient_id}.nii.gz")

    annotated = [True] + [False] * (organs.NUM_CLASSES - 1)
    for roi in rois:
        if roi.label == organs.BOTH_LUNGS:
            annotated[organs.RIGHT_LUNG] = annotated[organs.LEFT_LUNG] = True
        elif roi.label is not None:
            annotated[roi.label] = True
    return {
        "patient_id": patient_id,
        "roi_names": {roi.name: roi.label for roi in rois},
        "annotated": annotated,
        "lungs_total": variant.lungs_total,
        "french_names": variant.french_names,
        "ct_series_uid": uids["ct_series"],
        "ct_study_uid": uids["ct_study"],
        "rtstruct_study_uid": uids["rt_study"],
        "frame_of_reference_uid": uids["frame"],
        "rtstruct_file": rt_rel.as_posix(),
        "ct_folder": ct_rel.as_posix(),
        "truth_file": f"{patient_id}.nii.gz",
        "variant": asdict(variant),
        "with_ptv": with_ptv,
        "n_tumours": len(an.tumours),
        "shape_zyx": [g.slices, g.size, g.size],
        "spacing_xyz": [g.spacing, g.spacing, g.thickness],
        "origin_xyz": [g.origin[0], g.origin[1], float(g.z_positions[0])],
        "labels_present": sorted(int(v) for v in np.unique(labels) if v),
    }


def _read_cohort_json(truth_dir: Path) -> list[dict[str, Any]]:
    path = truth_dir / COHORT_JSON
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []


def _write_cohort_json(truth_dir: Path, records: list[dict[str, Any]]) -> None:
    truth_dir.mkdir(parents=True, exist_ok=True)
    records = sorted(records, key=lambda r: r["patient_id"])
    write_text_atomic(truth_dir / COHORT_JSON, json.dumps(records, indent=1, ensure_ascii=False) + "\n")


def generate_patient(out_dir: Path, truth_dir: Path, patient_id: str = "SYN-001", *, seed: int = 0,
                     size: int = 512, slices: int = 60, with_ptv: bool = False,
                     overwrite: bool = False, heart_contour: bool = True,
                     esophagus_contour: bool = True, extra_gtvs: int = 0, lungs_total: bool = False,
                     french_names: bool = False, unrelated_rois: bool = False,
                     lung_cavity: bool = False, esophagus_lumen: bool = False) -> dict[str, Any]:
    """Write one synthetic patient with the given ROI options and return its cohort record.

    DICOM goes to ``out_dir/<patient_id>/...``, the true label map (uint8 z-y-x, 0-7) to
    ``truth_dir/<patient_id>.nii.gz``, the record is merged into ``truth_dir/cohort.json``. Record keys:
    ``patient_id``, ``roi_names`` ({ROI name: organs label, organs.BOTH_LUNGS or None}), ``annotated`` (8
    bools by label; background always, both lungs for ``Lungs-Total``), ``lungs_total``, ``french_names``,
    ``ct_series_uid``, ``frame_of_reference_uid``, ``rtstruct_file`` and ``ct_folder`` (relative to
    ``out_dir``), the grid (``shape_zyx``, ``spacing_xyz`` mm, ``origin_xyz`` LPS mm) and ``variant``.
    Raises ``FileExistsError`` when the patient folder exists and ``overwrite`` is false.
    """
    _check_arguments(size, slices, seed)
    if not 0 <= extra_gtvs <= 2:
        raise ValueError(f"extra_gtvs must be 0, 1 or 2, got {extra_gtvs!r}")
    out_dir, truth_dir = Path(out_dir), Path(truth_dir)
    if (out_dir / patient_id).exists() and not overwrite:
        raise FileExistsError(f"{out_dir / patient_id} exists; pass overwrite=True to replace it")
    variant = Variant(heart_contour, esophagus_contour, extra_gtvs, lungs_total, french_names,
                      unrelated_rois, lung_cavity, esophagus_lumen)
    record = _make_patient(out_dir, truth_dir, patient_id, seed=seed, size=size, slices=slices,
                           with_ptv=with_ptv, variant=variant)
    others = [r for r in _read_cohort_json(truth_dir) if r["patient_id"] != patient_id]
    _write_cohort_json(truth_dir, others + [record])
    return record


def _prepare_output(folder: Path, overwrite: bool, own_entry: re.Pattern[str]) -> None:
    """Refuse a non-empty folder unless ``overwrite``; then empty it, but only of what this
    script writes (so a mistyped ``--out $HOME --overwrite`` deletes nothing)."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise FileExistsError(f"output path {folder} exists and is not a folder")
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return
    if not overwrite:
        raise FileExistsError(
            f"output folder {folder} is not empty ({len(entries)} entries); "
            "use --overwrite to replace it")
    foreign = [e for e in entries if not own_entry.fullmatch(e)]
    if foreign:
        raise FileExistsError(
            f"refusing to overwrite {folder}: it holds {', '.join(foreign[:3])}"
            f"{' ...' if len(foreign) > 3 else ''}, which this script did not write")
    for name in entries:
        path = folder / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def generate_cohort(out_dir: Path, truth_dir: Path, n_patients: int = 20, seed: int = 0,
                    size: int = 512, slices: int = 60, with_ptv: bool = False,
                    overwrite: bool = False) -> list[dict[str, Any]]:
    """Write ``n_patients`` synthetic patients ``SYN-001``... and ``truth_dir/cohort.json``.

    Patient ``i`` depends only on (seed, its id, size, slices, with_ptv), not on ``n_patients``. Returns
    the :func:`generate_patient` records in patient order. ``FileExistsError`` for a non-empty ``out_dir``
    or ``truth_dir`` without ``overwrite`` (which empties them if they hold only what this script writes),
    ``ValueError`` for arguments out of range.
    """
    _check_arguments(size, slices, seed)
    if not isinstance(n_patients, (int, np.integer)) or n_patients < 1:
        raise ValueError(f"n_patients must be an integer >= 1, got {n_patients!r}")
    out_dir, truth_dir = Path(out_dir), Path(truth_dir)
    if out_dir.resolve() == truth_dir.resolve():
        raise ValueError(f"DICOM and truth folders must differ, both are {out_dir}")
    _prepare_output(out_dir, overwrite, re.compile(r"SYN-\d{3,}|\.partial"))
    _prepare_output(truth_dir, overwrite, re.compile(r"SYN-\d{3,}\.nii\.gz|cohort\.json|\.partial"))
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("writing %d synthetic patients (%d px, %d slices, seed %d%s) to %s",
             n_patients, size, slices, seed, ", with PTV" if with_ptv else "", out_dir)

    records = []
    for i in tqdm(range(n_patients), desc="synthetic patients", unit="patient", disable=None):
        patient_id = f"SYN-{i + 1:03d}"
        rng = _patient_rng(seed, patient_id, size, slices)
        variant = variant_for(i, rng)
        records.append(_make_patient(out_dir, truth_dir, patient_id, seed=seed, size=size,
                                     slices=slices, with_ptv=with_ptv, variant=variant, rng=rng))
    _write_cohort_json(truth_dir, records)
    return records


# ---- Command line ----------------------------------------------------------------------------
def _int_in(lo: int, hi: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be in {lo}-{hi}, got {value}")
        return value
    return parse


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad argument prints one line (no usage block) and exits with status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(
        prog="make_synthetic_cohort.py",
        description="Write a synthetic NSCLC-Radiomics-like cohort (DICOM CT + RTSTRUCT) and its "
                    "true label maps.")
    parser.add_argument("--data-root", type=Path, default=DataLayout().root,
                        help="data folder (default: %(default)s); DICOM goes to <root>/raw/synthetic, "
                             "truth to <root>/synthetic_truth")
    parser.add_argument("--out", type=Path, default=None, help="DICOM folder (overrides --data-root)")
    parser.add_argument("--truth-out", type=Path, default=None,
                        help="folder for true label maps and cohort.json (overrides --data-root)")
    parser.add_argument("--patients", type=_int_in(1, 10000), default=20, help="number of patients (default: 20)")
    parser.add_argument("--seed", type=_int_in(0, 2**32 - 1), default=0, help="random seed (default: 0)")
    parser.add_argument("--size", type=_int_in(MIN_SIZE, MAX_SIZE), default=512,
                        help=f"in-plane matrix, {MIN_SIZE}-{MAX_SIZE} (default: 512)")
    parser.add_argument("--slices", type=_int_in(MIN_SLICES, MAX_SLICES), default=60,
                        help=f"slices per CT, {MIN_SLICES}-{MAX_SLICES} (default: 60)")
    parser.add_argument("--ptv", action="store_true", help="add a PTV ROI (GTV + 10 mm)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from thoracic_seg.batch import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    layout = DataLayout(args.data_root)
    out_dir = args.out or layout.synthetic_raw
    truth_dir = args.truth_out or layout.synthetic_truth
    start = time.perf_counter()
    try:
        records = generate_cohort(out_dir, truth_dir, n_patients=args.patients, seed=args.seed,
                                  size=args.size, slices=args.slices, with_ptv=args.ptv,
                                  overwrite=args.overwrite)
    except (FileExistsError, ValueError, PermissionError) as exc:
        log.error("%s", exc)
        return 1
    log.info("Synthetic cohort: %d patients written to %s (truth: %s) in %.1f s",
             len(records), out_dir, truth_dir, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
