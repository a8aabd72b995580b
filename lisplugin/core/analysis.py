"""Fields to a specimen result: quality control, detection, classification, aggregation.

The denominator of the differential: every leukocyte the classifier saw, the *unidentified*
ones included. Leaving them out would raise every other share and hide how much of the count
is uncertain; with them in, the six leukocyte classes and ``unidentified`` add up to 100 %
and ``unidentified_pct`` says how much a reviewer still has to place (as CellaVision-style
pre-classification reports do). Nucleated red cells (``erythroblast``) and platelets or
platelet clumps (``platelet``) that reach the classifier are not leukocytes: they are not in
the denominator, and are reported per 100 leukocytes (the NRBC/100 WBC convention).
``wbc_classified`` is that denominator. With no leukocyte at all the differential is empty
rather than all zeros.

A field that fails quality control is measured and reported but not analysed: its cells are
not counted, since blur or bad exposure makes the classes unreliable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from lisplugin.config import AnalysisSettings
from lisplugin.core.crops import (
    CLASS_BOX_PX,
    PBC_UM_PER_PX,
    PBC_WBC_BOX_PX,
    background_colour,
    box_side,
    crop_nucleus,
    in_view,
    leukocyte_crop,
    pbc_scale,
    shared_nucleus,
    shared_scale,
    usable_spacing,
)
from lisplugin.core.quality import assess
from lisplugin.core.reference import ReferenceRanges
from lisplugin.core.rules import (
    PatientContext,
    Rule,
    evaluate_rules,
    platelet_estimate,
    report_value,
    result_key,
    typical_rbc_count,
)
from lisplugin.core.slide import TiledImage, analyse_slide
from lisplugin.core.types import (
    CELL_KINDS,
    LEUKOCYTE_CLASSES,
    UNIDENTIFIED,
    Cell,
    CellDetector,
    Detection,
    Field,
    FieldDetections,
    FieldResult,
    LeukocyteClassifier,
    ResultValue,
    SpecimenResult,
)

#: Classifier classes that are not leukocytes: reported per 100 leukocytes, not in the total.
NON_LEUKOCYTE_CLASSES: tuple[str, ...] = ("erythroblast", "platelet")
#: The classes whose shares add up to 100 %.
DIFFERENTIAL_CLASSES: tuple[str, ...] = (
    *(c for c in LEUKOCYTE_CLASSES if c not in NON_LEUKOCYTE_CLASSES),
    UNIDENTIFIED,
)
#: Fewer whole red cells than this in a field give no usable size calibration.
MIN_RBC_FOR_SCALE = 3
#: A box within this many pixels of the field edge is taken to be cut by it.
EDGE_PX = 2.0


def median_rbc_diameter(detections: Iterable[Detection], width: int, height: int) -> float | None:
    """Median red-cell diameter (longer box side) over the red cells not cut by the edge.

    The longer side, since an overlapped cell loses width in one direction only; None when too
    few whole red cells are seen for the median to mean anything.
    """
    sizes = [
        max(x1 - x0, y1 - y0)
        for d in detections
        if d.kind == "RBC" and _whole(d.box, width, height)
        for x0, y0, x1, y1 in [d.box]
    ]
    return float(np.median(sizes)) if len(sizes) >= MIN_RBC_FOR_SCALE else None


def _whole(box: tuple[float, float, float, float], width: int, height: int) -> bool:
    """Whether a box is clear of the field's edge (a cut cell would read small)."""
    x0, y0, x1, y1 = box
    return x0 > EDGE_PX and y0 > EDGE_PX and x1 < width - EDGE_PX and y1 < height - EDGE_PX


def _centre_in(
    box: tuple[float, float, float, float], region: tuple[float, float, float, float]
) -> bool:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return region[0] <= cx < region[2] and region[1] <= cy < region[3]


