"""predict_multi_organ: DICOM or NIfTI in -> label map, RTSTRUCT, volumes and overlay out."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

import predict_multi_organ as pm
from extract_multi_organ_masks import OWN_AUTOMATIC, build_structures, combine_labels
from thoracic_seg import inference
from thoracic_seg import organs, precision
from thoracic_seg.batch import DONE, FAILED, SKIPPED, PatientError, same_geometry
from thoracic_seg.geometry import Grid
from thoracic_seg.grid import to_network_array
from thoracic_seg.image_grid import segment_image
from thoracic_seg.inference import MAX_BATCH_SIZE, CheckpointError, Predictor, auto_batch_size
from thoracic_seg.ptv import fold_derived_ptv, ptv_from_gtv
from thoracic_seg.rtstruct_read import read_rois
from unet_multi_organ import UNetMultiOrgan, build_checkpoint, checkpoint_ptv, save_untrained_checkpoint
from thoracic_seg.batch import file_sha256
from thoracic_seg.cases import (
    OUTPUT_SUFFIXES, PREDICTION_FORMAT, RTSTRUCT_FORMAT, VOLUME_COLUMNS, find_cases, prediction_provenance, read_case,
)
from thoracic_seg import qa
from thoracic_seg.figures import overlay_figure

TINY_SIZE = 32  # network input: 32 x 32 slices (the synthetic CTs are 64 x 64)
LABEL_OF_AUTOMATIC_NAME = {organs.automatic_roi_name(label): label for label in organs.FOREGROUND_LABELS}
PREPROCESSING = {"window": [-1000, 400], "size": TINY_SIZE, "zscore": "per_patient"}


def save_checkpoint(path: Path, *, base_channels: int = 4, seed: int = 1, **changes) -> Path:
    """An untrained U-Net checkpoint in the training script's format (zero biases: this network,
    seed 1, gives the synthetic CTs all eight labels in speckled regions, which exercises every
    output path), with ``changes`` applied."""
    return save_untrained_checkpoint(path, PREPROCESSING, base_channels=base_channels, seed=seed,
                                     **{"val_loss": 1.0, **changes})


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a loaded 2-core machine, OpenMP threads waiting for each other
    make this tiny network 300x slower (0.8 s instead of 2 ms per batch)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth")


@pytest.fixture(scope="module")
def cohort_prediction(synthetic_cohort, tiny_checkpoint, tmp_path_factory):
    """The whole synthetic cohort (a folder of patient folders) through main(), default precision."""
    raw_dir, truth_dir, cohort = synthetic_cohort
    out = tmp_path_factory.mktemp("predictions")
    status = pm.main(["--input", str(raw_dir), "--checkpoint", str(tiny_checkpoint), "--output", str(out)])
    return status, out, raw_dir, truth_dir, cohort


def _labels(path: Path) -> tuple[np.ndarray, sitk.Image]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------
def test_every_patient_of_a_folder_gets_all_four_outputs(cohort_prediction):
    status, out, _, _, cohort = cohort_prediction
    assert status == 0
    expected = {f"{r['patient_id']}{suffix}" for r in cohort for suffix in OUTPUT_SUFFIXES.values()}
    assert {p.name for p in out.iterdir()} == expected


def test_label_map_is_on_the_ct_grid(cohort_prediction):
    _, out, _, truth_dir, cohort = cohort_prediction
    for record in cohort:
        labels, image = _labels(out / f"{record['patient_id']}_labels.nii.gz")
        truth = sitk.ReadImage(str(truth_dir / record["truth_file"]))  # written on the CT grid
        assert same_geometry(image, truth)
        assert image.GetPixelID() == sitk.sitkUInt8
        assert labels.shape == tuple(record["shape_zyx"]) and labels.max() < organs.NUM_CLASSES


def test_rtstruct_references_the_ct_and_holds_the_label_map(cohort_prediction):
    _, out, raw_dir, _, cohort = cohort_prediction
    record = cohort[0]
    pid = record["patient_id"]
    labels, image = _labels(out / f"{pid}_labels.nii.gz")
    ds = pydicom.dcmread(out / f"{pid}_RTSTRUCT.dcm")
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3" and ds.PatientID == pid
    (frame,) = ds.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == record["frame_of_reference_uid"]
    (series,) = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence
    assert series.SeriesInstanceUID == record["ct_series_uid"]
    ct_uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
               for p in (raw_dir / record["ct_folder"]).glob("*.dcm")]
    assert sorted(i.ReferencedSOPInstanceUID for i in series.ContourImageSequence) == sorted(ct_uids)
    present = [organs.automatic_roi_name(v) for v in np.unique(labels) if v]
    assert [r.ROIName for r in ds.StructureSetROISequence] == present
    # phase 2.5 takes none of our automatic ROIs as truth: no label, each listed as ours
    grid = Grid.of(image)
    structures, unmatched = build_structures(read_rois(ds), grid, derive_ptv=False)
    assert not any(s.annotated for s in structures.values()) and unmatched == dict.fromkeys(present, OWN_AUTOMATIC)
    # renamed by a physician who accepts them, they are exactly the label map written beside them
    for item in ds.StructureSetROISequence:
        item.ROIName = organs.structure(LABEL_OF_AUTOMATIC_NAME[item.ROIName]).rtstruct_name
        item.ROIGenerationAlgorithm = "MANUAL"
    structures, unmatched = build_structures(read_rois(ds), grid, derive_ptv=False)
    back, _, _ = combine_labels(structures, grid.shape_zyx)
    assert unmatched == {} and np.array_equal(back, labels)


def test_rtstruct_rois_say_automatic_model_hash_qa_and_review(cohort_prediction, tiny_checkpoint):
    _, out, _, _, cohort = cohort_prediction
    ds = pydicom.dcmread(out / f"{cohort[0]['patient_id']}_RTSTRUCT.dcm")
    qa_rows = {int(r["label"]): r for r in _rows(out / f"{cohort[0]['patient_id']}_qa.csv")}
    model = f"U-Net tiny.pth (sha256 {file_sha256(tiny_checkpoint)[:12]})"
    for item in ds.StructureSetROISequence:
        assert (item.ROIGenerationAlgorithm, item.ROIGenerationDescription) == ("AUTOMATIC", model)
        assert item.ROIDescription.startswith(("Automatic contour (not reviewed) by " + model,
                                               "Automatic PTV (not reviewed), segmented by " + model))
        row = qa_rows[LABEL_OF_AUTOMATIC_NAME[item.ROIName]]  # the structure's quality check, in _qa.csv
        not_checked = ", ".join(part.split(":")[0] for part in row["not_checked"].split("; "))
        verdict = f"QA flagged: {row['reasons']}" if row["verdict"] == "flagged" else \
            f"QA ok (not checked: {not_checked})"
        assert f" {verdict}. A physician must review and edit it before any clinical use" in item.ROIDescription


def test_volumes_csv_counts_the_label_map(cohort_prediction):
    _, out, _, _, cohort = cohort_prediction
    pid = cohort[1]["patient_id"]
    labels, image = _labels(out / f"{pid}_labels.nii.gz")
    rows = _rows(out / f"{pid}_volumes.csv")
    checked = _rows(out / f"{pid}_qa.csv")
    assert [r["qa"] for r in rows] == [r["flags"] or "ok" for r in checked]
    assert tuple(rows[0]) == VOLUME_COLUMNS
    assert [r["rtstruct_name"] for r in rows] == [organs.automatic_roi_name(s.label) for s in organs.STRUCTURES[1:]]
    voxel_ml = np.prod(image.GetSpacing()) / 1000
    for row in rows:
        label = int(row["label"])
        own = int((labels == label).sum())
        expected = int(np.isin(labels, [organs.GTV, organs.PTV]).sum()) if label == organs.PTV and own else own
        assert (row["patient_id"], int(row["voxels"])) == (pid, expected)
        assert float(row["volume_ml"]) == pytest.approx(expected * voxel_ml, abs=1e-3)


def test_qa_csv_checks_every_structure_of_the_label_map(cohort_prediction):
    """One row per structure: its voxels those of the label map, the network's confidence measured from the
    probabilities, the volume check not available (this checkpoint predates training volumes)."""
    _, out, _, _, cohort = cohort_prediction
    for record in cohort:
        pid = record["patient_id"]
        labels, image = _labels(out / f"{pid}_labels.nii.gz")
        rows = _rows(out / f"{pid}_qa.csv")
        assert tuple(rows[0]) == qa.QA_COLUMNS and [int(r["label"]) for r in rows] == list(organs.FOREGROUND_LABELS)
        volumes = {r["structure"]: r for r in _rows(out / f"{pid}_volumes.csv")}
        for row in rows:
            assert row["voxels"] == volumes[row["structure"]]["voxels"]
            assert row["verdict"] == ("flagged" if row["flags"] else "ok")
            assert bool(row["reasons"]) == bool(row["flags"])
            if int(row["label"]) != organs.PTV and int(row["voxels"]):
                assert 0.125 <= float(row["confidence"]) <= 1.0
                assert row["not_checked"].startswith("volume: the checkpoint holds no training volumes")
            if int(row["label"]) in (organs.RIGHT_LUNG, organs.HEART) and int(row["voxels"]):
                assert int(row["components"]) >= 1 and row["lateral_offset_mm"] != ""


def test_the_log_names_the_flagged_structures_and_the_overlay_too(synthetic_cohort, tiny_checkpoint, tmp_path,
                                                                    caplog, monkeypatch):
    raw_dir, _, cohort = synthetic_cohort
    pid = cohort[0]["patient_id"]
    drawn = {}
    monkeypatch.setattr("thoracic_seg.cases.write_overlay_png", lambda *a, **k: drawn.update(k))
    with caplog.at_level("INFO"):
        (result,) = pm.run(input_path=raw_dir / pid, checkpoint=tiny_checkpoint, output_dir=tmp_path, device="cpu")
    flagged = {label: r.codes for label, r in result.info["qa"].items() if r.flagged}
    assert flagged  # an untrained network: implausible structures
    line = qa.summary(pid, result.info["qa"])
    assert line.startswith(f"{pid}: QA flagged {len(flagged)} of 7 structures: ")
    assert [r.getMessage() for r in caplog.records if "QA" in r.getMessage()] == [line]
    assert drawn["flagged"] == flagged


def test_overlay_names_the_flagged_structures():
    hu = np.full((3, 16, 16), -1000.0)
    labels = np.zeros((3, 16, 16), np.uint8)
    labels[1, 4:8, 4:8] = organs.HEART
    labels[1, 10:12, 10:12] = organs.LEFT_LUNG
    fig = overlay_figure(hu, labels, "P1: best.pth", flagged={organs.HEART: ["volume", "cut"], organs.GTV: ["missing"]})
    assert fig._suptitle.get_text() == "P1: best.pth\nQA flagged: GTV (missing); Heart (volume, cut)"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["Left lung", "Heart: QA volume, cut"]
    assert overlay_figure(hu, labels, "P1", flagged={})._suptitle.get_text() == "P1\nQA: no structure flagged"
    assert overlay_figure(hu, labels, "P1")._suptitle.get_text() == "P1"


def test_a_checkpoint_with_training_volumes_checks_each_volume_against_them(synthetic_cohort, tmp_path):
    raw_dir, _, cohort = synthetic_cohort
    volumes = qa.training_volume_record({"A": {"heart": 100.0, "lung_left": 900.0}, "B": {"heart": 140.0,
                                                                                          "lung_left": 1100.0}}, "test")
    checkpoint = save_checkpoint(tmp_path / "volumes.pth", training_volumes=volumes)
    (result,) = pm.run(input_path=raw_dir / cohort[0]["patient_id"], checkpoint=checkpoint, output_dir=tmp_path / "out",
                       device="cpu")
    rows = {r["structure"]: r for r in _rows(result.info["outputs"]["qa"])}
    heart = rows["heart"]
    assert (heart["training_n"], heart["training_min_ml"], heart["training_max_ml"]) == ("2", "100.0", "140.0")
    assert "volume:" not in heart["not_checked"]
    in_range = 100 / 1.5 <= float(heart["volume_ml"]) <= 140 * 1.5
    assert ("volume" in heart["flags"].split()) == (not in_range and int(heart["voxels"]) > 0)
    assert rows["esophagus"]["not_checked"].startswith("volume: 0 training patient(s) with Esophagus annotated")


def test_overlay_is_a_png_montage(cohort_prediction):
    _, out, _, _, cohort = cohort_prediction
    import matplotlib.image

    path = out / f"{cohort[0]['patient_id']}_overlay.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] >= 300 and pixels.shape[1] == 1200  # 4 tiles of 3 inches at 100 dpi


def test_nifti_input_gives_the_same_labels_and_no_rtstruct(cohort_prediction, tiny_checkpoint, tmp_path):
    _, out, raw_dir, _, cohort = cohort_prediction
    from thoracic_seg.dicom_ct import read_ct_series

    record = cohort[2]
    ct = read_ct_series(sorted((raw_dir / record["ct_folder"]).glob("*.dcm")))
    nifti = tmp_path / f"{record['patient_id']}.nii.gz"
    sitk.WriteImage(ct.image, str(nifti))
    (result,) = pm.run(input_path=nifti, checkpoint=tiny_checkpoint, output_dir=tmp_path / "out")
    assert result.status == DONE and set(result.info["outputs"]) == {"labels", "ptv", "volumes", "qa", "overlay",
                                                                     "provenance"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        f"{record['patient_id']}{s}" for s in ("_PTV.nii.gz", "_labels.nii.gz", "_overlay.png", "_provenance.json",
                                              "_qa.csv", "_volumes.csv")]
    from_nifti, image = _labels(tmp_path / "out" / f"{record['patient_id']}_labels.nii.gz")
    from_dicom, _ = _labels(out / f"{record['patient_id']}_labels.nii.gz")
    assert same_geometry(image, ct.image) and np.array_equal(from_nifti, from_dicom)


def test_existing_outputs_are_skipped_unless_overwrite(synthetic_cohort, tiny_checkpoint, tmp_path):
    raw_dir, _, cohort = synthetic_cohort
    patient = raw_dir / cohort[0]["patient_id"]
    kwargs = dict(input_path=patient, checkpoint=tiny_checkpoint, output_dir=tmp_path, precision="float32")
    (first,) = pm.run(**kwargs)
    assert first.status == DONE
    assert set(first.info["seconds"]) == {"read", "preprocess", "predict", "map_back", "qa", "rtstruct", "write"}
    (second,) = pm.run(**kwargs)
    assert second.status == SKIPPED
    (third,) = pm.run(**kwargs, overwrite=True)
    assert third.status == DONE


def test_structures_choose_the_rtstruct_rois_and_the_label_map_keeps_all(synthetic_cohort, tiny_checkpoint,
                                                                         tmp_path):
    raw_dir, _, cohort = synthetic_cohort
    pid = cohort[0]["patient_id"]
    common = ["--input", str(raw_dir / pid), "--checkpoint", str(tiny_checkpoint), "--device", "cpu"]
    assert pm.main([*common, "--output", str(tmp_path / "all")]) == 0
    assert pm.main([*common, "--output", str(tmp_path / "some"), "--structures", "Heart", "lung_left", "PTV"]) == 0
    every, _ = _labels(tmp_path / "all" / f"{pid}_labels.nii.gz")
    some, _ = _labels(tmp_path / "some" / f"{pid}_labels.nii.gz")
    assert np.array_equal(every, some) and {organs.GTV, organs.RIGHT_LUNG} <= set(np.unique(some))  # all kept
    chosen = ["zPTV^Auto", "zLung_L^Auto", "zHeart^Auto"]  # label order
    contours = {}
    for name in ("all", "some"):
        ds = pydicom.dcmread(tmp_path / name / f"{pid}_RTSTRUCT.dcm")
        contours[name] = {str(roi.ROIName): [list(c.ContourData) for c in contour.ContourSequence]
                          for roi, contour in zip(ds.StructureSetROISequence, ds.ROIContourSequence)}
    assert list(contours["some"]) == chosen
    assert all(contours["some"][n] == contours["all"][n] for n in chosen)  # the same contours
    with open(tmp_path / "some" / f"{pid}_volumes.csv", newline="") as handle:
        names = {r["structure"]: r["rtstruct_name"] for r in csv.DictReader(handle)}
    assert names == {"gtv": "", "ptv": "zPTV^Auto", "lung_right": "", "lung_left": "zLung_L^Auto",
                     "heart": "zHeart^Auto", "esophagus": "", "spinal_cord": ""}


def test_unknown_structure_is_refused_naming_the_allowed(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        pm.main(["--input", str(tmp_path), "--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path / "out"),
                 "--structures", "heart", "liver"])
    assert exit_.value.code == 2
    assert ("unknown structure 'liver'; choose from gtv, ptv, lung_right, lung_left, heart, esophagus, spinal_cord"
            in capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change", [
    {"ptv_margin_mm": 5.0},                                # another PTV margin
    {"postprocess": True},                                 # another post-processing
    {"checkpoint": "other"},                               # another checkpoint
    {"structures": ["heart", "Lung_L"]},                   # other structures in the RTSTRUCT
])
def test_outputs_of_other_settings_are_redone_the_same_are_skipped(synthetic_cohort, tiny_checkpoint, tmp_path,
                                                                   change):
    raw_dir, _, cohort = synthetic_cohort
    kwargs = dict(input_path=raw_dir / cohort[0]["patient_id"], checkpoint=tiny_checkpoint, output_dir=tmp_path,
                  device="cpu")
    assert pm.run(**kwargs)[0].status == DONE
    if change.get("checkpoint") == "other":
        change = {"checkpoint": save_checkpoint(tmp_path / "other.pth", seed=2)}
    (redone,) = pm.run(**{**kwargs, **change})
    assert redone.status == DONE and redone.message.startswith("redone: the outputs there were made with another "
                                                               "checkpoint or settings")
    assert pm.run(**{**kwargs, **change})[0].status == SKIPPED
    record = json.loads((tmp_path / f"{cohort[0]['patient_id']}_provenance.json").read_text())
    assert record["format"] == PREDICTION_FORMAT and len(record["checkpoints_sha256"]) == 1
    keys = ["lung_left", "heart"] if "structures" in change else [s.key for s in organs.STRUCTURES[1:]]
    assert record["rtstruct"] == {"format": RTSTRUCT_FORMAT, "structures": keys, "roi_names": [
        organs.automatic_roi_name(organs.structure_of_name(k).label) for k in keys]}


def test_outputs_made_before_the_quality_check_are_redone(synthetic_cohort, tiny_checkpoint, tmp_path):
    raw_dir, _, cohort = synthetic_cohort
    kwargs = dict(input_path=raw_dir / cohort[0]["patient_id"], checkpoint=tiny_checkpoint, output_dir=tmp_path,
                  device="cpu")
    (first,) = pm.run(**kwargs)
    path = first.info["outputs"]["provenance"]
    record = json.loads(path.read_text())
    assert record["qa"] == {"format": qa.QA_FORMAT, "thresholds": qa.QA_THRESHOLDS}
    del record["qa"]  # as prediction wrote it before the check existed
    path.write_text(json.dumps(record))
    (again,) = pm.run(**kwargs)
    assert again.status == DONE and again.message.startswith("redone")
    assert json.loads(path.read_text())["qa"]["format"] == qa.QA_FORMAT


def test_evaluation_provenance_has_no_rtstruct_part(tiny_checkpoint):
    """Evaluation compares its saved predictions with prediction_provenance without structures: the
    RTSTRUCT's names and format do not make it refuse a folder of label maps."""
    predictor = Predictor.load(tiny_checkpoint, device="cpu")
    assert "rtstruct" not in prediction_provenance(predictor)
    assert prediction_provenance(predictor, (organs.HEART,))["rtstruct"]["roi_names"] == ["zHeart^Auto"]


