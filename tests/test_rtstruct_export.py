"""thoracic_seg/rtstruct_write.py: label map (or given polygons) -> RTSTRUCT of automatic contours (names,
descriptions), read back by phase 2.5's rasteriser and by rt-utils; phase 2.5 takes none of them as truth
until a physician has renamed them."""
from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from scipy import ndimage

from extract_multi_organ_masks import OWN_AUTOMATIC, build_structures, combine_labels
from thoracic_seg import organs
from thoracic_seg import rtstruct_write as rx
from thoracic_seg.dicom_ct import read_ct_series
from thoracic_seg.geometry import Grid
from thoracic_seg.rtstruct_read import masks_from_rtstruct, read_rois

STUDY, SERIES, FRAME = "1.2.826.0.1.3680043.10.1", "1.2.826.0.1.3680043.10.2", "1.2.826.0.1.3680043.10.3"
FIXED_TIME = dt.datetime(2024, 5, 6, 7, 8, 9)
AUTO_NAMES = ["zGTV^Auto", "zPTV^Auto", "zLung_R^Auto", "zLung_L^Auto", "zHeart^Auto", "zEsophagus^Auto",
              "zSpinalCord^Auto"]
LABEL_OF_NAME = dict(zip(AUTO_NAMES, organs.FOREGROUND_LABELS))


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def ct_headers(slices: int, rows: int, cols: int, *, spacing=(0.9, 0.8), step=3.0,
               origin=(-100.0, -50.0, 10.0)) -> list[Dataset]:
    """Per-slice CT headers (no pixels), z ascending, axial, in the label map's z order."""
    headers = []
    for k in range(slices):
        ds = Dataset()
        ds.PatientID, ds.PatientName, ds.PatientSex = "PAT-1", "Doe^Jane", "F"
        ds.PatientBirthDate, ds.AccessionNumber, ds.StudyID = "19600101", "ACC7", "S1"
        ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "20140101", "101500", "Who^Doctor"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = STUDY, SERIES, FRAME
        ds.SOPClassUID, ds.SOPInstanceUID = rx.CT_IMAGE_STORAGE, f"1.2.826.0.1.3680043.10.4.{k + 1}"
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * step]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = list(spacing)
        ds.Rows, ds.Columns = rows, cols
        headers.append(ds)
    return headers


def image_of(reference: rx.CTReference) -> sitk.Image:
    """An empty SimpleITK image on the reference's grid (for phase 2.5's rasteriser)."""
    rows, cols = reference.shape_yx
    image = sitk.Image(cols, rows, reference.num_slices, sitk.sitkUInt8)
    image.SetOrigin(tuple(reference.image_positions[0]))
    step = np.linalg.norm(reference.image_positions[1] - reference.image_positions[0]) if reference.num_slices > 1 else 1
    image.SetSpacing((reference.pixel_spacing[1], reference.pixel_spacing[0], float(step)))
    normal = np.cross(reference.row_direction, reference.column_direction)
    image.SetDirection(tuple(np.column_stack([reference.row_direction, reference.column_direction, normal]).ravel()))
    return image


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


def roi_masks_back(rtstruct: Dataset, image: sitk.Image) -> dict[str, np.ndarray]:
    """Phase 2.5's rasterisation of every ROI: name -> bool (Z, Y, X)."""
    return masks_from_rtstruct(rtstruct, image)


def assert_round_trip(labels: np.ndarray, rtstruct: Dataset, image: sitk.Image, min_voxels: int = 1000) -> dict:
    """Every ROI rasterised back by phase 2.5 equals its labels; returns Dice per ROI name."""
    back = roi_masks_back(rtstruct, image)
    scores = {}
    for label in organs.FOREGROUND_LABELS:
        truth = np.isin(labels, rx.ROI_MEMBERS[label])
        name = organs.automatic_roi_name(label)
        if not (labels == label).any():
            assert name not in back
            continue
        scores[name] = dice(back[name], truth)
        if truth.sum() >= min_voxels:
            assert scores[name] >= 0.97, (name, scores[name])
        # Same rule both ways (voxel centre inside, even-odd): not one voxel may differ.
        assert np.array_equal(back[name], truth), (name, int((back[name] != truth).sum()))
    return scores


def reviewed(rtstruct: Dataset) -> Dataset:
    """The RTSTRUCT as a physician leaves it after accepting every contour: each ROI renamed to its
    structure's plain name (``organs.Structure.rtstruct_name``) and saved as MANUAL."""
    copy = rtstruct.copy()
    for item in copy.StructureSetROISequence:
        item.ROIName = organs.structure(LABEL_OF_NAME[item.ROIName]).rtstruct_name
        item.ROIGenerationAlgorithm = "MANUAL"
    return copy


