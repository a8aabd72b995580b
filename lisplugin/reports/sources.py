"""The stored captures of a case, as the DICOM report objects need them.

Every report object is placed in the captures' study, copies their patient and study attributes
and references them; the annotations also place cells on their pixel matrix. A field of the
result names its capture in ``source``: ``"<SOPInstanceUID>"`` for a single-frame instance,
``"<SOPInstanceUID>#frame=<n>"`` (n from 1) for a frame of a multi-frame one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import VLWholeSlideMicroscopyImageStorage, generate_uid

_SOURCE = re.compile(r"(?P<uid>[0-9.]+)(?:#frame=(?P<frame>\d+))?")

#: Type 2 attributes highdicom copies from a source image: present (possibly empty) in every
#: conformant capture, but filled in here so that a sloppy one does not break the reports.
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


@dataclass(frozen=True)
class FieldRef:
    """Where a field came from: an instance and, for multi-frame ones, its frame number."""

    sop_instance_uid: str
    frame: int | None


def parse_source(source: str) -> FieldRef:
    match = _SOURCE.fullmatch(source.strip())
    if match is None:
        raise ValueError(f"field source {source!r} does not name a DICOM instance")
    frame = match.group("frame")
    return FieldRef(match.group("uid"), int(frame) if frame else None)


def read_header(path: Path | str) -> Dataset:
    """The attributes of a stored capture without its pixel data, as report objects copy them.

    A capture without the Specimen module (e.g. a Secondary Capture from a camera) gets one
    naming the slide by the accession number (else the study), as ``lisplugin send`` names the
    slides it wraps: the reports are about that specimen, and an annotation object without
    specimen identification reads as an image of a body part of unknown laterality.
    """
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    for keyword in _TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, None)
    if "SpecimenDescriptionSequence" not in ds:
        _add_slide(ds)
    return ds


def _add_slide(ds: Dataset) -> None:
    """The smear slide as the specimen; its UID is derived so every report names the same."""
    slide_id = str(ds.get("AccessionNumber") or "") or str(ds.StudyInstanceUID)
    ds.ContainerIdentifier = slide_id
    ds.IssuerOfTheContainerIdentifierSequence = []
    ds.ContainerTypeCodeSequence = [_code(codes.SCT.MicroscopeSlide)]
    specimen = Dataset()
    specimen.SpecimenIdentifier = slide_id
    specimen.SpecimenUID = generate_uid(
        prefix=None, entropy_srcs=["lisplugin slide", str(ds.StudyInstanceUID), slide_id]
    )
    specimen.IssuerOfTheSpecimenIdentifierSequence = []
    specimen.SpecimenPreparationSequence = []
    ds.SpecimenDescriptionSequence = [specimen]


def _code(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def read_headers(paths: Iterable[Path | str]) -> dict[str, Dataset]:
    """Headers of the stored captures, by SOP Instance UID, in the order given."""
    headers: dict[str, Dataset] = {}
    for path in paths:
        ds = read_header(path)
        headers[str(ds.SOPInstanceUID)] = ds
    return headers


def fields_by_source(
    result: Mapping[str, Any], headers: Mapping[str, Dataset]
) -> dict[int, FieldRef]:
    """Field index -> capture, for the fields whose capture is among ``headers``."""
    found = {}
    for field in result.get("fields", []):
        ref = parse_source(str(field["source"]))
        if ref.sop_instance_uid in headers:
            found[int(field["index"])] = ref
    return found


def is_whole_slide(ds: Dataset) -> bool:
    return ds.SOPClassUID == VLWholeSlideMicroscopyImageStorage


def pixel_spacing_mm(ds: Dataset, frame: int | None) -> tuple[float, float] | None:
    """(row, column) spacing in mm of a frame: per-frame, shared, or Pixel Spacing itself."""
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if frame is not None and frame <= len(per_frame):
        groups.append(per_frame[frame - 1])
    groups.extend(ds.get("SharedFunctionalGroupsSequence") or [])
    for group in groups:
        for measures in group.get("PixelMeasuresSequence") or []:
            spacing = _spacing(measures.get("PixelSpacing"))
            if spacing is not None:
                return spacing
    return _spacing(ds.get("PixelSpacing"))


def _spacing(value: Any) -> tuple[float, float] | None:
    try:
        row, column = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return (row, column) if row > 0 and column > 0 else None


def frame_origin(ds: Dataset, frame: int) -> tuple[float, float]:
    """(column, row) of a whole-slide frame's top left pixel in the Total Pixel Matrix (0-based).

    TILED_FULL images give frame positions implicitly (row-major tiles, then focal planes and
    optical paths); others list them in the Plane Position (Slide) functional group.
    """
    if ds.get("DimensionOrganizationType") == "TILED_FULL":
        # row-major tiles, repeated per focal plane and optical path (PS3.3 C.8.12.4.1.3):
        # arithmetic, where walking highdicom's tile iterator to the frame costs O(frames)
        across = -(-int(ds.TotalPixelMatrixColumns) // int(ds.Columns))
        down = -(-int(ds.TotalPixelMatrixRows) // int(ds.Rows))
        planes = int(ds.get("TotalPixelMatrixFocalPlanes") or 1)
        paths = int(ds.get("NumberOfOpticalPaths") or 1)
        if not 1 <= frame <= across * down * planes * paths:
            raise ValueError(f"frame {frame} is beyond the tiles of {ds.SOPInstanceUID}")
        tile = (frame - 1) % (across * down)
        return float(tile % across * int(ds.Columns)), float(tile // across * int(ds.Rows))
    position = ds.PerFrameFunctionalGroupsSequence[frame - 1].PlanePositionSlideSequence[0]
    return (
        float(position.ColumnPositionInTotalImagePixelMatrix) - 1.0,
        float(position.RowPositionInTotalImagePixelMatrix) - 1.0,
    )