def test_postprocess_applies_the_rule_of_each_structure(synthetic_cohort, tiny_checkpoint, tmp_path):
    """Lungs and heart keep their largest component; the esophagus, the spinal cord and the tumours are
    left alone (thoracic_seg.postprocess.POSTPROCESS_MIN_FRACTION)."""
    raw_dir, _, cohort = synthetic_cohort
    kwargs = dict(input_path=raw_dir / cohort[0]["patient_id"], checkpoint=tiny_checkpoint, precision="float32")
    (plain,) = pm.run(**kwargs, output_dir=tmp_path / "plain")
    (result,) = pm.run(**kwargs, output_dir=tmp_path / "post", postprocess=True)
    assert result.status == DONE and "postprocess" in result.info["seconds"]
    before, _ = _labels(plain.info["outputs"]["labels"])
    after, _ = _labels(result.info["outputs"]["labels"])
    full = ndimage.generate_binary_structure(3, 3)

    def sizes(labels, label):
        components, count = ndimage.label(labels == label, structure=full)
        return sorted(np.bincount(components.ravel())[1:].tolist(), reverse=True)

    organ_labels = (organs.RIGHT_LUNG, organs.LEFT_LUNG, organs.HEART, organs.ESOPHAGUS, organs.SPINAL_CORD)
    assert max(len(sizes(before, label)) for label in organ_labels) > 1  # the untrained network leaves islands
    for label in (organs.RIGHT_LUNG, organs.LEFT_LUNG, organs.HEART):
        assert sizes(after, label) == sizes(before, label)[:1]
    changed = before != after
    assert changed.any() and (after[changed] == organs.BACKGROUND).all()
    for label in (organs.ESOPHAGUS, organs.SPINAL_CORD, organs.GTV, organs.PTV):  # tubes, multifocal tumours
        assert np.array_equal(before == label, after == label)
    for label in (organs.RIGHT_LUNG, organs.LEFT_LUNG):  # the quality check knows what post-processing removed
        removed = 1 - (after == label).sum() / (before == label).sum()
        assert result.info["qa"][label].features["removed_fraction"] == pytest.approx(removed)
        assert plain.info["qa"][label].features["removed_fraction"] == 0.0


