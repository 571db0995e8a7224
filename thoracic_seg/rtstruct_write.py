"""Label map -> DICOM RT Structure Set: the contours a treatment-planning system imports.

A label map (z, y, x) uint8 with the values of ``thoracic_seg.organs`` on a CT's own grid, together with the
CT's DICOM headers (one per slice, in the label map's z order), becomes an RTSTRUCT that references
the CT's study, series, frame of reference and every SOP instance: one ROI per structure present,
one CLOSED_PLANAR contour per 4-connected component and per hole on every slice, each ROI marked as
automatic (its name ``zGTV^Auto``..., ``organs.automatic_roi_name``; its ROIDescription: the model, the
QA verdict and the review it needs, :func:`automatic_roi_description`; docs/review.md):

    reference = CTReference.from_datasets(headers)          # pydicom Datasets, z order
    rtstruct = build_rtstruct(labels_zyx, reference, model="U-Net best.pth (sha256 1a2b3c4d5e6f)")
    write_rtstruct(rtstruct, "LUNG1-005_RTSTRUCT.dcm")

A writer of polygons it already has (the synthetic cohort) fills its own dataset's header and calls
:func:`add_structure_set` with :class:`RoiContours`; :func:`contour_data_element` is the one
ContourData encoder.
"""
from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ImplicitVRLittleEndian, generate_uid
from scipy import ndimage
from skimage import measure

from thoracic_seg import organs
from thoracic_seg.batch import atomic_output

log = logging.getLogger(__name__)
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
#: Referenced SOP class of an RTReferencedStudySequence item (Study Component Management, as
#: the standard's examples and every planning system use it).
STUDY_COMPONENT_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"
#: Label values that make up each ROI: the PTV contains its GTV (see :func:`build_rtstruct`).
ROI_MEMBERS: dict[int, tuple[int, ...]] = organs.STRUCTURE_MEMBERS
#: RTROIInterpretedType of each label (DICOM defined terms).
INTERPRETED_TYPE: dict[int, str] = {
    label: ("GTV" if label == organs.GTV else "PTV" if label == organs.PTV else "ORGAN")
    for label in organs.FOREGROUND_LABELS
}
#: Attributes copied from the CT: patient and general study modules (and the character set that
#: encodes them). Type 2 attributes the CT lacks are written empty.
COPIED_TYPE2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
    "ReferringPhysicianName", "PositionReferenceIndicator",  # the last: Frame of Reference module
)
COPIED_IF_PRESENT = ("SpecificCharacterSet", "StudyDescription", "PatientAge", "IssuerOfPatientID")
DEFAULT_STRUCTURE_SET_LABEL = "AUTOSEG"
DEFAULT_SERIES_DESCRIPTION = "Automatic multi-organ segmentation (research use)"
#: The QA verdict in an automatic ROI's description when no quality check gave one.
QA_NOT_RUN = "QA not run"
_ST_MAX = 1024  # characters of a Short Text value (ROIDescription)
_LO_MAX = 64  # characters of a Long String value (ROIGenerationDescription)
_CONTOUR_DATA_TAG = 0x30060050
_DECIMALS = 6  # keeps half-pixel positions of 3-decimal spacings exact; at most 14 characters


