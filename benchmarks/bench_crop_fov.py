"""Benchmark: how much phase 3's crop crops on real patients, and which field of view keeps every
structure inside (issue 20): the measurement behind ``grid.DEFAULT_FOV_MM``.

    .venv/bin/python benchmarks/bench_crop_fov.py [--fov-mm 300 340 380] [--work DIR]

Unpacks the six real patients of ../shared/data (``nsclc-radiomics-sample`` and ``nsclc-radiomics-dev``)
into a temporary folder (or ``--work``, reused on a re-run), runs phases 2 and 2.5, and measures on
each CT in the network's orientation: the box of ``--crop-body`` (``grid.body_box``, 10 mm margin)
and of ``--crop-body --fov-mm MM`` for each MM (``grid.fov_box``), their side in mm and the mm per
pixel at ``--size``, the fraction of each structure's truth voxels inside each box, and the smallest
field of view that keeps every voxel of the lungs, heart, esophagus and cord around the body
centroid (``grid.body_centroid``, what ``fov_box`` centres on) and, for comparison, around the
centre of the body box. Prints Markdown tables and writes benchmarks/bench_crop_fov.json.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA_DIR = REPO.parent / "shared" / "data"
ARCHIVES = ("nsclc-radiomics-sample", "nsclc-radiomics-dev")
OUTPUT_JSON = REPO / "benchmarks" / "bench_crop_fov.json"
DEFAULT_FOVS_MM = (300, 320, 340, 360, 380, 400)
#: The structures the field of view must never cut (the GTV and PTV lie inside or beside the lungs).
MUST_KEEP = ("lung_right", "lung_left", "heart", "esophagus", "spinal_cord")


def prepare(data_dir: Path, work: Path) -> Path:
    """Unpack the archives into ``work/raw`` and run phases 2 and 2.5 into ``work/DATA`` (both skip
    what is already done); returns the data root. ``RuntimeError`` when a patient fails."""
    import convert_dicom_to_nifti
    import extract_multi_organ_masks

    data_root = work / "DATA"
    for name in ARCHIVES:
        archive = data_dir / f"{name}.tar.xz"
        if not archive.is_file():
            raise FileNotFoundError(f"real data not found: {archive}")
        raw = work / "raw"
        if not (raw / name).is_dir():
            with tarfile.open(archive, "r:xz") as tar:
                tar.extractall(raw, filter="data")
        for phase in (convert_dicom_to_nifti, extract_multi_organ_masks):
            results = phase.run(data_root=data_root, dicom_root=raw / name)
            failed = [(r.patient_id, r.message) for r in results if r.status == "failed"]
            if failed:
                raise RuntimeError(f"{phase.__name__} of {name}: {failed}")
    return data_root


def fraction_inside(labels_zyx: Any, members: Sequence[int], box_yx: Sequence[int]) -> float | None:
    """The fraction of the voxels with a label in ``members`` inside the box ``(y0, x0, side)``;
    None when the structure has no voxel (not contoured)."""
    import numpy as np

    structure = np.isin(labels_zyx, members)
    total = int(np.count_nonzero(structure))
    if total == 0:
        return None
    y0, x0, side = box_yx
    inside = structure[:, max(y0, 0):max(y0 + side, 0), max(x0, 0):max(x0 + side, 0)]
    return int(np.count_nonzero(inside)) / total


def smallest_fov_mm(mask_zyx: Any, centre_yx: Sequence[float], spacing_yx: Sequence[float]) -> float:
    """The smallest field of view (mm; a whole number of pixels of the finer spacing) whose box
    (``grid.fov_box_at`` around ``centre_yx``) holds every voxel of the boolean ``mask_zyx``."""
    import numpy as np
    from scipy import ndimage

    from thoracic_seg.grid import fov_box_at

    _, rows, cols = ndimage.find_objects(np.asarray(mask_zyx, dtype=np.uint8))[0]
    pixel = min(spacing_yx)
    side = 1
    while True:
        y0, x0, _ = fov_box_at(centre_yx, spacing_yx, side * pixel)
        if y0 <= rows.start and rows.stop <= y0 + side and x0 <= cols.start and cols.stop <= x0 + side:
            return side * pixel
        side += 1


def measure_patient(ct_path: Path, mask_path: Path, fovs_mm: Sequence[float], size: int) -> dict[str, Any]:
    """One patient's row: boxes, sides in mm, fractions of truth inside, smallest fields of view."""
    import numpy as np
    import SimpleITK as sitk

    from thoracic_seg import organs
    from thoracic_seg.grid import body_box, body_centroid, fov_box
    from thoracic_seg.image_grid import to_network_orientation

    ct, _ = to_network_orientation(sitk.ReadImage(str(ct_path)))
    mask, _ = to_network_orientation(sitk.ReadImage(str(mask_path)))
    hu, labels = sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(mask)
    spacing_x, spacing_y = ct.GetSpacing()[:2]
    spacing = (spacing_y, spacing_x)
    boxes = {"body box": body_box(hu, spacing)}
    boxes.update({f"FOV {fov:g} mm": fov_box(hu, spacing, fov) for fov in fovs_mm})
    structures = {organs.structure(label).key: organs.STRUCTURE_MEMBERS[label] for label in organs.FOREGROUND_LABELS}
    must_keep = np.isin(labels, [m for key in MUST_KEEP for m in structures[key]])
    centroid = body_centroid(hu)
    y0, x0, side = boxes["body box"]
    row: dict[str, Any] = {
        "patient": ct_path.name[: -len(".nii.gz")], "shape_zyx": list(hu.shape), "spacing_yx_mm": list(spacing),
        "image_mm": [hu.shape[1] * spacing_y, hu.shape[2] * spacing_x], "body_centroid_yx": list(centroid),
        "smallest_fov_mm": {"body centroid": smallest_fov_mm(must_keep, centroid, spacing),
                            "body box centre": smallest_fov_mm(must_keep, (y0 + (side - 1) / 2,
                                                                           x0 + (side - 1) / 2), spacing)},
        "boxes": {},
    }
    for name, box in boxes.items():
        row["boxes"][name] = {
            "box_yx": list(box), "side_mm": box[2] * min(spacing), "mm_per_pixel": box[2] * min(spacing) / size,
            "pixels_past_edge": max(0, -box[0]) + max(0, box[0] + box[2] - hu.shape[1])
            + max(0, -box[1]) + max(0, box[1] + box[2] - hu.shape[2]),
            "inside": {key: fraction_inside(labels, members, box) for key, members in structures.items()},
        }
    return row