def test_predict_maps_back_to_the_ct_grid_with_a_model_that_thresholds_intensity():
    # A 1x1 convolution whose logits favour label 3 where the z-scored CT is above 0, else 0:
    # after the resize to 32x32 and back to 64x64 the labels follow the HU threshold but for
    # the blur of the two resizes at the border.
    model = torch.nn.Conv2d(1, organs.NUM_CLASSES, kernel_size=1)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.fill_(-10.0)
        model.weight[organs.RIGHT_LUNG, 0, 0, 0] = 5.0
        model.bias[organs.BACKGROUND] = 0.0
        model.bias[organs.RIGHT_LUNG] = 0.0
    predictor = Predictor(model, Path("threshold.pth"), torch.device("cpu"), precision.FLOAT32, batch_size=3,
                             window=(-1000.0, 400.0), size=TINY_SIZE)
    hu = np.full((5, 64, 64), -1000, np.int16)
    hu[:, 16:48, 8:40] = 400  # bright square: half of the in-window mean is -650 HU
    seconds: dict[str, float] = {}
    labels = predictor.segment(hu, seconds)
    assert labels.shape == (5, 64, 64) and labels.dtype == np.uint8
    expected = np.where(hu > -300, organs.RIGHT_LUNG, organs.BACKGROUND)
    inner = ndimage.binary_erosion(expected > 0, iterations=2)
    outer = ndimage.binary_dilation(expected > 0, iterations=2)
    assert (labels[inner] == organs.RIGHT_LUNG).all() and (labels[~outer] == organs.BACKGROUND).all()
    assert abs(int((labels > 0).sum()) - int((expected > 0).sum())) <= 5 * 8  # border blur only
    assert set(seconds) == {"preprocess", "predict", "map_back"}