def phase25_labels(rtstruct: Dataset, image: sitk.Image) -> np.ndarray:
    """The label map phase 2.5 builds from the RTSTRUCT (names matched, priority applied): nothing from
    our automatic ROIs, every ROI listed as ours; once :func:`reviewed`, the structures drawn."""
    grid = Grid.of(image)
    structures, unmatched = build_structures(read_rois(rtstruct), grid, derive_ptv=False)
    assert not any(s.annotated for s in structures.values())
    assert unmatched == {str(r.ROIName): OWN_AUTOMATIC for r in rtstruct.StructureSetROISequence}
    structures, unmatched = build_structures(read_rois(reviewed(rtstruct)), grid, derive_ptv=False)
    assert unmatched == {}
    labels, _, _ = combine_labels(structures, grid.shape_zyx)
    return labels


def reread(rtstruct: Dataset, tmp_path: Path) -> Dataset:
    path = tmp_path / "rt.dcm"
    rx.write_rtstruct(rtstruct, path)
    return pydicom.dcmread(path)


# --------------------------------------------------------------------------------------------
# Contours of one slice
# --------------------------------------------------------------------------------------------
def test_square_gives_one_octagon_with_exact_points():
    mask = np.zeros((8, 8), bool)
    mask[1:7, 1:7] = True
    (contour,) = rx.mask_contours(mask)
    assert not contour.hole
    expected = {(0.5, 1), (0.5, 6), (1, 6.5), (6, 6.5), (6.5, 6), (6.5, 1), (6, 0.5), (1, 0.5)}
    assert {tuple(p) for p in contour.points_rc.tolist()} == expected
    assert len(contour.points_rc) == 8  # collinear points merged: one per corner cut


def test_ring_gives_outer_contour_and_inner_hole_contour():
    mask = np.zeros((12, 12), bool)
    mask[2:10, 2:10] = True
    mask[4:8, 4:8] = False
    contours = rx.mask_contours(mask)
    assert sorted(c.hole for c in contours) == [False, True]
    outer = next(c for c in contours if not c.hole).points_rc
    inner = next(c for c in contours if c.hole).points_rc
    # the hole lies inside the outer boundary
    assert outer[:, 0].min() < inner[:, 0].min() and inner[:, 0].max() < outer[:, 0].max()
    assert rx._signed_area(outer) == pytest.approx(64 - 0.5)
    assert rx._signed_area(inner) == pytest.approx(-(16 - 0.5))


@pytest.mark.parametrize("name, mask", [
    ("single pixel", np.pad([[1]], 2)),
    ("diagonal pixels", np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]])),
    ("checkerboard", np.indices((6, 7)).sum(axis=0) % 2),
    ("touches every border", np.ones((5, 4))),
    ("hole with diagonal exit", np.array([[1, 1, 1, 0], [1, 0, 1, 1], [1, 1, 0, 1], [1, 1, 1, 1]])),
    ("island in a hole", np.pad(np.pad(np.pad([[1]], 1), 1, constant_values=1), 1)),
    ("empty", np.zeros((4, 4))),
])
def test_contours_rasterise_back_to_the_same_pixels(name, mask):
    mask = np.asarray(mask, dtype=bool)
    headers = ct_headers(1, *mask.shape, spacing=(1.0, 1.0))
    reference = rx.CTReference.from_datasets(headers)
    contours = [reference.pixel_to_patient(0, c.points_rc) for c in rx.mask_contours(mask)]
    from thoracic_seg.rtstruct_read import rasterize_contours

    back = rasterize_contours(contours, image_of(reference)) if contours else np.zeros((1, *mask.shape), bool)
    assert np.array_equal(back[0], mask), name


def test_random_masks_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(1)
    noise = ndimage.gaussian_filter(rng.random((6, 50, 60)), 1.5)
    labels = np.digitize(noise, [0.47, 0.5, 0.53]).astype(np.uint8) * 2 + 1  # labels 1, 3, 5, 7 with holes
    labels[labels == 1] = 0
    reference = rx.CTReference.from_datasets(ct_headers(6, 50, 60))
    rtstruct = reread(rx.build_rtstruct(labels, reference), tmp_path)
    assert_round_trip(labels, rtstruct, image_of(reference), min_voxels=0)


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------
@pytest.fixture()
def small_case():
    """A 4-slice 40x30 label map with every structure (GTV inside PTV; a ring-shaped heart)."""
    labels = np.zeros((4, 40, 30), np.uint8)
    labels[:, 5:35, 2:12] = organs.RIGHT_LUNG
    labels[:, 5:35, 18:28] = organs.LEFT_LUNG
    labels[1:3, 10:20, 4:10] = organs.PTV
    labels[1:3, 13:17, 6:8] = organs.GTV
    labels[:, 20:30, 12:18] = organs.HEART
    labels[:, 23:27, 14:16] = organs.BACKGROUND  # a hole
    labels[:, 2:4, 14:16] = organs.ESOPHAGUS
    labels[:, 36:39, 14:16] = organs.SPINAL_CORD
    return labels, rx.CTReference.from_datasets(ct_headers(4, 40, 30))