# ---- The CT the structures belong to ---------------------------------------------------------
@dataclass(frozen=True)
class CTReference:
    """What an RTSTRUCT needs to know of its CT series, slices in the label map's z order.

    ``image_positions`` (Z, 3) float64 are the ImagePositionPatient (LPS mm) of each slice,
    ``row_direction`` / ``column_direction`` (3,) the unit vectors of ImageOrientationPatient
    (direction of increasing column index, then of increasing row index), ``pixel_spacing``
    (row spacing, column spacing) in mm, ``shape_yx`` (Rows, Columns). ``header`` holds the
    patient/study attributes copied into the RTSTRUCT.
    """

    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    sop_class_uid: str
    sop_instance_uids: tuple[str, ...]
    image_positions: np.ndarray
    row_direction: np.ndarray
    column_direction: np.ndarray
    pixel_spacing: tuple[float, float]
    shape_yx: tuple[int, int]
    header: Dataset

    @classmethod
    def from_datasets(cls, datasets: Sequence[Dataset]) -> "CTReference":
        """Build from the CT's per-slice headers (pixel data not needed), in the label map's z order.

        ``ValueError``: no slices; several series or frames of reference; a missing geometry attribute;
        orientation, spacing or size that differ; two slices at one position or out of order along the normal.
        """
        if len(datasets) == 0:
            raise ValueError("no CT slices given: an RTSTRUCT must reference at least one image")
        first = datasets[0]
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
                        "SOPInstanceUID", "ImagePositionPatient", "ImageOrientationPatient",
                        "PixelSpacing", "Rows", "Columns"):
            missing = [i for i, ds in enumerate(datasets) if keyword not in ds]
            if missing:
                raise ValueError(f"CT slice {missing[0]} of {len(datasets)} has no {keyword}")
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
            values = sorted({str(ds.get(keyword)) for ds in datasets})
            if len(values) > 1:
                raise ValueError(f"CT slices belong to {len(values)} different {keyword}s: {values[:3]}")
        orientation = np.array([ds.ImageOrientationPatient for ds in datasets], dtype=np.float64)
        spacing = np.array([ds.PixelSpacing for ds in datasets], dtype=np.float64)
        sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
        if not np.allclose(orientation, orientation[0], atol=1e-4):
            raise ValueError("CT slices have different ImageOrientationPatient")
        if not np.allclose(spacing, spacing[0], atol=1e-4):
            raise ValueError(f"CT slices have different PixelSpacing: {np.unique(spacing, axis=0).tolist()}")
        if len(sizes) > 1:
            raise ValueError(f"CT slices have different sizes (Rows, Columns): {sorted(sizes)}")
        uids = tuple(str(ds.SOPInstanceUID) for ds in datasets)
        if len(set(uids)) != len(uids):
            raise ValueError("CT slices repeat a SOPInstanceUID")
        row_dir, col_dir = orientation[0, :3], orientation[0, 3:]
        positions = np.array([ds.ImagePositionPatient for ds in datasets], dtype=np.float64)
        along_normal = positions @ np.cross(row_dir, col_dir)
        steps = np.diff(along_normal)
        if len(steps) and not ((steps > 1e-3).all() or (steps < -1e-3).all()):
            raise ValueError(
                "CT slices are not in order along the slice normal (or two share a position): "
                "pass them in the label map's z order"
            )
        return cls._of_header(first, uids, positions, row_dir, col_dir,
                              (float(spacing[0, 0]), float(spacing[0, 1])), sizes.pop())

    @classmethod
    def from_image(
        cls, image: Any, header: Dataset, sop_instance_uids: Sequence[str],
        image_positions: np.ndarray | Sequence[Sequence[float]] | None = None,
    ) -> "CTReference":
        """Build from a SimpleITK CT read from DICOM (LPS; spacing = column, row, slice step in mm), any
        slice's ``header`` (patient/study attributes, Study/Series/Frame of Reference UIDs, SOPClassUID)
        and the SOPInstanceUID of each z index. ``image_positions``: (Z, 3) ImagePositionPatient in LPS mm
        (e.g. phase 2's ``SliceRef.position_lps``); default: from the image origin and slice step.

        ``ValueError``: a slice without a SOPInstanceUID (an interpolated slice), a count of UIDs or
        positions that is not the image's slice count, or missing UIDs in ``header``.
        """
        size_x, size_y, size_z = image.GetSize()
        uids = tuple("" if u is None else str(u) for u in sop_instance_uids)
        if len(uids) != size_z:
            raise ValueError(f"{len(uids)} SOPInstanceUIDs for a CT of {size_z} slices")
        if not all(uids):
            missing = [k for k, u in enumerate(uids) if not u]
            raise ValueError(
                f"CT slices {missing[:5]} have no SOPInstanceUID (interpolated slices?): an RTSTRUCT "
                "can only reference slices that exist as DICOM instances"
            )
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
            if not str(header.get(keyword, "") or ""):
                raise ValueError(f"the CT header has no {keyword}")
        direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
        spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
        if image_positions is None:
            origin = np.asarray(image.GetOrigin(), dtype=np.float64)
            positions = origin + np.arange(size_z)[:, None] * (spacing[2] * direction[:, 2])
        else:
            positions = np.asarray(image_positions, dtype=np.float64).reshape(-1, 3)
            if len(positions) != size_z:
                raise ValueError(f"{len(positions)} slice positions for a CT of {size_z} slices")
        return cls._of_header(header, uids, positions, direction[:, 0].copy(), direction[:, 1].copy(),
                              (float(spacing[1]), float(spacing[0])), (int(size_y), int(size_x)))

    @classmethod
    def _of_header(cls, header: Dataset, uids: tuple[str, ...], positions: np.ndarray, row_direction: np.ndarray,
                   column_direction: np.ndarray, pixel_spacing: tuple[float, float],
                   shape_yx: tuple[int, int]) -> "CTReference":
        """The UIDs, SOP class and copied attributes of one slice ``header``, the geometry as given."""
        return cls(str(header.StudyInstanceUID), str(header.SeriesInstanceUID), str(header.FrameOfReferenceUID),
                   str(header.get("SOPClassUID", CT_IMAGE_STORAGE)), uids, positions, row_direction,
                   column_direction, pixel_spacing, shape_yx, _copied_header(header))

    @property
    def num_slices(self) -> int:
        return len(self.sop_instance_uids)

    def pixel_to_patient(self, slice_index: int, rows_cols: np.ndarray) -> np.ndarray:
        """(N, 2) (row, column) pixel coordinates on one slice -> (N, 3) LPS mm (pixel centres at integers).

        Pixel (column c, row r) of slice k is at ``ImagePositionPatient[k] + c * PixelSpacing[1] *
        row_direction + r * PixelSpacing[0] * column_direction`` (directions of ImageOrientationPatient).
        """
        rows_cols = np.asarray(rows_cols, dtype=np.float64)
        row_mm = rows_cols[:, :1] * self.pixel_spacing[0]
        col_mm = rows_cols[:, 1:2] * self.pixel_spacing[1]
        return self.image_positions[slice_index] + col_mm * self.row_direction + row_mm * self.column_direction