class FixedLogits(torch.nn.Module):
    """Returns ``logits[z]`` for an input slice filled with the value z."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x[:, 0, 0, 0].long()]


@pytest.mark.parametrize("shape", [(64, 64), (32, 32), (20, 24), (48, 100), (20, 100)])
def test_map_back_gives_the_labels_of_the_evaluation(shape):
    """Softmax first, then phase 3's ``probabilities_to_ct_labels`` (evaluation's way back; its
    tests compare it with the former formulations): the labels of a direct anti-aliased
    bilinear resize of the probabilities and argmax."""
    from thoracic_seg.grid import probabilities_to_ct_labels

    logits = torch.randn(3, organs.NUM_CLASSES, 32, 32, generator=torch.Generator().manual_seed(0)) * 3
    predictor = Predictor(FixedLogits(logits), Path("fixed.pth"), torch.device("cpu"), precision.FLOAT32,
                             batch_size=2, window=(-1000.0, 400.0), size=32)
    seconds: dict[str, float] = {}
    got = predictor.predict(np.arange(3, dtype=np.float32)[:, None, None].repeat(32, 1).repeat(32, 2), shape, seconds)
    assert got.dtype == np.uint8 and got.shape == (3, *shape) and set(seconds) == {"predict", "map_back"}
    probabilities = torch.softmax(logits, dim=1)
    np.testing.assert_array_equal(got, probabilities_to_ct_labels(probabilities, shape))
    if shape != (32, 32):
        probabilities = torch.nn.functional.interpolate(probabilities, size=shape, mode="bilinear",
                                                        align_corners=False, antialias=True)
    np.testing.assert_array_equal(got, probabilities.argmax(dim=1).to(torch.uint8).numpy())


# --------------------------------------------------------------------------------------------
# Device, precision, batch size
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("request_, native, dtype, channels_last", [
    ("float32", True, torch.float32, False),
    ("auto", True, torch.bfloat16, True),
    ("auto", False, torch.float32, False),
    ("bfloat16", False, torch.bfloat16, True),
])
def test_predictor_takes_the_prediction_precision_policy(tiny_checkpoint, monkeypatch, request_, native, dtype,
                                                         channels_last):
    """The table of the policy itself is in test_precision.py; here: the model follows it."""
    monkeypatch.setattr(precision, "cpu_has_native_bfloat16", lambda: native)
    predictor = Predictor.load(tiny_checkpoint, device="cpu", precision=request_, batch_size=2)
    assert predictor.precision == precision.prediction_precision(request_, torch.device("cpu"))
    assert (predictor.dtype, predictor.channels_last) == (dtype, channels_last)
    weight = predictor.model.inc[3].weight  # 4 -> 4 channels: the layouts differ
    assert weight.is_contiguous(memory_format=torch.channels_last) is channels_last
    assert f"({str(dtype)[6:]}{' + channels-last' if channels_last else ''})" in predictor.describe()


def test_unknown_precision_is_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match="precision must be one of auto, float32, bfloat16, got 'half'"):
        Predictor.load(tiny_checkpoint, device="cpu", precision="half")


def test_auto_batch_size_fits_memory(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(inference, "_available_memory_bytes", lambda device: 64 * 1024**3)
    assert auto_batch_size(cpu, 256, 64, torch.float32) == MAX_BATCH_SIZE["cpu"]
    # one float32 slice of the default network needs 8 * 4 * 64 * 256^2 bytes = 128 MiB: 1 GiB free -> 2
    monkeypatch.setattr(inference, "_available_memory_bytes", lambda device: 1024**3)
    assert auto_batch_size(cpu, 256, 64, torch.float32) == 2
    assert auto_batch_size(cpu, 256, 64, torch.bfloat16) == 4
    monkeypatch.setattr(inference, "_available_memory_bytes", lambda device: 1024**2)
    assert auto_batch_size(cpu, 256, 64, torch.float32) == 1


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def test_folder_without_ct_series_is_refused(synthetic_cohort, tiny_checkpoint, tmp_path):
    raw_dir, _, cohort = synthetic_cohort
    only_rtstruct = tmp_path / "rt_only"
    only_rtstruct.mkdir()
    shutil.copy(raw_dir / cohort[0]["rtstruct_file"], only_rtstruct / "rt.dcm")
    with pytest.raises(ValueError, match=r"no CT image series under .*rt_only \(found: 1 RTSTRUCT\)"):
        pm.run(input_path=only_rtstruct, checkpoint=tiny_checkpoint, output_dir=tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no CT image series under .*empty \(found: no DICOM files\)"):
        pm.run(input_path=empty, checkpoint=tiny_checkpoint, output_dir=tmp_path / "out")
    with pytest.raises(ValueError, match=r"rt\.dcm is not a NIfTI CT"):
        pm.run(input_path=only_rtstruct / "rt.dcm", checkpoint=tiny_checkpoint, output_dir=tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="missing not found"):
        pm.run(input_path=tmp_path / "missing", checkpoint=tiny_checkpoint, output_dir=tmp_path / "out")


@pytest.mark.parametrize("changes, message", [
    ({"format": "something_else"}, "not a unet_multi_organ checkpoint"),
    ({"model_config": {"in_channels": 1, "out_channels": 8, "base_channels": 8}}, "weights do not match model_config"),
    ({"labels": {"0": "background", "1": "heart"}}, "differ from thoracic_seg/organs.py"),
    ({"preprocessing": None}, "no 'preprocessing' settings"),
    ({"preprocessing": {"window": [400, -1000], "size": 32}}, "window LOW must be below HIGH"),
    ({"preprocessing": {"window": [-1000, 400], "size": 32, "zscore": "global"}}, "only 'per_patient'"),
    ({"preprocessing": {"window": [-1000, 400], "size": 32, "crop": {"method": "ring"}}},
     r"preprocessing: unknown crop \{'method': 'ring'\}"),
    ({"preprocessing": {"window": [-1000, 400], "size": 32, "crop": {"method": "body", "threshold_hu": -500}}},
     r"invalid crop .*'margin_mm'"),
])
def test_checkpoint_that_is_not_ours_or_does_not_fit_is_refused(tmp_path, changes, message):
    checkpoint = save_checkpoint(tmp_path / "bad.pth", **changes)
    with pytest.raises(CheckpointError, match=message):
        Predictor.load(checkpoint, device="cpu")


def test_checkpoint_of_another_model_shape_or_file_type_is_refused(tmp_path):
    torch.manual_seed(0)
    wrong = build_checkpoint(UNetMultiOrgan(in_channels=1, out_channels=3, base_channels=4),
                             preprocessing=PREPROCESSING, epoch=0, val_loss=1.0)
    torch.save(wrong, tmp_path / "three.pth")
    with pytest.raises(CheckpointError, match=r"maps 1 channel.* to 3 classes; expected 1 CT channel\(s\) -> 8 labels"):
        Predictor.load(tmp_path / "three.pth", device="cpu")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a unet_multi_organ checkpoint"):
        Predictor.load(tmp_path / "text.pth", device="cpu")


def test_bad_checkpoint_on_the_command_line_is_one_line_error(synthetic_cohort, tmp_path, capsys):
    raw_dir, _, cohort = synthetic_cohort
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        pm.main(["--input", str(raw_dir / cohort[0]["patient_id"]), "--checkpoint", str(tmp_path / "text.pth"),
                 "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "text.pth: not a unet_multi_organ checkpoint" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_a_gpu_is_one_line_error(synthetic_cohort, tiny_checkpoint, tmp_path, capsys):
    raw_dir, _, cohort = synthetic_cohort
    with pytest.raises(SystemExit) as exit_info:
        pm.main(["--input", str(raw_dir / cohort[0]["patient_id"]), "--checkpoint", str(tiny_checkpoint),
                 "--output", str(tmp_path), "--device", "cuda"])
    assert exit_info.value.code == 2 and "sees no CUDA GPU" in capsys.readouterr().err


def _copy_ct(raw_dir: Path, record: dict, dest: Path) -> list[Path]:
    shutil.copytree(raw_dir / record["ct_folder"], dest)
    files = sorted(dest.glob("*.dcm"))
    return sorted(files, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))


def test_ct_with_gantry_tilt_fails_with_phase2_reason(synthetic_cohort, tiny_checkpoint, tmp_path):
    raw_dir, _, cohort = synthetic_cohort
    files = _copy_ct(raw_dir, cohort[0], tmp_path / "tilted" / "ct")
    for k, path in enumerate(files):  # each slice shifted 0.5 mm further posterior: ~9.5 deg tilt
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient[1] = float(ds.ImagePositionPatient[1]) + 0.5 * k
        ds.save_as(path)
    (case,) = find_cases(tmp_path / "tilted")
    with pytest.raises(PatientError, match=r"SYN-001: CT rejected: .*gantry tilt or sheared stack"):
        read_case(case)
    status = pm.main(["--input", str(tmp_path / "tilted"), "--checkpoint", str(tiny_checkpoint),
                      "--output", str(tmp_path / "out"), "--precision", "float32"])
    assert status == 1 and not (tmp_path / "out" / "SYN-001_labels.nii.gz").exists()


def test_ct_with_a_missing_slice_fails_and_says_what_to_do(synthetic_cohort, tiny_checkpoint, tmp_path):
    raw_dir, _, cohort = synthetic_cohort
    files = _copy_ct(raw_dir, cohort[0], tmp_path / "gap" / "ct")
    files[len(files) // 2].unlink()
    (result,) = pm.run(input_path=tmp_path / "gap", checkpoint=tiny_checkpoint, output_dir=tmp_path / "out")
    assert result.status == FAILED
    assert "missing slices" in result.message and "give the NIfTI as --input" in result.message


# --------------------------------------------------------------------------------------------
# The benchmark script runs (not timed: it only has to work and write its report)
# --------------------------------------------------------------------------------------------
def test_inference_benchmark_runs_and_writes_json(synthetic_cohort, tmp_path, capsys):
    import importlib.util
    import json
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_inference.py"
    spec = importlib.util.spec_from_file_location("bench_inference", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    try:
        spec.loader.exec_module(bench)
        raw_dir, _, cohort = synthetic_cohort
        trained = save_checkpoint(tmp_path / "other.pth", seed=2)
        output = tmp_path / "bench.json"
        assert bench.main(["--input", str(raw_dir / cohort[0]["patient_id"]), "--base-channels", "2",
                           "--size", str(TINY_SIZE), "--batch-size", "12", "--dice-checkpoint", str(trained), "--output", str(output)]) == 0
    finally:
        sys.modules.pop(spec.name, None)
    report = json.loads(output.read_text())
    assert [(r["precision"], r["channels_last"], r["batch_size"]) for r in report["runs"]] == [
        ("float32", False, 12), ("bfloat16", True, 12)]
    assert report["parameters"] == 30_736 and report["runs"][0]["outputs_from"] == "prediction"
    assert set(report["runs"][0]["seconds"]) == set(bench.BENCH_STAGES)
    check = report["trained_network_precision_check"]
    assert set(check["dice_bfloat16_vs_float32"]) <= {s.key for s in organs.STRUCTURES[1:]}
    assert all(0 <= d <= 1 for d in check["dice_bfloat16_vs_float32"].values())
    table = capsys.readouterr().out
    assert "bfloat16+CL (bs 12)" in table and "rtstruct" in table and "Dice bfloat16 vs float32" in table



def test_ras_nifti_is_segmented_in_the_training_orientation(cohort_prediction, tiny_checkpoint, tmp_path):
    """A NIfTI stored RAS (as dcm2niix writes it) is predicted in phase 2's voxel order and its
    labels come back on the input's own grid: the same labels as from the DICOM, flipped."""
    _, out, raw_dir, _, cohort = cohort_prediction
    from thoracic_seg.dicom_ct import read_ct_series

    record = cohort[2]
    ct = read_ct_series(sorted((raw_dir / record["ct_folder"]).glob("*.dcm")))
    ras = sitk.DICOMOrient(ct.image, "RAS")
    nifti = tmp_path / "ras.nii.gz"
    sitk.WriteImage(ras, str(nifti))
    (result,) = pm.run(input_path=nifti, checkpoint=tiny_checkpoint, output_dir=tmp_path / "out")
    assert result.status == DONE and "stored RAS, predicted in LPS" in result.message
    from_nifti, image = _labels(tmp_path / "out" / f"{result.patient_id}_labels.nii.gz")
    assert same_geometry(image, ras)
    from_dicom, _ = _labels(out / f"{record['patient_id']}_labels.nii.gz")
    assert np.array_equal(from_nifti, from_dicom[:, ::-1, ::-1])  # RAS flips rows and columns
    assert from_dicom.any() and not np.array_equal(from_nifti, from_dicom)