def _fraction(value: float | None) -> str:
    if value is None:
        return "-"
    return "1" if value == 1 else f"{math.floor(value * 1000) / 1000:.3f}"


def format_tables(rows: Sequence[dict[str, Any]], size: int) -> str:
    keys = list(rows[0]["boxes"][next(iter(rows[0]["boxes"]))]["inside"])
    lines = ["| patient | image (mm) | body box side (mm) | mm/px at "
             f"{size} | smallest FOV around the body centroid (mm) | around the body box centre (mm) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        body = r["boxes"]["body box"]
        lines.append(f"| {r['patient']} | {r['image_mm'][1]:.0f} | {body['side_mm']:.0f} | {body['mm_per_pixel']:.2f} "
                     f"| {r['smallest_fov_mm']['body centroid']:.0f} | {r['smallest_fov_mm']['body box centre']:.0f} |")
    worst = {k: max(r["smallest_fov_mm"][k] for r in rows) for k in ("body centroid", "body box centre")}
    lines.append(f"| largest | | | | {worst['body centroid']:.0f} | {worst['body box centre']:.0f} |")
    lines += ["", "Fraction of each structure's truth voxels inside the box (- : not contoured):", "",
              "| patient | box | side (mm) | mm/px | px past the edge | " + " | ".join(keys) + " |",
              "|---|---|---:|---:|---:|" + "---:|" * len(keys)]
    for r in rows:
        for name, box in r["boxes"].items():
            lines.append(f"| {r['patient']} | {name} | {box['side_mm']:.1f} | {box['mm_per_pixel']:.3f} | "
                         f"{box['pixels_past_edge']} | " + " | ".join(_fraction(box["inside"][k]) for k in keys) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fov-mm", type=float, nargs="+", default=list(DEFAULT_FOVS_MM), metavar="MM",
                        help="fields of view to measure (default: %(default)s)")
    parser.add_argument("--size", type=int, default=256, help="network slice size for mm/px (default: %(default)s)")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="the real data (default: ../shared/data)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the unpacked DICOM and phases 2/2.5 (kept, reused); default: a temporary one")
    parser.add_argument("--output", type=Path, default=OUTPUT_JSON,
                        help="JSON output (default: benchmarks/bench_crop_fov.json)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from thoracic_seg.layout import DataLayout

    with tempfile.TemporaryDirectory() as tmp:
        try:
            data_root = prepare(args.data_dir, args.work or Path(tmp))
        except FileNotFoundError as exc:
            print(exc, file=sys.stderr)
            return 2
        layout = DataLayout(data_root)
        rows = [measure_patient(ct, layout.masks / ct.name, args.fov_mm, args.size)
                for ct in sorted(layout.ct_nifti.glob("*.nii.gz"))]
    print(format_tables(rows, args.size))
    result = {"fovs_mm": args.fov_mm, "size": args.size, "must_keep": list(MUST_KEEP), "patients": rows,
              "machine": {"python": platform.python_version(), "platform": platform.platform()}}
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
