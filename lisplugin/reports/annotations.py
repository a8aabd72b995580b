"""Every detected cell as a DICOM Microscopy Bulk Simple Annotations (ANN) object.

A pathology viewer overlays these on the captures: one annotation group per cell label (red
cells, platelets, each leukocyte class), each cell a POLYGON (its outline) with its detection
score, its class probability (leukocytes) and its area in µm² when the capture's pixel
spacing is known (the IOD codes units from CID 7181, which has no pixel unit: without a
spacing there is no area rather than an area in pixels).

Coordinates are 2D (image-relative), because microscope fields have no slide coordinates. The
IOD allows one referenced image per 2D object, so there is one object per capture - and per
frame for a multi-frame capture that is not a whole-slide image:

- single-frame capture (VL Microscopic, Secondary Capture): Pixel Origin Interpretation FRAME,
  the image referenced without a frame number (its one frame is the image);
- frame of another multi-frame capture (e.g. Multi-frame True Color SC): FRAME, with the
  frame named in Referenced Frame Number;
- VL Whole Slide Microscopy: one object per instance, VOLUME, each field's cells moved to
  their place in the Total Pixel Matrix.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from highdicom import AlgorithmIdentificationSequence
from highdicom.ann import AnnotationGroup, Measurements, MicroscopyBulkSimpleAnnotations
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from lisplugin.reports import coding
from lisplugin.reports.coding import Producer
from lisplugin.reports.sources import (
    FieldRef,
    fields_by_source,
    frame_origin,
    is_whole_slide,
    pixel_spacing_mm,
)

SERIES_NUMBER = 901
SERIES_DESCRIPTION = "lisplugin cells (ANN)"
CONTENT_LABEL = "LISPLUGIN_CELLS"

#: (SOP Instance UID, frame or None): what one annotation object refers to.
Target = tuple[str, int | None]


def build_annotations(
    result: Mapping[str, Any], headers: Mapping[str, Dataset], *, producer: Producer
) -> list[MicroscopyBulkSimpleAnnotations]:
    """One ANN object per annotated capture (or frame), all in one new series."""
    refs = fields_by_source(result, headers)
    by_target: dict[Target, list[tuple[FieldRef, Mapping[str, Any]]]] = defaultdict(list)
    for cell in result.get("cells", []):
        ref = refs.get(int(cell["field"]))
        if ref is None:
            continue
        whole_slide = is_whole_slide(headers[ref.sop_instance_uid])
        by_target[(ref.sop_instance_uid, None if whole_slide else ref.frame)].append((ref, cell))
    series_uid = generate_uid()
    algorithm = AlgorithmIdentificationSequence(
        name=coding.MANUFACTURER,
        family=codes.cid7162.ArtificialIntelligence,
        version=producer.software_version,
        parameters=dict(producer.model_versions) or None,
    )
    return [
        _annotation_object(headers[uid], frame, cells, algorithm, producer, series_uid, number)
        for number, ((uid, frame), cells) in enumerate(sorted(by_target.items(), key=_order), 1)
    ]


def _order(item: tuple[Target, list[Any]]) -> tuple[int, int]:
    """Captures in the order of their first field, frames in frame order."""
    (_, frame), cells = item
    return min(int(cell["field"]) for _, cell in cells), frame or 0


def _annotation_object(
    header: Dataset,
    frame: int | None,
    cells: Sequence[tuple[FieldRef, Mapping[str, Any]]],
    algorithm: AlgorithmIdentificationSequence,
    producer: Producer,
    series_uid: str,
    instance_number: int,
) -> MicroscopyBulkSimpleAnnotations:
    whole_slide = is_whole_slide(header)
    by_label: dict[str, list[tuple[np.ndarray, Mapping[str, Any], float | None]]] = {}
    for ref, cell in cells:
        polygon = cell_polygon(cell)
        if whole_slide and ref.frame is not None:
            polygon = polygon + np.asarray(frame_origin(header, ref.frame))
        spacing = pixel_spacing_mm(header, ref.frame)
        area_um2 = None
        if spacing is not None:
            area_um2 = polygon_area(polygon) * spacing[0] * spacing[1] * 1e6
        by_label.setdefault(str(cell["class"]), []).append((polygon, cell, area_um2))
    groups = [
        _group(number, label, by_label[label], algorithm)
        for number, label in enumerate(coding.ordered_labels(by_label), 1)
    ]
    source = copy.deepcopy(header)
    if "FrameOfReferenceUID" not in source:
        # highdicom compares the sources' frames of reference even for 2D coordinates, where
        # the IOD needs none; microscope fields (VL Microscopic, SC) have no Frame of Reference.
        source.FrameOfReferenceUID = None
    ann = MicroscopyBulkSimpleAnnotations(
        source_images=[source],
        annotation_coordinate_type="2D",
        annotation_groups=groups,
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=coding.MANUFACTURER,
        manufacturer_model_name=producer.model_name[:64],
        # a list, as pydicom wants multiple values (highdicom's hint says tuple)
        software_versions=producer.software_versions,  # type: ignore[arg-type]
        device_serial_number=producer.station,
        content_description="Cells detected and classified by lisplugin",
        content_label=CONTENT_LABEL,
        pixel_origin_interpretation="VOLUME" if whole_slide else "FRAME",
        series_description=SERIES_DESCRIPTION,
        coding_schemes=[coding.PRIVATE_SCHEME_ITEM],
    )
    if frame is not None:
        ann.ReferencedImageSequence[0].ReferencedFrameNumber = frame
    return ann


def _group(
    number: int,
    label: str,
    members: Sequence[tuple[np.ndarray, Mapping[str, Any], float | None]],
    algorithm: AlgorithmIdentificationSequence,
) -> AnnotationGroup:
    measurements = [
        Measurements(
            name=coding.DETECTION_SCORE,
            values=np.array([float(cell["score"]) for _, cell, _ in members]),
            unit=codes.UCUM.NoUnits,
        )
    ]
    probabilities = np.array([_top_probability(cell) for _, cell, _ in members])
    if not np.all(np.isnan(probabilities)):
        measurements.append(
            Measurements(
                name=coding.CLASS_PROBABILITY, values=probabilities, unit=codes.UCUM.NoUnits
            )
        )
    areas = np.array([np.nan if area is None else area for _, _, area in members])
    if not np.all(np.isnan(areas)):
        measurements.append(
            Measurements(name=codes.SCT.Area, values=areas, unit=codes.UCUM.SquareMicrometer)
        )
    kind = str(members[0][1]["kind"])
    return AnnotationGroup(
        number=number,
        uid=generate_uid(),
        label=label,
        description=f"{label} ({kind})" if label != kind else kind,
        annotated_property_category=coding.CELL_CATEGORY,
        annotated_property_type=coding.cell_type(label),
        graphic_type="POLYGON",
        graphic_data=[polygon.astype(np.float32) for polygon, _, _ in members],
        algorithm_type="AUTOMATIC",
        algorithm_identification=algorithm,
        measurements=measurements,
    )


def _top_probability(cell: Mapping[str, Any]) -> float:
    probabilities = cell.get("probabilities") or {}
    return max(probabilities.values()) if probabilities else float("nan")


def cell_polygon(cell: Mapping[str, Any]) -> np.ndarray:
    """The cell outline as (column, row) vertices, open (the IOD closes polygons itself).

    Falls back to the box corners when the outline has fewer than three distinct vertices.
    """
    points: list[tuple[float, float]] = []
    for x, y in cell.get("outline") or []:
        point = (float(x), float(y))
        if not points or point != points[-1]:
            points.append(point)
    if len(points) > 1 and points[0] == points[-1]:
        points.pop()
    if len(set(points)) < 3:
        x0, y0, x1, y1 = (float(v) for v in cell["box"])
        x1, y1 = max(x1, x0 + 1.0), max(y1, y0 + 1.0)
        points = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    return np.asarray(points, dtype=np.float64)


def polygon_area(polygon: np.ndarray) -> float:
    """Area enclosed by a polygon, in squared coordinate units (shoelace formula)."""
    x, y = polygon[:, 0], polygon[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)