# --------------------------------------------------------------------------------------------
# The PTV: grown from the predicted GTV by the run's margin, its own overlapping ROI
# --------------------------------------------------------------------------------------------
DERIVED_10MM = {"source": "derived", "margin_mm": 10.0}


def test_fold_derived_ptv_hand_values():
    probabilities = torch.tensor([0.1, 0.05, 0.5, 0.2, 0.05, 0.04, 0.03, 0.03]).reshape(1, 8, 1, 1)
    folded = fold_derived_ptv(probabilities, DERIVED_10MM)
    assert folded[0, :, 0, 0].tolist() == pytest.approx([0.6, 0.05, 0.0, 0.2, 0.05, 0.04, 0.03, 0.03])
    assert fold_derived_ptv(probabilities, {"source": "contoured"}) is probabilities
    assert probabilities[0, 2, 0, 0] == pytest.approx(0.5)  # the input is not modified


@pytest.mark.parametrize("record, margin, expected", [
    ({}, 10, DERIVED_10MM),                                   # an earlier version's, with --ptv-margin-mm
    ({"ptv": DERIVED_10MM}, None, DERIVED_10MM),
    ({"ptv": DERIVED_10MM}, 5, {"source": "derived", "margin_mm": 5.0}),
    ({"ptv": {"source": "contoured"}}, 0, {"source": "derived", "margin_mm": 0.0}),
])
def test_checkpoint_ptv(record, margin, expected):
    assert checkpoint_ptv(record, margin) == expected


def test_checkpoint_ptv_refuses_a_negative_margin():
    with pytest.raises(ValueError, match="PTV margin must be a finite number >= 0 mm, got -1"):
        checkpoint_ptv({}, -1)


def test_a_checkpoint_without_ptv_information_is_refused_with_what_to_do(tmp_path):
    checkpoint = save_checkpoint(tmp_path / "old.pth")
    record = torch.load(checkpoint, weights_only=True)
    del record["ptv"]
    torch.save(record, checkpoint)
    with pytest.raises(CheckpointError, match=r"old.pth: the checkpoint does not say how its PTV is made \(ptv None: "
                                              r".*give --ptv-margin-mm MM .*or train again with this version"):
        Predictor.load(checkpoint, device="cpu")
    assert Predictor.load(checkpoint, device="cpu", ptv_margin_mm=10).ptv == DERIVED_10MM


def lookup_predictor(case: "pm.Case", truth: np.ndarray, size: int, ptv: dict) -> "pm.Predictor":
    """A Predictor whose network answers ``truth`` (resized to the network grid as phase 3 does)."""
    from thoracic_seg.grid import resize_labels_to_shape

    predictor = Predictor(torch.nn.Identity(), Path("lookup.pth"), torch.device("cpu"), precision.FLOAT32,
                             batch_size=8, window=(-1000.0, 400.0), size=size, ptv=dict(ptv))
    inputs = predictor.preprocess(sitk.GetArrayFromImage(read_case(case).image))
    predictor.model = _LookupModel(inputs, resize_labels_to_shape(truth, (size, size)))
    return predictor