def _copied_header(source: Dataset) -> Dataset:
    """The patient/study attributes of :data:`COPIED_TYPE2` and :data:`COPIED_IF_PRESENT` of a CT slice."""
    copied = Dataset()
    for keyword in COPIED_TYPE2 + COPIED_IF_PRESENT:
        if keyword in source:
            copied[keyword] = source[keyword]
    return copied


# ---- Contours of one slice -------------------------------------------------------------------
@dataclass(frozen=True)
class Contour:
    """A closed polygon ``points_rc`` (N, 2) float64 in (row, column) pixel units, pixel centres at
    integers, first point not repeated; ``hole`` is True for the boundary of a hole."""

    points_rc: np.ndarray
    hole: bool


def mask_contours(mask_yx: np.ndarray) -> list[Contour]:
    """The closed contours of a 2D boolean mask: one per 4-connected component and one per hole.

    The 0.5 iso-lines of the mask padded with background (border components close too), collinear points
    merged. Every inside pixel centre is strictly inside the contours under the even-odd rule and every
    outside one strictly outside, so an even-odd, centre-inside reader (planning systems, plastimatch,
    phase 2.5) gets the mask back exactly. Outer boundaries run counter-clockwise in (column, row), holes
    clockwise.
    """
    mask = np.asarray(mask_yx, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2D (y, x) mask, got shape {mask.shape}")
    if not mask.any():
        return []
    padded = np.pad(mask, 1).astype(np.float32)
    contours = []
    for points in measure.find_contours(padded, 0.5):
        points = _merge_collinear(points[:-1] - 1.0)  # closed: last point repeats the first
        if len(points) >= 3:
            contours.append(Contour(points, hole=_signed_area(points) < 0))
    return contours


def _merge_collinear(points: np.ndarray) -> np.ndarray:
    """Drop the points of a closed polygon that lie on the straight line through their neighbours.

    Marching-squares points of a binary mask sit on a half-pixel grid, so doubling them gives
    integers and the collinearity test is exact.
    """
    grid = np.rint(points * 2).astype(np.int64)
    before = grid - np.roll(grid, 1, axis=0)
    after = np.roll(grid, -1, axis=0) - grid
    turn = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    return points[turn != 0]


def _signed_area(points_rc: np.ndarray) -> float:
    """Shoelace area with x = column and y = row (positive: counter-clockwise on screen axes)."""
    x, y = points_rc[:, 1], points_rc[:, 0]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


# ---- The RT Structure Set --------------------------------------------------------------------
def _format_ds(values_mm: np.ndarray) -> list[str]:
    """LPS mm -> DS strings with at most 6 decimals, trailing zeros dropped (<= 16 characters)."""
    text = np.char.mod(f"%.{_DECIMALS}f", np.round(values_mm.ravel(), _DECIMALS) + 0.0)
    return [t.rstrip("0").rstrip(".") if "." in t else t for t in text.tolist()]


def contour_data_element(points_mm: np.ndarray, *, implicit_vr: bool = True) -> RawDataElement:
    """ContourData (3006,0050) of (N, 3) LPS mm points as an already encoded DS value.

    Used for every RTSTRUCT written here. Values ``x1\\y1\\z1\\x2...`` are rounded to 6 decimals, trailing
    zeros dropped (:func:`_format_ds`), so 0.01 or 0.001 mm grid coordinates keep their own digits; 10x
    faster than one pydicom ``DSfloat`` per coordinate (100 000s per patient). The holding item must be
    marked with the file's encoding (``set_original_encoding``) so pydicom writes the bytes as they are;
    ``implicit_vr`` records it in the element too (the value bytes are the same either way).
    """
    text = "\\".join(_format_ds(points_mm)).encode("ascii")
    if len(text) % 2:
        text += b" "  # DICOM values have even length; DS is padded with a space
    return RawDataElement(Tag(_CONTOUR_DATA_TAG), "DS", len(text), text, 0, implicit_vr, True, True, False)


def _image_reference(sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class_uid
    item.ReferencedSOPInstanceUID = sop_instance_uid
    return item


@dataclass(frozen=True)
class RoiContours:
    """One ROI to write: ROIName ``name``, ROIDisplayColor ``color`` (R, G, B 0-255),
    RTROIInterpretedType ``interpreted_type`` (``ORGAN``, ``GTV``, ``PTV``, ``EXTERNAL``...), and
    ``contours``: (slice index k of the :class:`CTReference`, (N, 3) float LPS mm points of one
    closed polygon on that slice, first point not repeated), in the order they are written;
    ``description``: its ROIDescription (none when empty)."""

    name: str
    color: tuple[int, int, int]
    interpreted_type: str
    contours: Sequence[tuple[int, np.ndarray]]
    description: str = ""


def _mask_contours_mm(
    inside: np.ndarray, box: tuple[slice, slice, slice], reference: CTReference,
) -> list[tuple[int, np.ndarray]]:
    """(slice index, (N, 3) LPS mm) of every contour of every slice of ``inside`` (bool, the
    ROI's mask cut to ``box``)."""
    z0, y0, x0 = (s.start for s in box)
    return [(z0 + dz, reference.pixel_to_patient(z0 + dz, contour.points_rc + (y0, x0)))
            for dz in range(inside.shape[0]) for contour in mask_contours(inside[dz])]


def add_structure_set(ds: Dataset, reference: CTReference, rois: Sequence[RoiContours], *,
                      algorithm: str = "AUTOMATIC", description: str = "",
                      observation_labels: bool = True) -> None:
    """Add the structure set drawn on ``reference`` to ``ds`` (its header is the caller's).

    Writes ReferencedFrameOfReferenceSequence (frame, study, series and every slice of the CT),
    and one ROI per item of ``rois``, numbered 1, 2, ... in order: StructureSetROISequence
    (ROIGenerationAlgorithm ``algorithm``; ROIGenerationDescription ``description`` and each ROI's
    ROIDescription unless empty),
    ROIContourSequence (one CLOSED_PLANAR item per polygon, numbered 1, 2, ... within its ROI,
    referencing its CT slice; ContourData in ``ds.file_meta``'s transfer syntax) and
    RTROIObservationsSequence (ROIObservationLabel = ROIName when ``observation_labels``).
    """
    implicit_vr = ds.file_meta.TransferSyntaxUID.is_implicit_VR
    series_item = Dataset()
    series_item.SeriesInstanceUID = reference.series_instance_uid
    series_item.ContourImageSequence = DicomSequence(
        [_image_reference(reference.sop_class_uid, uid) for uid in reference.sop_instance_uids]
    )
    study_item = Dataset()
    study_item.ReferencedSOPClassUID = STUDY_COMPONENT_MANAGEMENT
    study_item.ReferencedSOPInstanceUID = reference.study_instance_uid
    study_item.RTReferencedSeriesSequence = DicomSequence([series_item])
    frame_item = Dataset()
    frame_item.FrameOfReferenceUID = reference.frame_of_reference_uid
    frame_item.RTReferencedStudySequence = DicomSequence([study_item])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame_item])

    roi_items, contour_items, observation_items = [], [], []
    for number, roi in enumerate(rois, start=1):
        item = Dataset()
        item.ROINumber = number
        item.ReferencedFrameOfReferenceUID = reference.frame_of_reference_uid
        item.ROIName = roi.name
        item.ROIGenerationAlgorithm = algorithm
        if description:
            item.ROIGenerationDescription = description
        if roi.description:
            item.ROIDescription = roi.description
        roi_items.append(item)

        contours = []
        for k, points_mm in roi.contours:
            contour = Dataset()
            contour.ContourImageSequence = DicomSequence(
                [_image_reference(reference.sop_class_uid, reference.sop_instance_uids[k])])
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points_mm)
            contour.ContourNumber = len(contours) + 1
            contour[_CONTOUR_DATA_TAG] = contour_data_element(points_mm, implicit_vr=implicit_vr)
            contour.set_original_encoding(implicit_vr, True, "iso8859")  # the raw value is written as is
            contours.append(contour)
        roi_contour = Dataset()
        roi_contour.ROIDisplayColor = list(roi.color)
        roi_contour.ContourSequence = DicomSequence(contours)
        roi_contour.ReferencedROINumber = number
        contour_items.append(roi_contour)

        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        if observation_labels:
            observation.ROIObservationLabel = roi.name
        observation.RTROIInterpretedType = roi.interpreted_type
        observation.ROIInterpreter = ""
        observation_items.append(observation)
    ds.StructureSetROISequence = DicomSequence(roi_items)
    ds.ROIContourSequence = DicomSequence(contour_items)
    ds.RTROIObservationsSequence = DicomSequence(observation_items)