def field_rbc_diameter(field: Field, detections: Sequence[Detection]) -> float | None:
    """The field's median whole red-cell diameter: measured once per field, it sets both the
    scale of the crops and the scale that quality control judges focus at."""
    height, width = field.image.shape[:2]
    return median_rbc_diameter(detections, width, height)


def leukocyte_crops(
    field: Field,
    detections: Sequence[Detection],
    rbc_diameter: float | None,
    box_px: float = PBC_WBC_BOX_PX,
    shared: float | None = None,
) -> list[np.ndarray]:
    """PBC-scale crops of the field's leukocytes, in detection order: the classifier's input.

    The scale comes from the DICOM pixel spacing, else the field's own red cells, else
    ``shared`` (the scale of the specimen's or folder's images, ``shared_scale``), else the
    leukocyte box taken as ``box_px`` PBC px (``pbc_scale``); training, adaptation and the
    daemon all cut crops here.
    """
    leukocytes = [d for d in detections if d.kind == "WBC"]
    if not leukocytes:
        return []
    image = in_view(field.image)  # a circular field stop's black is not chromatin
    background = background_colour(image)  # once a field, not once a crop
    return [
        leukocyte_crop(
            image,
            d.box,
            pbc_scale(field.pixel_spacing_um, rbc_diameter, d.box, box_px, shared),
            background=background,
        )
        for d in leukocytes
    ]


def measured_spacing_um(
    field: Field,
    detections: Sequence[Detection],
    rbc_diameter: float | None,
    shared: float | None = None,
) -> float | None:
    """Physical pixel size of a field: its Pixel Spacing, else what its red cells (or the
    specimen's shared scale, or with neither its leukocytes) say; None when it shows no cells."""
    wbcs = [d.box for d in detections if d.kind == "WBC"]
    unknown = usable_spacing(field.pixel_spacing_um) is None and rbc_diameter is None
    if unknown and shared is None and not wbcs:
        return None
    boxes = wbcs or [(0.0, 0.0, 1.0, 1.0)]
    scales = [pbc_scale(field.pixel_spacing_um, rbc_diameter, box, shared=shared) for box in boxes]
    return PBC_UM_PER_PX * float(np.median(scales))


def has_own_scale(field: Field, detections: Sequence[Detection]) -> bool:
    """Whether a field's crops take their scale from the field itself: a usable Pixel Spacing
    or enough whole red cells."""
    if usable_spacing(field.pixel_spacing_um) is not None:
        return True
    return field_rbc_diameter(field, detections) is not None


def unscaled_leukocyte_sides(field: Field, detections: Sequence[Detection]) -> list[float]:
    """Box sides of the field's leukocytes when the field has no scale of its own
    (:func:`has_own_scale`): what :func:`shared_scale` pools over a specimen's or a folder's
    images. Leukocytes cut by the field's edge are left out while whole ones remain (a crop's
    neighbours at its border would read small)."""
    if has_own_scale(field, detections):
        return []
    height, width = field.image.shape[:2]
    wbcs = [d for d in detections if d.kind == "WBC"]
    whole = [d for d in wbcs if _whole(d.box, width, height)]
    chosen = whole or sorted(wbcs, key=lambda d: -d.score)[:1]
    return [box_side(d.box) for d in chosen]


def most_confident_leukocyte(
    field: Field,
    detector: CellDetector,
    label: str | None = None,
    found: FieldDetections | None = None,
    shared: float | None = None,
) -> tuple[Detection, np.ndarray] | None:
    """The leukocyte the detector is surest of, with its crop; None when it finds none.

    An image of one labelled leukocyte (a lab's class folders for ``evaluate cells`` and
    ``adapt``) may show others at its edges: the most confident detection is the labelled one.
    With its ``label`` known (training on a site of single-cell crops), a field without a
    scale is cut at that class's measured PBC size (``CLASS_BOX_PX``), so that the site's cells
    keep the sizes PBC's have; otherwise ``shared`` (the folder's scale) or 60 px. ``found``:
    the field's detections when the caller has them already.
    """
    if found is None:
        found = detector.detect(field.image, pixel_spacing_um=field.pixel_spacing_um)
    detections = found.cells
    wbcs = [d for d in detections if d.kind == "WBC"]
    if not wbcs:
        return None
    best = max(wbcs, key=lambda d: d.score)
    box_px = CLASS_BOX_PX.get(label, PBC_WBC_BOX_PX) if label else PBC_WBC_BOX_PX
    rbc = field_rbc_diameter(field, detections)
    (crop,) = leukocyte_crops(field, [best], rbc, box_px=box_px, shared=None if label else shared)
    return best, crop