TYPE_1 = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "Modality", "SeriesInstanceUID",
          "FrameOfReferenceUID", "StructureSetLabel", "StructureSetROISequence", "ROIContourSequence", "RTROIObservationsSequence")
TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber", "SeriesNumber", "OperatorsName",
          "Manufacturer", "StructureSetDate", "StructureSetTime", "PositionReferenceIndicator")


def test_rtstruct_has_the_required_attributes_and_passes_pydicom_validation(small_case, tmp_path, monkeypatch):
    labels, reference = small_case
    # Raise on any value that does not fit its VR (DS > 16 characters, bad UI, lower-case CS...)
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.RAISE)
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.RAISE)
    ds = reread(rx.build_rtstruct(labels, reference, now=FIXED_TIME), tmp_path)

    pydicom.dataset.validate_file_meta(ds.file_meta, enforce_standard=True)
    assert ds.file_meta.MediaStorageSOPClassUID == rx.RT_STRUCTURE_SET_STORAGE == ds.SOPClassUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.Modality == "RTSTRUCT"
    assert ds.SeriesInstanceUID not in (SERIES, STUDY) and ds.SOPInstanceUID not in reference.sop_instance_uids
    copied = {"PatientID": "PAT-1", "PatientName": "Doe^Jane", "PatientBirthDate": "19600101",
              "PatientSex": "F", "StudyInstanceUID": STUDY, "StudyDate": "20140101", "StudyTime": "101500",
              "StudyID": "S1", "AccessionNumber": "ACC7", "ReferringPhysicianName": "Who^Doctor"}
    assert {k: str(ds[k].value) for k in copied} == copied
    assert (ds.StructureSetLabel, ds.StructureSetDate, ds.StructureSetTime) == ("AUTOSEG", "20240506", "070809")
    for item in (it for c in ds.ROIContourSequence for it in c.ContourSequence):
        assert len(item.ContourData) == 3 * item.NumberOfContourPoints  # DS strings validated as read
    for keyword in ("ReferencedFrameOfReferenceSequence", "StructureSetROISequence", "ROIContourSequence",
                    "RTROIObservationsSequence", "SeriesNumber", "InstanceNumber", "Manufacturer"):
        assert keyword in ds, keyword
    # The RT Structure Set IOD's modules (PS3.3 A.19): type 1 present and non-empty, type 2 present.
    for keyword in TYPE_1:
        assert keyword in ds and ds[keyword].value not in (None, "", []), f"type 1 {keyword}"
    for keyword in TYPE_2:
        assert keyword in ds, f"type 2 {keyword}"

    # Frame of Reference module at the top level (dciodvfy's two errors before): the CT's frame,
    # and its PositionReferenceIndicator (these CT headers have none: present and empty).
    assert ds.FrameOfReferenceUID == FRAME and ds.PositionReferenceIndicator in (None, "")
    (frame,) = ds.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == FRAME
    (study,) = frame.RTReferencedStudySequence
    assert study.ReferencedSOPInstanceUID == STUDY
    (series,) = study.RTReferencedSeriesSequence
    assert series.SeriesInstanceUID == SERIES
    assert [i.ReferencedSOPInstanceUID for i in series.ContourImageSequence] == list(reference.sop_instance_uids)
    assert {i.ReferencedSOPClassUID for i in series.ContourImageSequence} == {rx.CT_IMAGE_STORAGE}


def test_rois_are_marked_automatic_coloured_and_typed_from_organs(small_case, tmp_path):
    """TG-263 names with a leading z and the ^Auto qualifier (at most 16 characters), generated
    AUTOMATIC: no name phase 2.5 (or anything parsing target names) takes for a physician's structure."""
    labels, reference = small_case
    ds = reread(rx.build_rtstruct(labels, reference), tmp_path)
    names = [r.ROIName for r in ds.StructureSetROISequence]
    assert names == AUTO_NAMES == [organs.automatic_roi_name(label) for label in organs.FOREGROUND_LABELS]
    assert max(map(len, names)) == 16  # zSpinalCord^Auto: TG-263's limit
    assert [organs.match_roi_name(n) for n in names] == [None] * 7  # phase 2.5 never reads them as truth
    assert {r.ROIGenerationAlgorithm for r in ds.StructureSetROISequence} == {"AUTOMATIC"}
    assert [o.ROIObservationLabel for o in ds.RTROIObservationsSequence] == names
    assert [int(r.ROINumber) for r in ds.StructureSetROISequence] == list(range(1, 8))
    assert {r.ReferencedFrameOfReferenceUID for r in ds.StructureSetROISequence} == {FRAME}
    assert [list(map(int, c.ROIDisplayColor)) for c in ds.ROIContourSequence] == [
        list(organs.structure(label).color) for label in organs.FOREGROUND_LABELS]
    assert [int(c.ReferencedROINumber) for c in ds.ROIContourSequence] == list(range(1, 8))
    assert [o.RTROIInterpretedType for o in ds.RTROIObservationsSequence] == [
        "GTV", "PTV", "ORGAN", "ORGAN", "ORGAN", "ORGAN", "ORGAN"]
    assert [int(o.ReferencedROINumber) for o in ds.RTROIObservationsSequence] == list(range(1, 8))