@pytest.fixture(scope="module")
def derived_prediction(synthetic_cohort, tmp_path_factory):
    """One synthetic patient segmented by a derived-PTV (10 mm) model answering its true labels."""
    raw_dir, truth_dir, cohort = synthetic_cohort
    out = tmp_path_factory.mktemp("derived")
    record = cohort[0]
    (case,) = find_cases(raw_dir / record["patient_id"])
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(truth_dir / record["truth_file"])))
    result = pm.predict_case(case, lookup_predictor(case, truth, TINY_SIZE, DERIVED_10MM), out)
    return result, out, raw_dir, record


def test_derived_ptv_is_the_grown_gtv_written_beside_the_label_map(derived_prediction):
    result, out, _, record = derived_prediction
    pid = record["patient_id"]
    assert result.status == DONE
    labels, image = _labels(out / f"{pid}_labels.nii.gz")
    ptv, ptv_image = _labels(out / f"{pid}_PTV.nii.gz")
    assert same_geometry(ptv_image, image) and ptv_image.GetPixelID() == sitk.sitkUInt8
    assert (labels == organs.GTV).sum() > 50 and organs.PTV not in np.unique(labels)  # label 2 folded away
    expected = ptv_from_gtv(labels == organs.GTV, image.GetSpacing()[::-1], 10.0)
    assert np.array_equal(ptv.astype(bool), expected) and set(np.unique(ptv)) == {0, 1}
    with open(out / f"{pid}_volumes.csv", newline="") as handle:
        row = next(r for r in csv.DictReader(handle) if r["structure"] == "ptv")
    assert (row["labels"], int(row["voxels"])) == ("GTV + 10 mm", int(expected.sum()))


def test_derived_ptv_is_its_own_rtstruct_roi_overlapping_the_lungs(derived_prediction):
    """Phase 2.5's reader gives the PTV ROI back voxel for voxel; the lung ROIs are the label map's
    lungs, whole, so the PTV overlaps them (real contours overlap)."""
    from thoracic_seg.rtstruct_read import masks_from_rtstruct

    result, out, _, record = derived_prediction
    pid = record["patient_id"]
    labels, image = _labels(out / f"{pid}_labels.nii.gz")
    ptv, _ = _labels(out / f"{pid}_PTV.nii.gz")
    back = masks_from_rtstruct(out / f"{pid}_RTSTRUCT.dcm", image)
    assert np.array_equal(back["zPTV^Auto"], ptv.astype(bool))
    lungs = back["zLung_R^Auto"] | back["zLung_L^Auto"]
    assert np.array_equal(lungs, np.isin(labels, (organs.RIGHT_LUNG, organs.LEFT_LUNG)))
    assert (back["zPTV^Auto"] & lungs).any() and not (back["zGTV^Auto"] & ~back["zPTV^Auto"]).any()
    ds = pydicom.dcmread(out / f"{pid}_RTSTRUCT.dcm")
    (description,) = [r.ROIDescription for r in ds.StructureSetROISequence if r.ROIName == "zPTV^Auto"]
    verdict = result.info["qa"][organs.PTV].verdict  # grown from the GTV: ok, or flagged with it
    assert verdict in ("QA ok", "QA flagged: grown from the automatic GTV, which is flagged "
                                f"({', '.join(result.info['qa'][organs.GTV].codes)})")
    assert description.startswith("Automatic PTV (not reviewed): the automatic GTV zGTV^Auto by U-Net lookup.pth, "
                                  f"grown by a 10 mm margin (isotropic, 3D). {verdict}.")


def test_ptv_margin_on_the_command_line_overrides_the_run(synthetic_cohort, tmp_path, capsys):
    checkpoint = save_checkpoint(tmp_path / "derived.pth", ptv=DERIVED_10MM)
    assert Predictor.load(checkpoint, device="cpu").ptv == DERIVED_10MM
    assert Predictor.load(checkpoint, device="cpu", ptv_margin_mm=4).ptv == {"source": "derived", "margin_mm": 4.0}
    assert "PTV = GTV + 4 mm" in Predictor.load(checkpoint, device="cpu", ptv_margin_mm=4).describe()
    with pytest.raises(SystemExit):
        pm.main(["--input", str(synthetic_cohort[0]), "--checkpoint", str(checkpoint), "--output", str(tmp_path),
                 "--ptv-margin-mm", "-1"])
    assert "PTV margin must be a finite number >= 0 mm, got -1.0" in capsys.readouterr().err


class _LookupModel(torch.nn.Module):
    """Confident logits of a known label map for each (exactly known) network input slice."""

    def __init__(self, inputs: np.ndarray, labels: np.ndarray):
        super().__init__()
        self.inputs, self.labels = inputs, labels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x[:, 0].numpy()
        index = np.abs(images[:, None] - self.inputs[None]).sum(axis=(2, 3)).argmin(axis=1)
        one_hot = np.moveaxis(np.eye(organs.NUM_CLASSES, dtype=np.float32)[self.labels[index]], -1, 1)
        return 20.0 * torch.from_numpy(one_hot)


@pytest.mark.real_data
@pytest.mark.slow
def test_real_patient_rtstruct_ptv_overlaps_the_lung_and_contains_the_gtv(real_sample_root, reference_json,
                                                                          reference_masks_dir, tmp_path):
    """LUNG1-005 segmented by a model that answers plastimatch's reference labels (resized to the
    network grid as phase 3 does): the RTSTRUCT, read back by rt-utils (an independent reader),
    holds a PTV ROI that overlaps the right lung's ROI and contains the GTV's."""
    from thoracic_seg import rtstruct_write as rx

    pid = "LUNG1-005"
    ct_folder = real_sample_root / reference_json[pid]["ct_series_folder"]
    shape = tuple(reference_json[pid]["shape_zyx"])
    truth = np.zeros(shape, np.uint8)
    for label in reversed(organs.PRIORITY):
        for path in sorted((reference_masks_dir / pid).glob("*.nii.gz")):
            if organs.match_roi_name(path.name[: -len(".nii.gz")]) == label:
                truth[sitk.GetArrayFromImage(sitk.ReadImage(str(path))) > 0] = label
    (case,) = find_cases(real_sample_root / pid)
    result = pm.predict_case(case, lookup_predictor(case, truth, 256, DERIVED_10MM), tmp_path)
    assert result.status == DONE, result.message
    labels, _ = _labels(tmp_path / f"{pid}_labels.nii.gz")
    assert organs.PTV not in np.unique(labels) and (labels == organs.GTV).sum() > 1000

    from rt_utils import RTStructBuilder

    rt = RTStructBuilder.create_from(dicom_series_path=str(ct_folder),
                                     rt_struct_path=str(tmp_path / f"{pid}_RTSTRUCT.dcm"))
    assert {"zGTV^Auto", "zPTV^Auto", "zLung_R^Auto", "zLung_L^Auto"} <= set(rt.get_roi_names())
    mask = {name[1:-5]: rt.get_roi_mask_by_name(name) for name in ("zGTV^Auto", "zPTV^Auto", "zLung_R^Auto")}
    assert (mask["PTV"] & mask["Lung_R"]).sum() > 1000  # the PTV lies in the right lung, as contours do
    assert not (mask["GTV"] & ~mask["PTV"]).any()
    assert mask["PTV"].sum() > 2 * mask["GTV"].sum()
    assert rx.ROI_MEMBERS[organs.PTV] == (organs.GTV, organs.PTV)


