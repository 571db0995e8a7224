"""The single source of truth for the seven structures: label values, names, colours,
overlap priority, RTSTRUCT ROI-name matching and the names of our automatic ROIs.

Every script that needs a label value, a structure name or a colour imports it from here;
nothing is re-typed elsewhere.

    >>> match_roi_name("gtv-2")
    1
    >>> match_roi_name("Poumon droit") == RIGHT_LUNG
    True
    >>> match_roi_name("Lungs-GTV") is None
    True
    >>> automatic_roi_name(GTV), match_roi_name("zGTV^Auto") is None
    ('zGTV^Auto', True)
"""
from __future__ import annotations

import operator
import re
import unicodedata
from dataclasses import dataclass
from typing import Sequence

BACKGROUND = 0
GTV = 1
PTV = 2
RIGHT_LUNG = 3
LEFT_LUNG = 4
HEART = 5
ESOPHAGUS = 6
SPINAL_CORD = 7
NUM_CLASSES = 8
FOREGROUND_LABELS: tuple[int, ...] = tuple(range(1, NUM_CLASSES))
#: Pseudo-label returned by :func:`match_roi_name` for an ROI holding both lungs
#: (``Lungs-Total``). Phase 2.5 splits it at the midline; it is never written to a label map.
BOTH_LUNGS = 34


@dataclass(frozen=True)
class Structure:
    """One structure of the label map.

    ``key`` is a stable identifier for files and columns, ``name`` is for humans,
    ``rtstruct_name`` is the TG-263 name a planning system recognises (prediction writes it marked
    as automatic: :func:`automatic_roi_name`), ``color`` is RGB in 0-255.
    """

    label: int
    key: str
    name: str
    rtstruct_name: str
    color: tuple[int, int, int]

    @property
    def color_float(self) -> tuple[float, float, float]:
        """RGB in 0-1, as matplotlib wants it."""
        return tuple(c / 255.0 for c in self.color)  # type: ignore[return-value]

    @property
    def color_hex(self) -> str:
        return "#{:02x}{:02x}{:02x}".format(*self.color)


STRUCTURES: tuple[Structure, ...] = (
    Structure(BACKGROUND, "background", "Background", "Background", (0, 0, 0)),
    Structure(GTV, "gtv", "GTV", "GTV", (255, 0, 0)),  # red
    Structure(PTV, "ptv", "PTV", "PTV", (255, 165, 0)),  # orange
    Structure(RIGHT_LUNG, "lung_right", "Right lung", "Lung_R", (0, 255, 255)),  # cyan
    Structure(LEFT_LUNG, "lung_left", "Left lung", "Lung_L", (135, 206, 250)),  # light blue
    Structure(HEART, "heart", "Heart", "Heart", (255, 0, 255)),  # magenta
    Structure(ESOPHAGUS, "esophagus", "Esophagus", "Esophagus", (255, 255, 0)),  # yellow
    Structure(SPINAL_CORD, "spinal_cord", "Spinal cord", "SpinalCord", (0, 200, 0)),  # green
)
BY_LABEL: dict[int, Structure] = {s.label: s for s in STRUCTURES}
BY_KEY: dict[str, Structure] = {s.key: s for s in STRUCTURES}
#: Who wins a voxel claimed by several structures, first wins:
#: GTV > PTV > spinal cord > esophagus > heart > lungs.
PRIORITY: tuple[int, ...] = (GTV, PTV, SPINAL_CORD, ESOPHAGUS, HEART, RIGHT_LUNG, LEFT_LUNG)
#: Label values that make up each structure when it is scored or exported: the label map holds
#: a voxel once (GTV wins over PTV), but a PTV contains its GTV, so the whole PTV is 1 + 2.
STRUCTURE_MEMBERS: dict[int, tuple[int, ...]] = {
    label: ((GTV, PTV) if label == PTV else (label,)) for label in FOREGROUND_LABELS
}


def structure(label: int) -> Structure:
    """The :class:`Structure` for a label value; ``ValueError`` for anything outside 0-7."""
    try:
        return BY_LABEL[operator.index(label)]  # ints and numpy integers, not 3.5 or "3"
    except (KeyError, TypeError):
        raise ValueError(f"unknown label {label!r}; labels are 0-{NUM_CLASSES - 1}") from None


def label_name(label: int) -> str:
    return structure(label).name


def structure_of_name(text: str) -> Structure:
    """The structure (1-7) whose key, name or RTSTRUCT name is ``text`` (case, spaces, hyphens and
    underscores ignored): ``gtv``, ``Right lung``, ``lung_right`` and ``Lung_R`` are all label 3.
    ``ValueError`` listing the keys allowed for anything else."""
    wanted = normalize_roi_name(text)
    for struct in STRUCTURES[1:]:
        if wanted in {normalize_roi_name(v) for v in (struct.key, struct.name, struct.rtstruct_name)}:
            return struct
    raise ValueError(f"unknown structure {text!r}; choose from {', '.join(s.key for s in STRUCTURES[1:])} "
                     "(or their names: GTV, Lung_R, Spinal cord...)")


def select_structures(texts: Sequence[str] | None) -> tuple[int, ...]:
    """Labels of the structures named in ``texts`` (:func:`structure_of_name`), in label order,
    each once; ``None``: all seven. ``ValueError`` for an unknown name or an empty selection."""
    if texts is None:
        return FOREGROUND_LABELS
    if isinstance(texts, str):
        texts = [texts]
    chosen = {structure_of_name(text).label for text in texts}
    if not chosen:
        raise ValueError(f"no structure chosen; choose from {', '.join(s.key for s in STRUCTURES[1:])}")
    return tuple(sorted(chosen))