MODEL = "U-Net best.pth (sha256 1a2b3c4d5e6f)"
REVIEW = "A physician must review and edit it before any clinical use; once accepted, rename it"


@pytest.mark.parametrize("label, kwargs, expected", [
    (organs.HEART, {"model": MODEL},
     f"Automatic contour (not reviewed) by {MODEL}. QA not run. {REVIEW} (e.g. Heart)."),
    (organs.GTV, {"model": MODEL, "verdict": "QA flagged: no GTV component above 0.5 ml"},
     f"Automatic contour (not reviewed) by {MODEL}. QA flagged: no GTV component above 0.5 ml. {REVIEW} (e.g. GTV)."),
    (organs.PTV, {"model": MODEL, "ptv_margin_mm": 7.5, "verdict": "QA ok."},
     f"Automatic PTV (not reviewed): the automatic GTV zGTV^Auto by {MODEL}, grown by a 7.5 mm margin "
     f"(isotropic, 3D). QA ok. {REVIEW} (e.g. PTV)."),
    (organs.PTV, {}, f"Automatic PTV (not reviewed), segmented (labels GTV + PTV). QA not run. {REVIEW} (e.g. PTV)."),
    (organs.SPINAL_CORD, {"verdict": "QA flagged:\n gap of 12 mm"},
     f"Automatic contour (not reviewed). QA flagged: gap of 12 mm. {REVIEW} (e.g. SpinalCord)."),
])
def test_automatic_roi_description_says_automatic_model_verdict_and_review(label, kwargs, expected):
    assert rx.automatic_roi_description(label, **kwargs) == expected


def test_a_long_verdict_is_cut_to_the_1024_characters_of_a_short_text():
    text = rx.automatic_roi_description(organs.HEART, verdict="QA flagged: " + "x" * 2000)
    assert len(text) == 1024 and text.endswith("xxx...")
    with pytest.raises(ValueError, match="the background is not a structure"):
        rx.automatic_roi_description(organs.BACKGROUND)


def test_descriptions_carry_each_structures_verdict_and_how_the_ptv_was_made(small_case, tmp_path):
    """Read back by pydicom: every ROI says it is automatic, by which model, its QA verdict (QA not run
    without one) and that it must be reviewed; the overlapping PTV says it is the GTV grown by the margin."""
    labels, reference = small_case
    ptv = np.isin(labels, (organs.GTV, organs.PTV))
    verdicts = {organs.HEART: "QA flagged: volume 5600 ml, above the training range 400-900 ml",
                organs.LEFT_LUNG: "QA ok"}
    ds = reread(rx.build_rtstruct(labels, reference, model=MODEL, overlapping={organs.PTV: ptv}, verdicts=verdicts,
                                  ptv_margin_mm=10.0), tmp_path)
    described = {str(r.ROIName): str(r.ROIDescription) for r in ds.StructureSetROISequence}
    assert {str(r.ROIGenerationDescription) for r in ds.StructureSetROISequence} == {MODEL}
    assert described == {
        organs.automatic_roi_name(label): rx.automatic_roi_description(
            label, model=MODEL, verdict=verdicts.get(label), ptv_margin_mm=10.0 if label == organs.PTV else None)
        for label in organs.FOREGROUND_LABELS}
    assert described["zPTV^Auto"].startswith("Automatic PTV (not reviewed): the automatic GTV zGTV^Auto by U-Net "
                                             "best.pth (sha256 1a2b3c4d5e6f), grown by a 10 mm margin")
    assert "QA flagged: volume 5600 ml" in described["zHeart^Auto"] and "QA ok." in described["zLung_L^Auto"]
    assert all("QA not run." in described[name] for name in ("zGTV^Auto", "zLung_R^Auto", "zSpinalCord^Auto"))
    # A PTV of the label map (not grown by us) does not claim a margin
    plain = rx.build_rtstruct(labels, reference, ptv_margin_mm=10.0)
    (ptv_item,) = [r for r in plain.StructureSetROISequence if r.ROIName == "zPTV^Auto"]
    assert "segmented (labels GTV + PTV)" in ptv_item.ROIDescription


def test_every_contour_is_closed_planar_on_its_slice_and_references_it(small_case, tmp_path):
    labels, reference = small_case
    ds = reread(rx.build_rtstruct(labels, reference), tmp_path)
    uids = list(reference.sop_instance_uids)
    for roi_contour in ds.ROIContourSequence:
        for item in roi_contour.ContourSequence:
            assert item.ContourGeometricType == "CLOSED_PLANAR"
            points = np.array(item.ContourData, dtype=float).reshape(-1, 3)
            assert len(points) == item.NumberOfContourPoints >= 3
            (image_ref,) = item.ContourImageSequence
            k = uids.index(image_ref.ReferencedSOPInstanceUID)
            assert np.allclose(points[:, 2], reference.image_positions[k][2])