def test_context_checkpoint_feeds_neighbour_stacks_and_refuses_another_k(synthetic_cohort, tmp_path, capsys):
    torch.manual_seed(1)
    model = UNetMultiOrgan(in_channels=3, base_channels=4)
    checkpoint = tmp_path / "k1.pth"
    torch.save(build_checkpoint(model, preprocessing=PREPROCESSING, context_slices=1, epoch=0, val_loss=1.0),
               checkpoint)
    predictor = Predictor.load(checkpoint, device="cpu")
    assert predictor.context_slices == 1
    seen = []
    original = predictor.model.forward
    predictor.model.forward = lambda x: (seen.append(tuple(x.shape)), original(x))[1]
    labels = predictor.predict(np.zeros((5, TINY_SIZE, TINY_SIZE), np.float32), (TINY_SIZE, TINY_SIZE))
    assert labels.shape == (5, TINY_SIZE, TINY_SIZE) and seen[0][1] == 3
    with pytest.raises(CheckpointError, match=r"trained with 1 context slice\(s\) per side \(3 input channels\); "
                                                 r"this run asks for 0"):
        Predictor.load(checkpoint, device="cpu", context_slices=0)
    raw_dir = synthetic_cohort[0]
    with pytest.raises(SystemExit):
        pm.main(["--input", str(raw_dir), "--checkpoint", str(checkpoint), "--output", str(tmp_path / "o"),
                 "--context-slices", "2"])
    assert "this run asks for 2 (5 channels)" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Body crop (phase 3 --crop-body): the checkpoint's settings, the box of the new CT, the way back
# --------------------------------------------------------------------------------------------
CROP_10MM = {"method": "body", "threshold_hu": -500, "margin_mm": 10}


def _network_view(case: "pm.Case") -> tuple[sitk.Image, np.ndarray, str, tuple[float, float]]:
    """(stored image, HU in LPS order, stored orientation code, (spacing y, spacing x) mm in LPS)."""
    from thoracic_seg.image_grid import to_network_orientation

    image = read_case(case).image
    network, stored = to_network_orientation(image)
    spacing_x, spacing_y = network.GetSpacing()[:2]
    return image, sitk.GetArrayFromImage(network), stored, (spacing_y, spacing_x)


def test_a_crop_checkpoint_writes_labels_on_the_ct_grid_background_outside_the_body_box(synthetic_cohort, tmp_path):
    from thoracic_seg.grid import body_box, to_network_array

    raw_dir, _, cohort = synthetic_cohort
    checkpoint = save_checkpoint(tmp_path / "crop.pth", preprocessing={**PREPROCESSING, "crop": CROP_10MM})
    predictor = Predictor.load(checkpoint, device="cpu")
    assert predictor.crop == CROP_10MM and "body crop (> -500 HU, margin 10 mm)" in predictor.describe()
    pid = cohort[1]["patient_id"]
    (result,) = pm.run(input_path=raw_dir / pid, checkpoint=checkpoint, output_dir=tmp_path / "out", device="cpu")
    assert result.status == DONE, result.message
    labels, image = _labels(tmp_path / "out" / f"{pid}_labels.nii.gz")
    (case,) = find_cases(raw_dir / pid)
    ct, hu, stored, spacing_yx = _network_view(case)
    assert same_geometry(image, ct)
    y0, x0, side = body_box(hu, spacing_yx, -500, 10)    # phase 3's function, the checkpoint's settings
    assert 0 < side < 64                                   # the crop does something
    network_labels = to_network_array(labels, stored)
    inside = np.zeros(network_labels.shape[1:], bool)
    inside[max(y0, 0):y0 + side, max(x0, 0):x0 + side] = True
    assert not network_labels[:, ~inside].any() and network_labels[:, inside].any()
    np.testing.assert_array_equal(labels, segment_image(predictor, ct))


def test_a_crop_network_answering_the_truth_puts_it_back_in_place(synthetic_cohort):
    """A network that answers the true labels of the box (as phase 3 would have cached them): the
    labels come back on the CT grid through phase 3's inverse, exactly, where the truth is. At
    5.7 mm pixels the 53 px box is still shrunk to 32 px, so the lungs (about 140 px a slice) lose
    their border pixels: Dice 0.927 and 0.945, against 0.923 and 0.921 for the whole slice."""
    from thoracic_seg.grid import (
        crop_to_box, from_network_orientation, probabilities_to_ct_labels, resize_labels_to_shape,
        to_network_array,
    )

    raw_dir, truth_dir, cohort = synthetic_cohort
    record = cohort[0]
    (case,) = find_cases(raw_dir / record["patient_id"])
    ct, hu, stored, spacing_yx = _network_view(case)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(truth_dir / record["truth_file"])))
    predictor = Predictor(torch.nn.Identity(), Path("lookup.pth"), torch.device("cpu"), precision.FLOAT32,
                             batch_size=8, window=(-1000.0, 400.0), size=TINY_SIZE, crop=dict(CROP_10MM))
    box = predictor.crop_box(hu, spacing_yx)
    assert box == (5, 7, 53)
    network_truth = to_network_array(truth, stored)
    answers = resize_labels_to_shape(crop_to_box(network_truth, box), (TINY_SIZE, TINY_SIZE))
    predictor.model = _LookupModel(predictor.preprocess(hu, box), answers)
    labels = segment_image(predictor, ct)
    one_hot = np.moveaxis(np.eye(organs.NUM_CLASSES, dtype=np.float32)[answers], -1, 1)
    expected = from_network_orientation(probabilities_to_ct_labels(one_hot, hu.shape[1:], box_yx=box), stored)
    np.testing.assert_array_equal(labels, expected)
    for label in (organs.RIGHT_LUNG, organs.LEFT_LUNG):
        dice = 2 * np.sum((labels == label) & (truth == label)) / (np.sum(labels == label) + np.sum(truth == label))
        assert dice >= 0.925, (label, dice)


def test_a_checkpoint_without_crop_settings_preprocesses_as_before_and_refuses_a_box(tiny_checkpoint, synthetic_cohort):
    from thoracic_seg.grid import resize_ct_slices, window_and_zscore

    predictor = Predictor.load(tiny_checkpoint, device="cpu")
    assert "crop" not in torch.load(tiny_checkpoint, weights_only=True)["preprocessing"] and predictor.crop is None
    raw_dir, _, cohort = synthetic_cohort
    (case,) = find_cases(raw_dir / cohort[0]["patient_id"])
    _, hu, _, spacing_yx = _network_view(case)
    assert predictor.crop_box(hu, spacing_yx) is None
    np.testing.assert_array_equal(predictor.preprocess(hu), resize_ct_slices(window_and_zscore(hu)[0], TINY_SIZE))
    with pytest.raises(ValueError, match=r"tiny.pth was trained with no crop, got box_yx \(0, 0, 8\)"):
        predictor.preprocess(hu, (0, 0, 8))


def test_a_crop_checkpoint_needs_the_box_and_the_spacing(tmp_path):
    predictor = Predictor.load(save_checkpoint(tmp_path / "crop.pth", preprocessing={**PREPROCESSING, "crop": CROP_10MM}),
                                  device="cpu")
    hu = np.full((2, 40, 40), -1000, np.int16)
    hu[:, 10:30, 5:35] = 0
    with pytest.raises(ValueError, match=r"crop.pth was trained with body crop \(> -500 HU, margin 10 mm\), got box_yx None"):
        predictor.preprocess(hu)
    with pytest.raises(ValueError, match=r"crop.pth was trained with body crop .*, got box_yx None"):
        predictor.predict(np.zeros((2, TINY_SIZE, TINY_SIZE), np.float32), (40, 40))
    with pytest.raises(ValueError, match=r"crop.pth crops to the body .*: the pixel spacing \(mm\) is needed"):
        predictor.segment(hu)
    assert predictor.crop_box(hu, (2.0, 2.0)) == (0, 0, 40)   # rows 10-29, cols 5-34 + 5 px, cut at the border
    assert predictor.segment(hu, spacing_yx=(2.0, 2.0)).shape == (2, 40, 40)