def label_for(probabilities: np.ndarray, classes: Sequence[str], min_probability: float) -> str:
    top = int(np.argmax(probabilities))
    return classes[top] if probabilities[top] >= min_probability else UNIDENTIFIED


def analyse_field(
    index: int,
    field: Field,
    detector: CellDetector,
    classifier: LeukocyteClassifier,
    settings: AnalysisSettings,
    owned: tuple[float, float, float, float] | None = None,
    found: FieldDetections | None = None,
    shared_scale: float | None = None,
    nucleus: np.ndarray | None = None,
    crops: Sequence[np.ndarray] | None = None,
) -> FieldResult:
    """Detect, check and classify one field; every leukocyte of the field in one batch.

    Detection comes first because quality control needs the field's scale: focus is measured
    at one physical pixel size, and a field without a Pixel Spacing gets its scale from its own
    red cells (as the crops do), so a lab at twice BCCD's magnification is not called blurred.
    With ``owned`` (x0, y0, x1, y1) only the cells whose box centre lies in that part of the
    field are kept and classified, and only that part is quality-checked: the rest belongs to a
    neighbouring window of a whole slide. ``found``: the field's detections when the caller
    has them already; ``shared_scale``: the specimen's scale, used when the field has none of
    its own (``unscaled_leukocyte_sides``); ``nucleus``: the specimen's chromatin density, the
    stain reference of its crops (``shared_nucleus``); ``crops``: the leukocyte crops of the
    whole field, in detection order, when the caller has cut them already (not with ``owned``).
    """
    height, width = field.image.shape[:2]
    unknown = [c for c in classifier.classes if c not in LEUKOCYTE_CLASSES]
    if unknown:
        raise ValueError(f"classifier classes {unknown} are not reportable leukocyte classes")
    if found is None:
        found = detector.detect(field.image, pixel_spacing_um=field.pixel_spacing_um)
    detections = found.cells
    rbc_diameter = field_rbc_diameter(field, detections)
    if has_own_scale(field, detections):
        shared_scale = None  # the field's own evidence wins
    checked = field
    if owned is not None:  # a slide window's margins are its neighbours' to judge
        x0, y0, x1, y1 = (max(round(v), 0) for v in owned)
        checked = replace(field, image=field.image[y0:y1, x0:x1])
    spacing = measured_spacing_um(field, detections, rbc_diameter, shared_scale)
    quality = assess(checked, settings, spacing)
    reference = stain_reference(nucleus)
    if not quality.passed:
        return FieldResult(
            index,
            field.source,
            width,
            height,
            quality,
            cells=(),
            shared_scale=shared_scale,
            stain_reference=reference,
        )
    if owned is not None:
        detections = tuple(d for d in detections if _centre_in(d.box, owned))
    if crops is None:
        crops = leukocyte_crops(field, detections, rbc_diameter, shared=shared_scale)
    if reference is not None:  # classified against the reference as stored, to the digit
        nucleus = np.asarray(reference, dtype=np.float32)
    probabilities = np.asarray(classifier.classify(crops, nucleus)) if crops else np.zeros((0, 0))
    classes = list(classifier.classes)
    cells = []
    wbc_rows = iter(probabilities)
    for d in detections:
        if d.kind == "WBC":
            row = next(wbc_rows)
            label = label_for(row, classes, settings.min_class_probability)
            probs: dict[str, float] | None = {
                c: float(p) for c, p in zip(classes, row, strict=True)
            }
        else:
            label, probs = d.kind, None
        cells.append(Cell(index, d.kind, label, d.score, d.box, d.mask, probs))
    return FieldResult(
        index,
        field.source,
        width,
        height,
        quality,
        cells=tuple(cells),
        regressed_counts=found.regressed_counts,
        shared_scale=shared_scale,
        stain_reference=reference,
    )