def test_holes_are_written_as_separate_inner_contours(small_case, tmp_path):
    labels, reference = small_case
    ds = reread(rx.build_rtstruct(labels, reference), tmp_path)
    heart = rx.contours_by_roi(ds)["zHeart^Auto"]
    assert len(heart) == 2 * 4  # outer + hole on each of the 4 slices
    per_slice = {}
    for item in heart:
        per_slice.setdefault(item.ContourImageSequence[0].ReferencedSOPInstanceUID, []).append(
            np.array(item.ContourData, dtype=float).reshape(-1, 3))
    for outer, inner in (sorted(c, key=lambda p: -np.ptp(p[:, 0])) for c in per_slice.values()):
        assert outer[:, 0].min() < inner[:, 0].min() and inner[:, 0].max() < outer[:, 0].max()
    # the ring has 10x6 - 4x2 = 52 voxels per slice, and that is what comes back
    back = roi_masks_back(ds, image_of(reference))["zHeart^Auto"]
    assert back.sum(axis=(1, 2)).tolist() == [52, 52, 52, 52]


def test_ptv_roi_contains_its_gtv_and_phase25_rebuilds_the_label_map(small_case, tmp_path):
    labels, reference = small_case
    ds = reread(rx.build_rtstruct(labels, reference), tmp_path)
    image = image_of(reference)
    back = roi_masks_back(ds, image)
    assert back["zPTV^Auto"].sum() == np.isin(labels, [organs.GTV, organs.PTV]).sum() == 2 * 60
    assert np.array_equal(phase25_labels(ds, image), labels)


def test_position_reference_indicator_is_copied_from_the_ct(tmp_path):
    headers = ct_headers(2, 8, 8)
    for ds in headers:
        ds.PositionReferenceIndicator = "SN"
    labels = np.zeros((2, 8, 8), np.uint8)
    labels[:, 2:5, 2:5] = organs.HEART
    ds = reread(rx.build_rtstruct(labels, rx.CTReference.from_datasets(headers)), tmp_path)
    assert (ds.FrameOfReferenceUID, ds.PositionReferenceIndicator) == (FRAME, "SN")


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) not installed")
def test_dciodvfy_reports_no_error(small_case, tmp_path):
    """The reference IOD validator of the DICOM standard's editor: no error (warnings allowed)."""
    labels, reference = small_case
    path = tmp_path / "rt.dcm"
    ptv = np.zeros(labels.shape, dtype=bool)
    ptv[1:3, 2:9, 2:9] = True
    verdicts = {organs.HEART: "QA flagged: volume 5600 ml, above the training range 400-900 ml", organs.GTV: "QA ok"}
    rx.write_rtstruct(rx.build_rtstruct(labels, reference, overlapping={organs.PTV: ptv}, model="U-Net a.pth",
                                        verdicts=verdicts, ptv_margin_mm=10.0), path)
    report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
    assert errors == [] and report.returncode == 0, report.stderr


def test_overlapping_ptv_is_its_own_roi_and_the_organs_keep_their_voxels(small_case, tmp_path):
    """A derived PTV passed as an overlapping mask: its ROI is exactly that mask, read back by phase
    2.5's reader; the lung under it keeps all its voxels (real contours overlap)."""
    labels, reference = small_case
    labels = np.where(labels == organs.PTV, organs.RIGHT_LUNG, labels).astype(np.uint8)
    gtv = labels == organs.GTV
    ptv = np.zeros(labels.shape, dtype=bool)
    ptv[1:3, 1:10, 1:10] = True
    ptv |= gtv
    assert (ptv & (labels == organs.RIGHT_LUNG)).any()
    ds = reread(rx.build_rtstruct(labels, reference, overlapping={organs.PTV: ptv}), tmp_path)
    back = {organs.structure(LABEL_OF_NAME[name]).key: mask
            for name, mask in roi_masks_back(ds, image_of(reference)).items()}
    assert np.array_equal(back["ptv"], ptv)
    assert np.array_equal(back["lung_right"], labels == organs.RIGHT_LUNG)
    assert (back["ptv"] & back["lung_right"]).any() and not (back["gtv"] & ~back["ptv"]).any()
    assert [r.ROIName for r in ds.StructureSetROISequence][:2] == ["zGTV^Auto", "zPTV^Auto"]
    with pytest.raises(ValueError, match=r"overlapping PTV mask shape \(1, 2, 3\) does not fit the CT"):
        rx.build_rtstruct(labels, reference, overlapping={organs.PTV: np.zeros((1, 2, 3), bool)})


