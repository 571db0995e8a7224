"""thoracic_seg/organs.py: the label table, colours, priority and the ROI-name table of issue 2."""
from __future__ import annotations

import pytest

from thoracic_seg import organs

ROI_TABLE = {
    organs.GTV: ["GTV-1", "GTV-2", "gtv-2", "gtv-3", "gtv_10_r", "gtv_supraclav", "GTV", "GTVp",
                 "GTV primaire"],
    organs.PTV: ["PTV", "PTV1", "PTV-1", "PTV_60Gy"],
    organs.RIGHT_LUNG: ["Lung-Right", "Lung_R", "LUNG_R", "Rt Lung", "POUMON D", "Poumon droit",
                        "Long rechts"],
    organs.LEFT_LUNG: ["Lung-Left", "Lung_L", "LUNG_L", "Lt Lung", "POUMON G", "Poumon gauche",
                       "Long links"],
    organs.HEART: ["Heart", "HEART", "COEUR", "Cœur", "Hart"],
    organs.ESOPHAGUS: ["Esophagus", "Oesophagus", "OESOPHAGE", "Œsophage", "Slokdarm"],
    organs.SPINAL_CORD: ["Spinal-Cord", "SpinalCord", "Spinal Cord", "MOELLE", "Moelle épinière",
                         "Myelum"],
    organs.BOTH_LUNGS: ["Lungs-Total", "Lungs", "POUMONS"],
}
MUST_NOT_MATCH = ["Lungs-GTV", "Lung-Left-GTV", "Lungs minus GTV", "PRV Spinal Cord",
                  "SpinalCord_PRV5", "Cord+5mm", "Heart_avoid", "z_PTV_ring", "PTV-GTV", "CTV",
                  "ITV", "External", "BODY", "Couch",
                  # automatic contours: ours (any case, with or without the z) and other tools' GTVs
                  "zGTV^Auto", "zPTV^Auto", "zLung_R^Auto", "zHeart^Auto", "GTV^Auto", "PTV^auto ",
                  "Heart^AUTO", "GTV_auto", "GTV-Auto"]


@pytest.mark.parametrize(
    "name,label", [(name, label) for label, names in ROI_TABLE.items() for name in names]
)
def test_roi_names_map_to_their_label(name: str, label: int) -> None:
    assert organs.match_roi_name(name) == label


@pytest.mark.parametrize("name", MUST_NOT_MATCH)
def test_derived_and_foreign_structures_are_not_ours(name: str) -> None:
    assert organs.match_roi_name(name) is None


@pytest.mark.parametrize("name", ["", "   ", "Lung", "GTV+5mm", "PTV ring", "heart2x", "Cœur-PRV"])
def test_unknown_names_are_not_guessed(name: str) -> None:
    assert organs.match_roi_name(name) is None


def test_normalisation_folds_case_accents_and_separators() -> None:
    assert organs.normalize_roi_name(" Moelle_épinière - X ") == "moelleepinierex"
    assert organs.normalize_roi_name("Œsophage") == "oesophage"


def test_label_values_and_names() -> None:
    assert [s.label for s in organs.STRUCTURES] == list(range(8))
    assert organs.NUM_CLASSES == 8
    assert [organs.label_name(i) for i in range(1, 8)] == [
        "GTV", "PTV", "Right lung", "Left lung", "Heart", "Esophagus", "Spinal cord"]
    assert [organs.structure(i).rtstruct_name for i in range(1, 8)] == [
        "GTV", "PTV", "Lung_R", "Lung_L", "Heart", "Esophagus", "SpinalCord"]
    assert organs.BOTH_LUNGS not in organs.BY_LABEL


def test_colours() -> None:
    named = {organs.GTV: (255, 0, 0), organs.PTV: (255, 165, 0), organs.RIGHT_LUNG: (0, 255, 255),
             organs.LEFT_LUNG: (135, 206, 250), organs.HEART: (255, 0, 255),
             organs.ESOPHAGUS: (255, 255, 0), organs.SPINAL_CORD: (0, 200, 0)}
    for label, rgb in named.items():
        assert organs.structure(label).color == rgb
    assert organs.structure(organs.GTV).color_hex == "#ff0000"
    assert organs.structure(organs.PTV).color_float == pytest.approx((1.0, 165 / 255, 0.0))
    assert len({s.color for s in organs.STRUCTURES}) == 8, "colours must be distinct"
    assert organs.color_table(1 / 255)[organs.HEART] == pytest.approx((1.0, 0.0, 1.0))


def test_priority_order() -> None:
    assert organs.PRIORITY == (organs.GTV, organs.PTV, organs.SPINAL_CORD, organs.ESOPHAGUS,
                               organs.HEART, organs.RIGHT_LUNG, organs.LEFT_LUNG)
    assert sorted(organs.PRIORITY) == list(organs.FOREGROUND_LABELS)


@pytest.mark.parametrize("bad", [8, -1, "heart", None, 3.5])
def test_unknown_label_is_a_clear_error(bad) -> None:
    with pytest.raises(ValueError, match="unknown label"):
        organs.structure(bad)


def test_ptv_is_scored_and_exported_with_its_gtv() -> None:
    assert organs.STRUCTURE_MEMBERS[organs.PTV] == (organs.GTV, organs.PTV)
    assert organs.STRUCTURE_MEMBERS[organs.GTV] == (organs.GTV,)
    assert sorted(organs.STRUCTURE_MEMBERS) == list(organs.FOREGROUND_LABELS)


def test_automatic_roi_names_follow_tg263_and_fit_16_characters() -> None:
    names = [organs.automatic_roi_name(label) for label in organs.FOREGROUND_LABELS]
    assert names == ["zGTV^Auto", "zPTV^Auto", "zLung_R^Auto", "zLung_L^Auto", "zHeart^Auto", "zEsophagus^Auto",
                     "zSpinalCord^Auto"]
    assert max(len(n) for n in names) == 16  # TG-263 section 7.2, principle 1
    assert len({n.lower() for n in names}) == 7  # unique without case (principle 2)
    assert all(organs.has_automatic_qualifier(n) and organs.match_roi_name(n) is None for n in names)
    assert not any(organs.has_automatic_qualifier(n) for n in ("GTV", "zPTVopt", "Automatic", "GTV_auto"))
    with pytest.raises(ValueError, match="unknown label 8"):
        organs.automatic_roi_name(8)


@pytest.mark.parametrize("texts, labels", [
    (None, organs.FOREGROUND_LABELS),
    (["gtv"], (organs.GTV,)),
    (["Lung_R", "right lung", "LUNG-RIGHT", "lung_right"], (organs.RIGHT_LUNG,)),  # key, name, ROI name
    (["Spinal cord", "heart", "GTV"], (organs.GTV, organs.HEART, organs.SPINAL_CORD)),  # label order
    ("esophagus", (organs.ESOPHAGUS,)),
])
def test_select_structures_by_key_or_name(texts, labels) -> None:
    assert organs.select_structures(texts) == labels


@pytest.mark.parametrize("texts, match", [
    (["heart", "liver"], r"unknown structure 'liver'; choose from gtv, ptv, lung_right, lung_left, heart, "
                         r"esophagus, spinal_cord"),
    (["background"], "unknown structure 'background'"),
    (["zHeart^Auto"], r"unknown structure 'zHeart\^Auto'"),
    ([], "no structure chosen; choose from gtv, ptv"),
])
def test_select_structures_refuses_unknown_names_listing_the_allowed(texts, match) -> None:
    with pytest.raises(ValueError, match=match):
        organs.select_structures(texts)