@dataclass(frozen=True)
class Tally:
    """Counts and differential of a set of cells (see the module docstring for the semantics)."""

    counts: dict[str, int]
    class_counts: dict[str, int]
    differential: dict[str, float]
    wbc_classified: int

    def specimen(
        self, fields: Sequence[FieldResult], model_versions: Mapping[str, str]
    ) -> SpecimenResult:
        """The specimen result of these counts, before the rules add their flags."""
        return SpecimenResult(
            counts=self.counts,
            differential=self.differential,
            class_counts=self.class_counts,
            wbc_classified=self.wbc_classified,
            flags=(),
            fields=tuple(fields),
            model_versions=dict(model_versions),
        )


def tally(cells: Iterable[Cell]) -> Tally:
    """The one place cells become counts: analysis and expert review both use it."""
    counts = dict.fromkeys(CELL_KINDS, 0)
    class_counts = dict.fromkeys((*LEUKOCYTE_CLASSES, UNIDENTIFIED), 0)
    for cell in cells:
        counts[cell.kind] += 1
        if cell.kind == "WBC":
            class_counts[cell.label] += 1
    leukocytes = sum(class_counts[c] for c in DIFFERENTIAL_CLASSES)
    differential = (
        {c: 100.0 * n / leukocytes for c, n in class_counts.items()} if leukocytes else {}
    )
    return Tally(counts, class_counts, differential, leukocytes)


def aggregate(
    field_results: Sequence[FieldResult],
    settings: AnalysisSettings,
    model_versions: Mapping[str, str],
    rules: Sequence[Rule],
    ranges: ReferenceRanges | None = None,
    patient: PatientContext | None = None,
) -> SpecimenResult:
    """Counts, differential and flags of a specimen from its analysed fields.

    ``settings`` is taken for symmetry with the other stages; the rules carry their limits.
    """
    del settings  # the parsed rules already hold every limit taken from the settings
    counted = tally(c for result in field_results for c in result.cells)
    specimen = counted.specimen(field_results, model_versions)
    flags = evaluate_rules(specimen, rules, patient, ranges)
    return replace(specimen, flags=tuple(flags))


def stain_reference(nucleus: np.ndarray | None) -> tuple[float, ...] | None:
    """A specimen's chromatin reference as the result keeps it (5 decimals): what its crops
    are classified against, so that a cell cut again is classified the same."""
    return None if nucleus is None else tuple(round(float(v), 5) for v in nucleus)


def _as_array(reference: tuple[float, ...] | None) -> np.ndarray | None:
    return None if reference is None else np.asarray(reference, dtype=np.float32)


def specimen_classifier(
    classifier: LeukocyteClassifier, crops: Sequence[np.ndarray], nucleus: np.ndarray | None
) -> LeukocyteClassifier:
    """The classifier with its features normalised on the specimen's leukocytes (``crops``,
    in the analysis's order), where it can (``for_specimen``; see
    ``lisplugin.inference.specimen_norms``); else the classifier itself."""
    adapt = getattr(classifier, "for_specimen", None)
    return classifier if adapt is None else adapt(crops, nucleus)  # type: ignore[no-any-return]


def specimen_sample(classifier: LeukocyteClassifier, count: int) -> list[int]:
    """Which of a specimen's ``count`` leukocyte crops its feature statistics need."""
    sample = getattr(classifier, "specimen_sample", None)
    return [] if sample is None else list(sample(count))