def test_a_contour_longer_than_64_kib_is_written_and_read_back(tmp_path):
    # Explicit VR would cap a DS value at 64 KiB; a comb-shaped outline needs ~4000 points.
    mask = np.zeros((1, 256, 256), np.uint8)
    mask[0, 8:248, 8:248] = organs.HEART
    for teeth in (mask[0, 4:8, 8:248:2], mask[0, 248:252, 8:248:2], mask[0, 8:248:2, 4:8], mask[0, 8:248:2, 248:252]):
        teeth[...] = organs.HEART
    reference = rx.CTReference.from_datasets(
        ct_headers(1, 256, 256, spacing=(0.977, 0.977), origin=(-250.112, -250.112, -179.4)))
    ds = reread(rx.build_rtstruct(mask, reference), tmp_path)
    (item,) = rx.contours_by_roi(ds)["zHeart^Auto"]
    assert item.NumberOfContourPoints > 2000
    assert item.get_item(0x30060050).length > 65536  # the value as stored in the file
    assert_round_trip(mask, ds, image_of(reference))


def test_patient_coordinates_follow_orientation_and_spacing():
    headers = ct_headers(2, 4, 5, spacing=(2.0, 0.5), origin=(10.0, 20.0, 30.0), step=2.5)
    for ds in headers:  # rows run towards patient left (+x), columns towards anterior (-y)
        ds.ImageOrientationPatient = [0, -1, 0, 1, 0, 0]
    reference = rx.CTReference.from_datasets(headers)
    points = reference.pixel_to_patient(1, np.array([[0, 0], [1, 2], [0.5, -0.5]]))
    assert points.tolist() == [[10.0, 20.0, 32.5], [12.0, 19.0, 32.5], [11.0, 20.25, 32.5]]


@pytest.mark.parametrize("points, text", [
    ([[1.5, -0.0, 2.5]], b"1.5\\0\\2.5 "),  # -0 written as 0; odd length padded with a space
    ([[12.30, 0.0000004, -102.5], [-0.0000004, 1e3, 7.1234564]], b"12.3\\0\\-102.5\\0\\1000\\7.123456 "),
    ([[-250.112, 4.56, -179.4]], b"-250.112\\4.56\\-179.4"),  # 0.01 / 0.001 mm values keep their digits
])
def test_contour_data_element_is_the_exact_ds_text(points, text):
    """The one ContourData encoder (also the synthetic cohort's): 6 decimals, trailing zeros dropped."""
    elem = rx.contour_data_element(np.array(points))
    assert (elem.tag, elem.VR, elem.value, elem.length) == (0x30060050, "DS", text, len(text))
    assert elem.is_implicit_VR is True
    assert rx.contour_data_element(np.array(points), implicit_vr=False).is_implicit_VR is False


def test_empty_structures_are_left_out_and_labels_subset_respected(tmp_path):
    labels = np.zeros((2, 10, 10), np.uint8)
    labels[:, 2:5, 2:5] = organs.HEART
    labels[:, 6:8, 6:8] = organs.ESOPHAGUS
    reference = rx.CTReference.from_datasets(ct_headers(2, 10, 10))
    assert rx.roi_summary(rx.build_rtstruct(labels, reference)) == {"zHeart^Auto": 2, "zEsophagus^Auto": 2}
    assert rx.roi_summary(rx.build_rtstruct(labels, reference, labels=[organs.HEART])) == {"zHeart^Auto": 2}
    assert rx.roi_summary(rx.build_rtstruct(np.zeros_like(labels), reference)) == {}


def test_a_gtv_without_ptv_voxels_makes_no_ptv_roi():
    labels = np.zeros((1, 10, 10), np.uint8)
    labels[0, 2:5, 2:5] = organs.GTV
    reference = rx.CTReference.from_datasets(ct_headers(1, 10, 10))
    assert rx.roi_summary(rx.build_rtstruct(labels, reference)) == {"zGTV^Auto": 1}


@pytest.mark.parametrize("syntax", [pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian])
def test_add_structure_set_writes_given_polygons_as_given(syntax, tmp_path):
    """The synthetic cohort's path: its own header and transfer syntax, polygons it already has."""
    reference = rx.CTReference.from_datasets(ct_headers(3, 8, 9))  # slice 2 at z = 16
    triangle = np.array([[0.0, 0.0, 16.0], [1.5, 0.0, 16.0], [1.5, 2.25, 16.0]])
    ds = Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = rx.RT_STRUCTURE_SET_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.9"
    rx.add_structure_set(ds, reference, [
        rx.RoiContours("GTV-1", (255, 0, 0), "GTV", [(2, triangle), (2, triangle + [0.5, 0.5, 0])]),
        rx.RoiContours("External", (0, 128, 0), "EXTERNAL", [])], algorithm="MANUAL", observation_labels=False)
    back = reread(ds, tmp_path)

    assert back.file_meta.TransferSyntaxUID == syntax
    assert [(r.ROINumber, r.ROIName, r.ROIGenerationAlgorithm, "ROIGenerationDescription" in r, "ROIDescription" in r)
            for r in back.StructureSetROISequence] == [(1, "GTV-1", "MANUAL", False, False),
                                                       (2, "External", "MANUAL", False, False)]
    assert [(c.ReferencedROINumber, list(c.ROIDisplayColor)) for c in back.ROIContourSequence] == [
        (1, [255, 0, 0]), (2, [0, 128, 0])]
    assert [(o.ReferencedROINumber, o.RTROIInterpretedType, "ROIObservationLabel" in o)
            for o in back.RTROIObservationsSequence] == [(1, "GTV", False), (2, "EXTERNAL", False)]
    gtv, external = back.ROIContourSequence
    assert [(c.ContourNumber, c.ContourImageSequence[0].ReferencedSOPInstanceUID, list(c.ContourData))
            for c in gtv.ContourSequence] == [
        (1, reference.sop_instance_uids[2], [0, 0, 16, 1.5, 0, 16, 1.5, 2.25, 16]),
        (2, reference.sop_instance_uids[2], [0.5, 0.5, 16, 2, 0.5, 16, 2, 2.75, 16])]
    assert len(external.ContourSequence) == 0
    (frame,) = back.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == FRAME