def color_table(scale: float = 1.0) -> "list[tuple[float, float, float]]":
    """RGB colour per label value (index = label), multiplied by ``scale`` (1/255 for 0-1)."""
    return [tuple(c * scale for c in s.color) for s in STRUCTURES]  # type: ignore[misc]


# ---- ROI-name matching -----------------------------------------------------------------------
# Names are compared after normalisation: accents removed (ligatures œ/æ expanded), lower case,
# spaces, hyphens and underscores dropped. Other characters ("+", ".") are kept, so derived
# structures such as "Cord+5mm" never fold into an organ name.
_EXACT_ALIASES: dict[int, frozenset[str]] = {
    RIGHT_LUNG: frozenset({
        "lungright", "lungr", "rlung", "rtlung", "rightlung", "lungrt", "lungd",
        "poumond", "poumondroit", "longrechts", "longr",
    }),
    LEFT_LUNG: frozenset({
        "lungleft", "lungl", "llung", "ltlung", "leftlung", "lunglt", "lungg",
        "poumong", "poumongauche", "longlinks", "longl",
    }),
    HEART: frozenset({"heart", "coeur", "hart", "cor"}),
    ESOPHAGUS: frozenset({"esophagus", "oesophagus", "oesophage", "esophage", "slokdarm"}),
    SPINAL_CORD: frozenset({
        "spinalcord", "cord", "spinecord", "moelle", "moelleepiniere", "myelum", "ruggenmerg",
    }),
    BOTH_LUNGS: frozenset({
        "lungstotal", "lungtotal", "totallung", "totallungs", "lungs", "lungsboth", "bothlungs",
        "poumons", "longen",
    }),
}
# GTV: "gtv" followed only by letters/digits (GTV-1, gtv_10_r, GTVp, GTV primaire), unless
# what follows names another structure or an operation (Lung-Left-GTV is handled by the
# exact aliases above never matching; "GTV-PTV" or "GTV ring" are refused here).
_GTV_PATTERN = re.compile(r"gtv[a-z0-9]*")
_PTV_PATTERN = re.compile(r"ptv\d*(\d+(\.\d+)?gy)?")
_DERIVED_TOKENS = ("ptv", "ctv", "itv", "prv", "ring", "minus", "avoid", "margin", "exp",
                   "lung", "heart", "cord", "eso", "opt", "help", "auto")  # "GTV_auto": someone's automatic GTV

# ---- Our automatic ROIs ----------------------------------------------------------------------
# Prediction names each ROI "z" + its TG-263 name + "^Auto" (AAPM Report 263, 2018; docs/review.md):
# - a leading "z" marks a structure not to be used for dose evaluation and sorts it away from those
#   that are (TG-263 section 7.2, principle 15; section 4.4: prefixes against confusing such
#   structures with the ones used for evaluation), and no automatic target starts with a target type
#   ("GTV", "PTV", section 8.2, principle 1), so nothing that parses target names takes it for one;
# - "^Auto" is TG-263's custom qualifier, placed last after "^" (section 7.2, principle 12; section
#   8.2, principle 9, as in "PTV^Physician1"): it says who drew the contour;
# - at most 16 characters (section 7.2, principle 1; section 8.2, principle 10): "zSpinalCord^Auto".
# A physician who accepts a contour renames it (its TG-263 name); phase 2.5 never trains on a name
# that still carries the qualifier.
AUTOMATIC_PREFIX = "z"
AUTOMATIC_QUALIFIER = "^Auto"


def automatic_roi_name(label: int) -> str:
    """The ROI name prediction writes for a structure: ``zGTV^Auto``, ``zLung_R^Auto``..."""
    return f"{AUTOMATIC_PREFIX}{structure(label).rtstruct_name}{AUTOMATIC_QUALIFIER}"


def has_automatic_qualifier(name: str) -> bool:
    """True for a name that ends with our ``^Auto`` qualifier (any case, surrounding spaces ignored),
    with or without the leading ``z``: a contour of ours that nobody renamed."""
    return str(name).strip().lower().endswith(AUTOMATIC_QUALIFIER.lower())


def normalize_roi_name(name: str) -> str:
    """Lower case, accents and ligatures folded, spaces/hyphens/underscores removed."""
    text = str(name).replace("œ", "oe").replace("Œ", "OE").replace("æ", "ae").replace("Æ", "AE")
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return re.sub(r"[\s\-_]+", "", text.lower())


def match_roi_name(name: str) -> int | None:
    """Map an RTSTRUCT ROI name to a label value, :data:`BOTH_LUNGS`, or ``None`` (not ours).

    Unknown and derived names (``Lungs-GTV``, ``PRV Spinal Cord``, ``z_PTV_ring``...) return
    ``None``: they are reported by phase 2.5, never guessed. So do the names of our automatic ROIs
    (``zGTV^Auto``, :func:`has_automatic_qualifier`) and other automatic GTVs (``GTV_auto``).
    """
    if has_automatic_qualifier(name):
        return None
    norm = normalize_roi_name(name)
    for label, aliases in _EXACT_ALIASES.items():
        if norm in aliases:
            return label
    if _GTV_PATTERN.fullmatch(norm) and not any(t in norm[3:] for t in _DERIVED_TOKENS):
        return GTV
    if _PTV_PATTERN.fullmatch(norm):
        return PTV
    return None
