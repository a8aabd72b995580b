"""Typed stages of the analysis: capture -> fields -> cells -> specimen result.

Everything here is plain data (dataclasses and numpy arrays) so that every stage can be built
and tested alone, without sockets, SQL or model runtimes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

CellKind = Literal["RBC", "WBC", "PLT"]
CELL_KINDS: tuple[CellKind, ...] = ("RBC", "WBC", "PLT")

#: Leukocyte classes reported in the differential, in report order (PBC naming).
LEUKOCYTE_CLASSES: tuple[str, ...] = (
    "neutrophil",
    "lymphocyte",
    "monocyte",
    "eosinophil",
    "basophil",
    "ig",
    "erythroblast",
    "platelet",
)
#: Label given to a leukocyte whose calibrated top probability is under the threshold.
UNIDENTIFIED = "unidentified"


@dataclass(frozen=True)
class Field:
    """One microscope field to analyse: an RGB image and where it came from."""

    image: np.ndarray  # H x W x 3, uint8, RGB
    source: str  # e.g. "<SOPInstanceUID>#frame=3" or a file path
    pixel_spacing_um: float | None = None  # physical size of one pixel, when known


@dataclass(frozen=True)
class Detection:
    """A cell found by the cell model in one field (field pixel coordinates)."""

    kind: CellKind
    score: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    mask: np.ndarray | None = None  # bool, shape of the box (rounded), True inside the cell


@dataclass(frozen=True)
class FieldDetections:
    """What the cell model finds in one field, from one pass of the network."""

    cells: tuple[Detection, ...]
    #: The model's image-level count estimate, a cross-check of ``cells``; None when it has none.
    regressed_counts: dict[str, float] | None = None


@dataclass(frozen=True)
class FieldQuality:
    """Image-quality measures of one field and whether it passes the configured limits."""

    focus: float  # variance of the Laplacian of the grey image
    exposure: float  # mean grey level, 0..1
    clipped_fraction: float  # share of pixels at 0, plus at 255 when the field is washed out
    passed: bool
    reasons: tuple[str, ...] = ()
    #: The Laplacian's share of the fine detail (``quality.sharpness``): focus without the
    #: contrast of stain and exposure; None in results written before it was measured.
    sharpness: float | None = None


@dataclass(frozen=True)
class Cell:
    """A detected cell with its final label (leukocyte class for WBC, else its kind)."""

    field_index: int
    kind: CellKind
    label: str
    score: float  # detection score
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = None
    probabilities: dict[str, float] | None = None  # calibrated class probabilities (WBC only)


@dataclass(frozen=True)
class FieldResult:
    index: int
    source: str
    width: int
    height: int
    quality: FieldQuality
    cells: tuple[Cell, ...]
    regressed_counts: dict[str, float] | None = None  # image-level count cross-check
    #: Field -> PBC px factor taken from the specimen's other fields (``shared_scale``) when
    #: this field had no scale of its own; None when its own evidence (or none) set the crops.
    shared_scale: float | None = None
    #: The specimen's chromatin optical density (RGB) its crops were stain-normalised against
    #: (``core.crops.shared_nucleus``); None when each crop was measured on its own. Kept so
    #: that a cell cut again (review, saliency, adaptation) is classified as it was.
    stain_reference: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Flag:
    """A reason to send a result to review (a rule code and a text people can read)."""

    code: str
    text: str
    severity: Literal["info", "review", "critical"] = "review"


@dataclass(frozen=True)
class ResultValue:
    """One reportable quantity of a specimen, before LOINC coding."""

    key: str  # e.g. "neutrophil_pct", "wbc_classified"
    value: float
    units: str
    reference_low: float | None = None
    reference_high: float | None = None

    @property
    def abnormal_flag(self) -> str:
        """HL7 table 0078 flag: L, H or N (empty when there is no range)."""
        if self.reference_low is not None and self.value < self.reference_low:
            return "L"
        if self.reference_high is not None and self.value > self.reference_high:
            return "H"
        return "N" if self.reference_low is not None or self.reference_high is not None else ""


@dataclass(frozen=True)
class SpecimenResult:
    """The aggregated result of all fields of one specimen (case)."""

    counts: dict[str, int]  # "RBC", "WBC", "PLT"
    differential: dict[str, float]  # leukocyte class -> percent of classified leukocytes
    class_counts: dict[str, int]  # leukocyte class (and "unidentified") -> number of cells
    wbc_classified: int
    flags: tuple[Flag, ...]
    fields: tuple[FieldResult, ...]
    model_versions: dict[str, str] = field(default_factory=dict)

    @property
    def cells(self) -> list[Cell]:
        return [c for f in self.fields for c in f.cells]

    @property
    def needs_review(self) -> bool:
        return any(f.severity != "info" for f in self.flags)


class CellDetector(Protocol):
    """Finds RBC, WBC and platelets in a field (implemented by the ONNX runtime adapter)."""

    version: str

    def detect(self, image: np.ndarray, pixel_spacing_um: float | None = None) -> FieldDetections:
        """Cells and the count estimate of one field (the spacing, when known, tells the
        magnification)."""
        ...


class LeukocyteClassifier(Protocol):
    """Gives calibrated class probabilities for scale-normalised leukocyte crops."""

    version: str
    classes: Sequence[str]

    def classify(
        self, crops: Sequence[np.ndarray], nucleus: np.ndarray | None = None
    ) -> np.ndarray:
        """Return an (N, len(classes)) array of probabilities that sum to 1 per row.

        ``nucleus``: the chromatin density of the crops' specimen, the stain reference that
        replaces each crop's own (``core.crops.shared_nucleus``); None: each crop's own.
        """
        ...