def test_from_image_matches_from_datasets():
    headers = ct_headers(3, 6, 7, spacing=(0.7, 0.6), step=2.0)
    by_headers = rx.CTReference.from_datasets(headers)
    image = image_of(by_headers)
    by_image = rx.CTReference.from_image(image, headers[0], [h.SOPInstanceUID for h in headers])
    assert by_image.sop_instance_uids == by_headers.sop_instance_uids
    assert np.allclose(by_image.image_positions, by_headers.image_positions)
    assert by_image.pixel_spacing == by_headers.pixel_spacing == (0.7, 0.6)
    assert by_image.shape_yx == by_headers.shape_yx == (6, 7)
    assert str(by_image.header.PatientID) == "PAT-1"


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def test_label_map_that_does_not_fit_the_ct_is_refused():
    reference = rx.CTReference.from_datasets(ct_headers(3, 8, 9))
    with pytest.raises(ValueError, match=r"shape \(3, 9, 8\).*expected \(3, 8, 9\)"):
        rx.build_rtstruct(np.zeros((3, 9, 8), np.uint8), reference)
    with pytest.raises(ValueError, match="holds values 0..9, expected 0-7"):
        rx.build_rtstruct(np.full((3, 8, 9), 9, np.uint8) * (np.arange(9) % 2), reference)
    with pytest.raises(ValueError, match="must hold integers"):
        rx.build_rtstruct(np.zeros((3, 8, 9), np.float32), reference)
    with pytest.raises(ValueError, match="at most 16 characters"):
        rx.build_rtstruct(np.zeros((3, 8, 9), np.uint8), reference, structure_set_label="x" * 17)
    with pytest.raises(ValueError, match="unknown label 9; labels are 0-7"):
        rx.build_rtstruct(np.zeros((3, 8, 9), np.uint8), reference, verdicts={9: "QA ok"})
    with pytest.raises(ValueError, match="a QA verdict for the background"):
        rx.build_rtstruct(np.zeros((3, 8, 9), np.uint8), reference, verdicts={0: "QA ok"})
    with pytest.raises(ValueError, match="PTV margin must be a finite number >= 0 mm, got -1"):
        rx.automatic_roi_description(organs.PTV, ptv_margin_mm=-1.0)


def test_bad_ct_headers_are_refused():
    headers = ct_headers(3, 8, 9)
    with pytest.raises(ValueError, match="not in order along the slice normal"):
        rx.CTReference.from_datasets([headers[1], headers[0], headers[2]])
    with pytest.raises(ValueError, match="no CT slices"):
        rx.CTReference.from_datasets([])
    del headers[1].FrameOfReferenceUID
    with pytest.raises(ValueError, match="CT slice 1 of 3 has no FrameOfReferenceUID"):
        rx.CTReference.from_datasets(headers)
    other = ct_headers(2, 8, 9)
    other[1].SeriesInstanceUID = "1.2.3.4"
    with pytest.raises(ValueError, match="2 different SeriesInstanceUIDs"):
        rx.CTReference.from_datasets(other)
    image = image_of(rx.CTReference.from_datasets(ct_headers(2, 8, 9)))
    with pytest.raises(ValueError, match=r"slices \[1\] have no SOPInstanceUID \(interpolated"):
        rx.CTReference.from_image(image, other[0], ["1.2.3", None])
    with pytest.raises(ValueError, match="3 SOPInstanceUIDs for a CT of 2 slices"):
        rx.CTReference.from_image(image, other[0], ["1.2.3", "1.2.4", "1.2.5"])