def _union_box(boxes: Iterable[tuple[slice, ...] | None]) -> tuple[slice, slice, slice]:
    present = [b for b in boxes if b is not None]
    return tuple(  # type: ignore[return-value]
        slice(min(b[axis].start for b in present), max(b[axis].stop for b in present)) for axis in range(3)
    )


def automatic_roi_description(label: int, *, model: str = "", verdict: str | None = None,
                              ptv_margin_mm: float | None = None) -> str:
    """ROIDescription of one automatic ROI, one line of at most 1024 characters (DICOM ST): that it is
    automatic and not reviewed, the model that made it, the QA verdict and the review it needs.

    ``model``: e.g. ``U-Net best.pth (sha256 1a2b3c4d5e6f)``. ``verdict``: the quality check's text for
    this structure (``QA ok``, ``QA flagged: <reasons>``); None: :data:`QA_NOT_RUN`. The PTV says how it
    was made: the automatic GTV grown by ``ptv_margin_mm`` mm, or (None) segmented by the network.
    ``ValueError`` for a label outside 1-7 or a negative or non-finite margin.

        >>> automatic_roi_description(organs.HEART, model="U-Net best.pth")[:58]
        'Automatic contour (not reviewed) by U-Net best.pth. QA not'
    """
    struct = organs.structure(label)
    if label == organs.BACKGROUND:
        raise ValueError("the background is not a structure: labels 1-7 have ROIs")
    by = f" by {model}" if model else ""
    what = f"Automatic contour (not reviewed){by}."
    if label == organs.PTV and ptv_margin_mm is not None:
        if not (ptv_margin_mm >= 0 and np.isfinite(ptv_margin_mm)):
            raise ValueError(f"PTV margin must be a finite number >= 0 mm, got {ptv_margin_mm}")
        what = (f"Automatic PTV (not reviewed): the automatic GTV {organs.automatic_roi_name(organs.GTV)}{by}, "
                f"grown by a {ptv_margin_mm:g} mm margin (isotropic, 3D).")
    elif label == organs.PTV:
        what = f"Automatic PTV (not reviewed), segmented{by} (labels GTV + PTV)."
    verdict = " ".join(str(verdict if verdict is not None else QA_NOT_RUN).split()).rstrip(".") + "."
    text = (f"{what} {verdict} A physician must review and edit it before any clinical use; once accepted, "
            f"rename it (e.g. {struct.rtstruct_name}).")
    return text if len(text) <= _ST_MAX else text[: _ST_MAX - 3] + "..."