@dataclass(frozen=True)
class FolderDetections:
    """A lab folder's detections, image by image (without outline masks: scores need boxes
    and labels; a tenth of the memory), and the references its images share."""

    found: list[FieldDetections]
    scale: float | None  # ``shared_scale`` of the images without a scale of their own
    nucleus: np.ndarray | None  # ``shared_nucleus``: the folder's stain reference
    #: ``specimen_classifier`` for the folder (the classifier given when it cannot adapt)
    classifier: LeukocyteClassifier | None = None


def detect_folder(
    fields: Callable[[], Iterable[Field]],
    detector: CellDetector,
    share_scale: bool = True,
    share_stain: bool = True,
    classifier: LeukocyteClassifier | None = None,
) -> FolderDetections:
    """Detect a folder of one lab's images as the fields of one specimen (``evaluate cells``,
    ``adapt --data``). ``fields`` is called once per pass (detection, then the stain
    reference and the crops the ``classifier``'s specimen statistics need), so that a large
    folder is read image by image rather than held in memory."""
    found, sides = [], []
    for field in fields():
        detected = detector.detect(field.image, pixel_spacing_um=field.pixel_spacing_um)
        found.append(replace(detected, cells=tuple(replace(d, mask=None) for d in detected.cells)))
        sides += unscaled_leukocyte_sides(field, detected.cells)
    scale = shared_scale(sides) if share_scale else None
    total = sum(1 for f in found for d in f.cells if d.kind == "WBC")
    wanted = set(specimen_sample(classifier, total)) if classifier is not None else set()
    densities, kept, index = [], [], 0
    if share_stain or wanted:
        for field, detected in zip(fields(), found, strict=True):
            for crop in _crops(field, detected, scale):
                densities.append(crop_nucleus(crop) if share_stain else None)
                if index in wanted:
                    kept.append(crop)
                index += 1
    nucleus = shared_nucleus(densities) if share_stain else None
    adapted = None
    if classifier is not None:
        adapted = specimen_classifier(classifier, kept, _as_array(stain_reference(nucleus)))
    return FolderDetections(found, scale, nucleus, adapted)


def _crops(field: Field, found: FieldDetections, shared: float | None) -> list[np.ndarray]:
    rbc = field_rbc_diameter(field, found.cells)
    return leukocyte_crops(field, found.cells, rbc, shared=shared)


def analyse_fields(
    fields: Sequence[Field | TiledImage],
    detector: CellDetector,
    classifier: LeukocyteClassifier,
    settings: AnalysisSettings,
    rules: Sequence[Rule],
    ranges: ReferenceRanges | None = None,
    patient: PatientContext | None = None,
) -> SpecimenResult:
    """Analyse every field of a specimen and aggregate them; a whole-slide level gives the
    fields of its monolayer (see :mod:`lisplugin.core.slide`).

    The fields come from one smear and one microscope: they are all detected first, then
    those without a scale of their own (no Pixel Spacing, no red cells) take the scale of
    their leukocytes together (``shared_scale``), and every crop takes the specimen's
    chromatin density as its stain reference (``shared_nucleus``). (The fields are in memory
    already; their detections and leukocyte crops are a fraction of that.)
    """
    found = {
        i: detector.detect(item.image, pixel_spacing_um=item.pixel_spacing_um)
        for i, item in enumerate(fields)
        if isinstance(item, Field)
    }
    plain = [(fields[i], detections) for i, detections in found.items()]
    shared = shared_scale(
        [side for field, d in plain for side in unscaled_leukocyte_sides(field, d.cells)]  # type: ignore[arg-type]
    )
    # cut once: they give the specimen's stain reference, then go to the classifier
    crops = {i: _crops(fields[i], d, shared) for i, d in found.items()}  # type: ignore[arg-type]
    nucleus = shared_nucleus([crop_nucleus(c) for cut in crops.values() for c in cut])
    # and they give the specimen's feature statistics, where the classifier takes them
    specimen = specimen_classifier(
        classifier,
        [c for cut in crops.values() for c in cut],
        _as_array(stain_reference(nucleus)),
    )
    results: list[FieldResult] = []
    for i, item in enumerate(fields):
        if isinstance(item, Field):
            results.append(
                analyse_field(
                    len(results),
                    item,
                    detector,
                    specimen,
                    settings,
                    found=found.pop(i),
                    shared_scale=shared,
                    nucleus=nucleus,
                    crops=crops.pop(i),
                )
            )
        else:
            results += analyse_slide(
                item, len(results), detector, classifier, settings, analyse_field
            )
    versions = {"detector": detector.version, "classifier": classifier.version}
    return aggregate(results, settings, versions, rules, ranges, patient)