# --------------------------------------------------------------------------------------------
# Round trips on DICOM: the synthetic cohort and a real patient
# --------------------------------------------------------------------------------------------
def _read_dicom_ct(ct_folder: Path) -> tuple[sitk.Image, rx.CTReference]:
    ct = read_ct_series(sorted(p for p in ct_folder.rglob("*") if p.is_file()))
    header = pydicom.dcmread(ct.slices[0].path, stop_before_pixels=True)
    reference = rx.CTReference.from_image(ct.image, header, [s.sop_instance_uid for s in ct.slices],
                                          [s.position_lps for s in ct.slices])
    return ct.image, reference


def _rt_utils_masks(ct_folder: Path, rtstruct_path: Path, names) -> dict[str, np.ndarray]:
    from rt_utils import RTStructBuilder

    rt = RTStructBuilder.create_from(dicom_series_path=str(ct_folder), rt_struct_path=str(rtstruct_path))
    assert sorted(rt.get_roi_names()) == sorted(names)
    # rt-utils gives (rows, cols, slices) with slices in ascending position, as SimpleITK orders z
    return {name: np.transpose(rt.get_roi_mask_by_name(name), (2, 0, 1)) for name in names}


def test_synthetic_cohort_round_trip_and_rt_utils(synthetic_cohort, tmp_path):
    raw_dir, truth_dir, cohort = synthetic_cohort
    for record in cohort:
        ct_folder = raw_dir / record["ct_folder"]
        image, reference = _read_dicom_ct(ct_folder)
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(truth_dir / record["truth_file"])))
        rtstruct = rx.build_rtstruct(truth, reference)
        path = tmp_path / f"{record['patient_id']}.dcm"
        rx.write_rtstruct(rtstruct, path)
        ds = pydicom.dcmread(path)
        assert_round_trip(truth, ds, image)
        assert np.array_equal(phase25_labels(ds, image), truth)
        ct_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in ct_folder.rglob("*.dcm")}
        referenced = {i.ReferencedSOPInstanceUID for c in ds.ROIContourSequence for it in c.ContourSequence
                      for i in it.ContourImageSequence}
        assert referenced <= ct_uids and len(referenced) > 0

    # An independent reader. rt-utils rounds contour points to whole pixels and lets OpenCV fill
    # the polygon *including its boundary pixels*, so it can only add a rim of at most one pixel to
    # a contour drawn between pixel centres: it must miss no voxel of ours and add none beyond that rim.
    record = cohort[0]
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(truth_dir / record["truth_file"])))
    path = tmp_path / f"{record['patient_id']}.dcm"
    names = list(rx.roi_summary(pydicom.dcmread(path)))
    masks = _rt_utils_masks(raw_dir / record["ct_folder"], path, names)
    rim = ndimage.generate_binary_structure(3, 2)
    rim[0] = rim[2] = False  # in-plane 8-neighbourhood
    for name in names:
        label = LABEL_OF_NAME[name]
        expected = np.isin(truth, rx.ROI_MEMBERS[label])
        assert not (expected & ~masks[name]).any(), name
        assert not (masks[name] & ~ndimage.binary_dilation(expected, rim)).any(), name


REAL_PATIENT = "LUNG1-005"


@pytest.mark.real_data
@pytest.mark.slow
def test_real_patient_round_trip_and_rt_utils(real_sample_root, reference_json, reference_masks_dir, tmp_path):
    ct_folder = real_sample_root / reference_json[REAL_PATIENT]["ct_series_folder"]
    image, reference = _read_dicom_ct(ct_folder)
    # plastimatch's masks of the clinical contours, combined with organs.PRIORITY
    labels = np.zeros(image.GetSize()[::-1], np.uint8)
    by_label = {}
    for path in sorted((reference_masks_dir / REAL_PATIENT).glob("*.nii.gz")):
        label = organs.match_roi_name(path.name[: -len(".nii.gz")])
        assert label in organs.FOREGROUND_LABELS, path.name
        by_label[label] = sitk.GetArrayFromImage(sitk.ReadImage(str(path))) > 0
    for label in reversed(organs.PRIORITY):
        if label in by_label:
            labels[by_label[label]] = label

    rtstruct = rx.build_rtstruct(labels, reference)
    path = tmp_path / "rt.dcm"
    rx.write_rtstruct(rtstruct, path)
    ds = pydicom.dcmread(path)
    scores = assert_round_trip(labels, ds, image)
    assert sorted(scores) == ["zEsophagus^Auto", "zGTV^Auto", "zHeart^Auto", "zLung_L^Auto", "zLung_R^Auto",
                              "zSpinalCord^Auto"]
    assert np.array_equal(phase25_labels(ds, image), labels)
    n_points = sum(int(it.NumberOfContourPoints) for c in ds.ROIContourSequence for it in c.ContourSequence)
    assert n_points < 60_000  # collinear points merged (~50 points per contour on average)

    masks = _rt_utils_masks(ct_folder, path, list(scores))
    for label in by_label:
        name = organs.automatic_roi_name(label)
        expected = labels == label
        assert not (expected & ~masks[name]).any(), name  # rt-utils only adds its boundary rim
        assert dice(masks[name], expected) >= 0.95, (name, dice(masks[name], expected))