def build_rtstruct(
    labels_zyx: np.ndarray, reference: CTReference, *, structure_set_label: str = DEFAULT_STRUCTURE_SET_LABEL,
    series_description: str = DEFAULT_SERIES_DESCRIPTION, model: str = "",
    labels: Sequence[int] = organs.FOREGROUND_LABELS, overlapping: Mapping[int, np.ndarray] | None = None,
    verdicts: Mapping[int, str] | None = None, ptv_margin_mm: float | None = None, now: _dt.datetime | None = None,
) -> FileDataset:
    """An RT Structure Set of the automatic contours of the structures present in ``labels_zyx`` (and in
    ``overlapping``).

    One ROI per structure present, coloured from ``thoracic_seg.organs`` and marked as automatic:
    ROIName ``organs.automatic_roi_name`` (``zGTV^Auto``...), ROIGenerationAlgorithm AUTOMATIC,
    ROIGenerationDescription ``model``, ROIDescription :func:`automatic_roi_description`; the contours of
    :func:`mask_contours` on every slice. A PTV in the label map (label 2) is written as GTV + PTV, because
    a PTV contains its GTV. A structure in ``overlapping`` (the PTV grown from the predicted GTV) is
    written from its own mask: ROIs overlap freely, as real contours do. The Frame of Reference module is
    at the top level (PositionReferenceIndicator empty when the CT has none), so the file passes ``dciodvfy``.

    Args:
        labels_zyx: (Z, Y, X) integer label map (values 0-7) on the CT grid: z index k is ``reference``'s
            slice k, (Y, X) = (Rows, Columns).
        reference: the CT series (:meth:`CTReference.from_datasets`).
        structure_set_label: StructureSetLabel (16 characters at most); ``series_description``: the new
            series' SeriesDescription; ``model``: what made the contours (checkpoint name and hash), every
            ROI's ROIGenerationDescription (its first 64 characters) and part of its ROIDescription.
        labels: which structures to write (those with no voxel of their own label are left out).
        overlapping: label -> bool (Z, Y, X) mask written instead of the label map, in ``labels``' order.
        verdicts: label -> the quality check's verdict for that structure, written in its ROIDescription;
            a structure without one (or ``verdicts`` None) says :data:`QA_NOT_RUN`.
        ptv_margin_mm: the margin (mm) by which an overlapping PTV was grown from the GTV, for its
            description; None: a PTV of the network's labels.
        now: StructureSetDate/Time, SeriesDate/Time (default: the current local time).

    Returns a ``FileDataset`` with file meta (Implicit VR Little Endian) and new Series/SOP Instance UIDs;
    save it with :func:`write_rtstruct`. ``ValueError``: a label map (or overlapping mask) not 3D or not
    fitting the CT's slices/rows/columns, values outside 0-7, a structure set label that is too long, or a
    verdict for a label outside 1-7.
    """
    labels_zyx = np.asarray(labels_zyx)
    expected = (reference.num_slices, *reference.shape_yx)
    if labels_zyx.shape != expected:
        raise ValueError(
            f"label map shape {labels_zyx.shape} (z, y, x) does not fit the CT: expected {expected} "
            "(slices, Rows, Columns)"
        )
    overlapping = {int(k): np.asarray(v, dtype=bool) for k, v in (overlapping or {}).items()}
    for label, mask in overlapping.items():
        organs.structure(label)  # ValueError for a label outside 0-7
        if mask.shape != expected:
            raise ValueError(f"overlapping {organs.label_name(label)} mask shape {mask.shape} does not fit "
                             f"the CT: expected {expected} (slices, Rows, Columns)")
    if not np.issubdtype(labels_zyx.dtype, np.integer):
        raise ValueError(f"label map must hold integers 0-{organs.NUM_CLASSES - 1}, got dtype {labels_zyx.dtype}")
    if labels_zyx.size and (labels_zyx.min() < 0 or labels_zyx.max() >= organs.NUM_CLASSES):
        raise ValueError(
            f"label map holds values {labels_zyx.min()}..{labels_zyx.max()}, expected 0-{organs.NUM_CLASSES - 1}"
        )
    if len(structure_set_label) > 16:
        raise ValueError(f"structure_set_label is at most 16 characters, got {structure_set_label!r}")
    verdicts = dict(verdicts or {})
    for label in verdicts:
        if organs.structure(label).label == organs.BACKGROUND:  # ValueError for a label outside 0-7
            raise ValueError("a QA verdict for the background: verdicts are for labels 1-7")
    now = now or _dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")

    sop_instance_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    # Implicit VR: 32-bit value lengths. In explicit VR a DS value is limited to 64 KiB, which a
    # long contour (a body outline, a jagged lung) can exceed; every DICOM reader supports it.
    meta.TransferSyntaxUID = ImplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)

    # SOP common, patient, general study (copied from the CT), RT series, general equipment
    ds.update(reference.header)
    for keyword in COPIED_TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = series_description
    ds.OperatorsName = ""  # type 2 in the RT Series module: present, unknown (software wrote it)
    ds.Manufacturer = "lung-ct-multi-organ"
    ds.InstanceNumber = 1

    ds.StructureSetLabel = structure_set_label
    ds.StructureSetDate, ds.StructureSetTime = date, time
    ds.FrameOfReferenceUID = reference.frame_of_reference_uid  # Frame of Reference module (type 1)
    ds.ApprovalStatus = "UNAPPROVED"  # automatic contours must be reviewed before planning

    # One ROI per structure present
    boxes = ndimage.find_objects(labels_zyx.astype(np.int32, copy=False), max_label=organs.NUM_CLASSES - 1)
    rois = []
    for label in labels:
        if label in overlapping:
            found = ndimage.find_objects(overlapping[label].astype(np.uint8))
            if not found:
                continue
            box = found[0]
            inside = overlapping[label][box]
        else:
            if boxes[label - 1] is None:  # a PTV ROI only where the label map has PTV voxels
                continue
            box = _union_box(boxes[m - 1] for m in ROI_MEMBERS[label])
            inside = np.isin(labels_zyx[box], ROI_MEMBERS[label])
        description = automatic_roi_description(label, model=model, verdict=verdicts.get(label),
                                                 ptv_margin_mm=ptv_margin_mm if label in overlapping else None)
        rois.append(RoiContours(organs.automatic_roi_name(label), organs.structure(label).color,
                                INTERPRETED_TYPE[label], _mask_contours_mm(inside, box, reference), description))
    add_structure_set(ds, reference, rois, algorithm="AUTOMATIC", description=model[:_LO_MAX])
    log.debug("RTSTRUCT: %d ROIs, %d contours", len(rois), sum(len(r.contours) for r in rois))
    return ds


def write_rtstruct(rtstruct: Dataset, path: Path | str) -> None:
    """Save an RTSTRUCT as a DICOM Part 10 file (preamble, file meta), atomically."""
    with atomic_output(path) as tmp:
        rtstruct.save_as(tmp, enforce_file_format=True)


def roi_summary(rtstruct: Dataset) -> dict[str, int]:
    """ROI name -> number of contours, for logs and tests."""
    numbers = {int(c.ReferencedROINumber): len(getattr(c, "ContourSequence", [])) for c in rtstruct.ROIContourSequence}
    return {str(r.ROIName): numbers.get(int(r.ROINumber), 0) for r in rtstruct.StructureSetROISequence}


def contours_by_roi(rtstruct: Dataset) -> Mapping[str, list[Any]]:
    """ROI name -> its ContourSequence items (empty list for an ROI without contours)."""
    by_number = {int(c.ReferencedROINumber): list(getattr(c, "ContourSequence", [])) for c in rtstruct.ROIContourSequence}
    return {str(r.ROIName): by_number.get(int(r.ROINumber), []) for r in rtstruct.StructureSetROISequence}