def test_a_field_of_view_checkpoint_crops_every_ct_to_its_mm_and_pastes_back_past_the_edge(tmp_path):
    """A checkpoint trained with --crop-body --fov-mm 100 (phase 3's settings in its preprocessing):
    the predictor recomputes the box on each CT by grid.box_for_crop, 50 px at 2 mm and 100 px at 1 mm,
    centred on the body's centroid and past the image edge; labels outside the box are background."""
    from thoracic_seg.grid import fov_box

    fov = {"method": "fov", "threshold_hu": -500, "fov_mm": 100}
    predictor = Predictor.load(save_checkpoint(tmp_path / "fov.pth", preprocessing={**PREPROCESSING, "crop": fov}),
                               device="cpu", batch_size=2)
    assert predictor.crop == fov and "100 mm field of view on the body (> -500 HU)" in predictor.describe()
    hu = np.full((2, 40, 60), -1000, np.int16)
    hu[:, 0:20, 10:50] = np.random.default_rng(3).normal(40, 200, (2, 20, 40)).clip(-400, 400)  # rows 0-19
    assert predictor.crop_box(hu, (2.0, 2.0)) == fov_box(hu, (2.0, 2.0), 100) == (-15, 5, 50)  # centroid (9.5, 29.5)
    assert predictor.crop_box(hu, (1.0, 1.0)) == (-40, -20, 100)
    labels = predictor.segment(hu, spacing_yx=(2.0, 2.0))
    assert labels.shape == (2, 40, 60) and len(np.unique(labels)) >= 2
    assert not labels[:, 35:].any() and not labels[:, :, :5].any() and not labels[:, :, 55:].any()
    with pytest.raises(ValueError, match=r"fov.pth crops to the body \(100 mm field of view .*\): the pixel spacing"):
        predictor.segment(hu)
    bad = save_checkpoint(tmp_path / "bad.pth", preprocessing={**PREPROCESSING, "crop": {**fov, "fov_mm": 0}})
    with pytest.raises(CheckpointError, match=r"bad.pth: invalid preprocessing .*fov_mm \(the field of view\) must be"):
        Predictor.load(bad, device="cpu")


# --------------------------------------------------------------------------------------------
# The one inference function: ensembles and probabilities on the CT grid
# --------------------------------------------------------------------------------------------
def test_an_ensemble_averages_its_members_probabilities(tmp_path):
    """Two networks as one: the probabilities written are the mean of each one's, and the labels
    their argmax; one network alone is not wrapped (its outputs stay bit for bit)."""
    paths = [save_checkpoint(tmp_path / f"m{seed}.pth", seed=seed) for seed in (1, 2)]
    hu = np.random.default_rng(0).normal(0, 300, (3, 40, 40)).astype(np.float32)
    single = [Predictor.load(p, device="cpu", batch_size=2) for p in paths]
    assert not isinstance(single[0].model, inference.ProbabilityAverage)
    each = []
    for predictor in single:
        probabilities = np.empty((3, organs.NUM_CLASSES, 40, 40), np.float32)
        predictor.segment_stored(hu, "LPS", (3.0, 1.0, 1.0), probabilities=probabilities)
        each.append(probabilities)
    ensemble = Predictor.load(paths, device="cpu", batch_size=2)
    assert "m1.pth + 1 more (probabilities averaged)" in ensemble.describe()
    mean = np.empty_like(each[0])
    labels = ensemble.segment_stored(hu, "LPS", (3.0, 1.0, 1.0), probabilities=mean)
    np.testing.assert_allclose(mean, (each[0] + each[1]) / 2, atol=1e-6)
    np.testing.assert_allclose(mean.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(labels, mean.argmax(axis=1))
    assert not np.array_equal(each[0].argmax(axis=1), each[1].argmax(axis=1))  # the members disagree


def test_probabilities_follow_the_labels_back_to_a_feet_first_grid_and_a_crop_box(tmp_path):
    predictor = Predictor.load(save_checkpoint(tmp_path / "crop.pth", preprocessing={**PREPROCESSING, "crop": CROP_10MM}),
                               device="cpu", batch_size=2)
    hu = np.full((4, 40, 48), -1000.0, np.float32)
    hu[:, 8:30, 10:36] = np.random.default_rng(1).normal(40, 200, (4, 22, 26))
    probabilities = np.empty((4, organs.NUM_CLASSES, 40, 48), np.float32)
    labels = predictor.segment_stored(hu, "RPI", (3.0, 1.0, 1.0), probabilities=probabilities)
    assert labels.shape == (4, 40, 48) and len(np.unique(labels)) >= 3
    np.testing.assert_array_equal(labels, probabilities.argmax(axis=1))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    y0, x0, side = predictor.crop_box(to_network_array(hu, "RPI"), (1.0, 1.0))
    outside = np.ones((40, 48), bool)
    outside[max(y0, 0):y0 + side, max(x0, 0):x0 + side] = False
    background = to_network_array(probabilities[:, organs.BACKGROUND], "RPI")
    assert outside.any() and (background[:, outside] == 1).all()  # certain background outside the box


def test_labels_before_post_processing_follow_the_labels_back_to_a_feet_first_grid(tiny_checkpoint):
    """What the quality check needs to measure what post-processing removed: the labels of the same
    network without post-processing, in the stored order."""
    hu = np.random.default_rng(2).normal(0, 300, (6, 40, 48)).astype(np.float32)
    plain = Predictor.load(tiny_checkpoint, device="cpu", batch_size=4)
    processed = Predictor.load(tiny_checkpoint, device="cpu", batch_size=4, postprocess=True)
    before = np.empty(hu.shape, np.uint8)
    after = processed.segment_stored(hu, "RPI", (3.0, 1.0, 1.0), before_postprocess=before)
    np.testing.assert_array_equal(before, plain.segment_stored(hu, "RPI", (3.0, 1.0, 1.0)))
    changed = before != after
    assert changed.any() and (after[changed] == organs.BACKGROUND).all()


def test_ensemble_members_must_share_their_preprocessing(tmp_path):
    paths = [save_checkpoint(tmp_path / "a.pth"),
             save_checkpoint(tmp_path / "b.pth", preprocessing={**PREPROCESSING, "window": [-500, 500]})]
    with pytest.raises(inference.CheckpointError, match=r"b.pth was trained with .*only networks trained on the "
                                                          r"same preprocessing"):
        Predictor.load(paths, device="cpu")
    with pytest.raises(inference.CheckpointError, match="no checkpoint given"):
        Predictor.load([], device="cpu")


def test_main_takes_several_checkpoints(tmp_path):
    paths = [str(save_checkpoint(tmp_path / f"m{seed}.pth", seed=seed)) for seed in (1, 2)]
    image = sitk.GetImageFromArray(np.random.default_rng(2).normal(0, 300, (3, 40, 40)).astype(np.int16))
    sitk.WriteImage(image, str(tmp_path / "CT-1.nii.gz"))
    assert pm.main(["--input", str(tmp_path / "CT-1.nii.gz"), "--checkpoint", *paths, "--output",
                    str(tmp_path / "out"), "--device", "cpu", "--batch-size", "2"]) == 0
    assert (tmp_path / "out" / "CT-1_labels.nii.gz").is_file()


@pytest.mark.parametrize("direction, code", [
    ((1, 0, 0, 0, 0, 1, 0, -1, 0), "LIP"),   # coronal: slices run posterior
    ((0, 0, 1, 1, 0, 0, 0, 1, 0), "PSL"),    # sagittal: slices run towards the patient's left
])
def test_a_non_axial_nifti_is_refused_naming_its_orientation(tmp_path, tiny_checkpoint, direction, code):
    image = sitk.GetImageFromArray(np.random.default_rng(3).normal(0, 300, (5, 40, 40)).astype(np.int16))
    image.SetDirection(direction)
    sitk.WriteImage(image, str(tmp_path / "SIDE.nii.gz"))
    [result] = pm.run(input_path=tmp_path / "SIDE.nii.gz", checkpoint=tiny_checkpoint, output_dir=tmp_path / "out",
                      device="cpu")
    assert result.status == FAILED
    assert result.message == (f"SIDE: not an axial CT: its slices run along {code[2]} (stored {code}; axial slices "
                              "run S/I); resample it to axial slices first")
    assert not (tmp_path / "out" / "SIDE_labels.nii.gz").exists()