#: Units of each result key, as config/loinc.yaml expects them.
UNITS = {"erythroblast_per_100wbc": "/100{WBCs}"}
#: Classes reported as absolute counts when the order carries the WBC count.
ABSOLUTE_CLASSES: tuple[str, ...] = (*(c for c in LEUKOCYTE_CLASSES if c != "platelet"),)
ABSOLUTE_UNITS = "10*9/L"
#: Result keys that come from the detector alone (the classifier has no part in them).
DETECTOR_KEYS = frozenset(
    {"rbc_counted", "wbc_counted", "plt_counted", "plt_per_field", "plt_estimate"}
)


def absolute_key(cls: str) -> str:
    """Result key (config/loinc.yaml) of a class's absolute count."""
    return f"{cls}_abs"


def result_values(
    specimen: SpecimenResult,
    ranges: ReferenceRanges | None = None,
    patient: PatientContext | None = None,
) -> list[ResultValue]:
    """The reportable quantities, shares rounded to one decimal as reported.

    Shares are left out when no leukocyte was classified; the counts are always there. With
    the analyser's WBC count (``patient.wbc_count``) each class also has its absolute count
    (share x WBC, x10^9/L); platelets per analysed field and the smear platelet estimate are
    there when enough cells were seen for them.
    """
    patient = patient or PatientContext()

    def ranged(key: str, value: float, units: str) -> ResultValue:
        """A value with the patient's reference interval for ``key``, if there is one."""
        interval = ranges.lookup(key, patient.age_years, patient.sex) if ranges else None
        return ResultValue(
            key=key,
            value=value,
            units=units,
            reference_low=interval.low if interval else None,
            reference_high=interval.high if interval else None,
        )

    values = [
        ranged(result_key(cls), report_value(share), UNITS.get(result_key(cls), "%"))
        for cls in (*LEUKOCYTE_CLASSES, UNIDENTIFIED)
        if (share := specimen.differential.get(cls)) is not None
    ]
    values.append(ResultValue("wbc_classified", float(specimen.wbc_classified), "{cells}"))
    for kind in CELL_KINDS:
        values.append(
            ResultValue(f"{kind.lower()}_counted", float(specimen.counts.get(kind, 0)), "{cells}")
        )
    if patient.wbc_count is not None:
        values += [
            ranged(absolute_key(cls), round(share / 100.0 * patient.wbc_count, 2), ABSOLUTE_UNITS)
            for cls in ABSOLUTE_CLASSES
            if (share := specimen.differential.get(cls)) is not None
        ]
    analysed = sum(1 for f in specimen.fields if f.quality.passed)
    if analysed:
        per_field = round(specimen.counts.get("PLT", 0) / analysed, 1)
        values.append(ResultValue("plt_per_field", per_field, "{cells}"))
    estimate = platelet_estimate(specimen.counts, typical_rbc_count(ranges, patient))
    if estimate is not None:
        values.append(ranged("plt_estimate", estimate, ABSOLUTE_UNITS))
    return values
