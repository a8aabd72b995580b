"""``lisplugin send``: push DICOM files and plain microscope captures to a Storage SCP.

DICOM files go as they are (their own transfer syntax, element values unchanged). JPEG and
PNG captures from microscopes without a DICOM interface are wrapped as VL Microscopic Image
instances: a baseline JPEG keeps its compressed bytes (no second lossy generation), anything
else is stored as uncompressed RGB. All captures wrapped by one ``send`` call share one study
and series.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    VLMicroscopicImageStorage,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context

from lisplugin.dicom.decode import UnusableInstance, field_from_image_file
from lisplugin.dicom.sop import UNCOMPRESSED_TRANSFER_SYNTAXES

log = logging.getLogger(__name__)

DEFAULT_CALLING_AET = "LISPLUGIN_SCU"
#: Image formats wrapped as VL Microscopic Image (by content, not by file name).
WRAPPED_FORMATS = frozenset({"JPEG", "PNG"})
#: A requestor may propose at most 128 presentation contexts in one association.
MAX_CONTEXTS = 128
#: SNOMED CT "Microscope slide", the container of a blood smear.
_SLIDE = ("433466003", "SCT", "Microscope slide")


@dataclass(frozen=True)
class SendResult:
    """What happened to one file: the C-STORE status, or None when nothing was sent."""

    path: Path
    status: int | None
    comment: str = ""

    @property
    def ok(self) -> bool:
        """Success or one of the storage warnings (0xB000, 0xB006, 0xB007)."""
        return self.status is not None and (self.status == 0 or self.status & 0xF000 == 0xB000)


@dataclass(frozen=True)
class _Item:
    """A file ready to send: a DICOM file's path or a wrapped capture's data set."""

    path: Path
    payload: Path | Dataset
    sop_class: UID
    syntax: UID


@dataclass(frozen=True)
class _JpegFrame:
    """The facts of a JPEG stream that decide how it can be encapsulated."""

    marker: int  # SOFn marker, 0xC0 = baseline
    precision: int
    components: tuple[tuple[int, int, int], ...]  # (id, horizontal, vertical sampling)
    adobe_transform: int | None
    jfif: bool


def wrap_image_as_vl_microscopic(
    path: Path | str,
    *,
    patient_id: str = "",
    accession: str = "",
    study_uid: str | None = None,
    series_uid: str | None = None,
    instance_number: int = 1,
) -> Dataset:
    """A JPEG or PNG capture as a VL Microscopic Image instance of a blood-smear slide."""
    path = Path(path)
    data = path.read_bytes()
    ds = _vl_microscopic_header(
        path, patient_id, accession, study_uid or generate_uid(), series_uid or generate_uid()
    )
    ds.InstanceNumber = instance_number
    frame = _jpeg_frame(data)
    photometric = _baseline_photometric(frame) if frame is not None else None
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):  # trailer after EOI: receivers refuse
        photometric = None
    if frame is not None and photometric is not None:
        ds.SamplesPerPixel = len(frame.components)
        ds.PhotometricInterpretation = photometric
        with Image.open(path) as image:
            ds.Columns, ds.Rows = image.size
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        if ds.SamplesPerPixel == 3:
            ds.PlanarConfiguration = 0
        ds.PixelData = encapsulate([data])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True  # encapsulated: required by PS3.5 A.4
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        uncompressed = ds.Rows * ds.Columns * ds.SamplesPerPixel
        _mark_lossy(ds, f"{uncompressed / len(data):.2f}")
    else:
        field = field_from_image_file(path)
        ds.set_pixel_data(field.image, "RGB", 8, generate_instance_uid=False)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        if frame is not None:  # a decoded non-baseline JPEG: stored losslessly, lossy before
            _mark_lossy(ds, None)
        else:
            ds.LossyImageCompression = "00"
    return ds


def send(
    paths: Iterable[Path | str],
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str = DEFAULT_CALLING_AET,
    *,
    patient_id: str = "",
    accession: str = "",
) -> list[SendResult]:
    """C-STORE every DICOM/JPEG/PNG file in ``paths`` (folders walked) over one association.

    Results come in the order of the files; ``patient_id`` and ``accession`` only go into
    wrapped JPEG/PNG captures (DICOM files already carry theirs).
    """
    study_uid, series_uid = generate_uid(), generate_uid()
    prepared: list[_Item | SendResult] = []
    wrapped = 0
    for path, explicit in _files(paths):
        kind = _kind(path)
        try:
            if kind == "dicom":
                meta = read_file_meta_info(path)
                sop_class, syntax = meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID
                prepared.append(_Item(path, path, UID(sop_class), UID(syntax)))
            elif kind == "image":
                wrapped += 1
                ds = wrap_image_as_vl_microscopic(
                    path,
                    patient_id=patient_id,
                    accession=accession,
                    study_uid=study_uid,
                    series_uid=series_uid,
                    instance_number=wrapped,
                )
                prepared.append(_Item(path, ds, ds.SOPClassUID, ds.file_meta.TransferSyntaxUID))
            elif explicit:
                prepared.append(SendResult(path, None, "not a DICOM, JPEG or PNG file"))
            else:
                log.debug("skipping %s: not a DICOM, JPEG or PNG file", path)
        except (OSError, AttributeError, InvalidDicomError, UnusableInstance) as exc:
            prepared.append(SendResult(path, None, f"unreadable: {exc}"))
    items = [item for item in prepared if isinstance(item, _Item)]
    if not items:
        return [item for item in prepared if isinstance(item, SendResult)]

    ae = AE(ae_title=calling_aet)
    contexts = _contexts((item.sop_class, item.syntax) for item in items)
    assoc = ae.associate(host, port, contexts=contexts, ae_title=called_aet)
    if not assoc.is_established:
        reason = "association rejected" if assoc.is_rejected else "association failed"
        return [
            SendResult(item.path, None, reason) if isinstance(item, _Item) else item
            for item in prepared
        ]
    try:
        return [_store_one(assoc, item) if isinstance(item, _Item) else item for item in prepared]
    finally:
        if assoc.is_established:
            assoc.release()


def cli(argv: list[str]) -> int:
    """``lisplugin send PATH... --host H --port P [--aet AE] [--accession A] [--patient-id P]``."""
    parser = argparse.ArgumentParser(
        prog="lisplugin send",
        description="C-STORE DICOM files as they are; JPEG/PNG captures are wrapped as "
        "VL Microscopic Image instances of one new study.",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="files or folders (walked)")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--aet", default="LISPLUGIN", help="called AE title (default LISPLUGIN)")
    parser.add_argument("--calling-aet", default=DEFAULT_CALLING_AET)
    parser.add_argument("--accession", default="", help="Accession Number of wrapped images")
    parser.add_argument("--patient-id", default="", help="Patient ID of wrapped images")
    args = parser.parse_args(argv)
    results = send(
        args.paths,
        args.host,
        args.port,
        args.aet,
        args.calling_aet,
        patient_id=args.patient_id,
        accession=args.accession,
    )
    for result in results:
        status = "-" if result.status is None else f"0x{result.status:04X}"
        print(f"{status}\t{result.path}\t{result.comment}".rstrip())
    failed = sum(not r.ok for r in results)
    print(f"{len(results) - failed} stored, {failed} failed")
    return 1 if failed or not results else 0


def _store_one(assoc: Association, item: _Item) -> SendResult:
    """One C-STORE. pydicom keeps the elements' encoded values, so a file read and sent in its
    own syntax goes unchanged; a native one is converted only if its syntax was refused."""
    if not any(cx.abstract_syntax == item.sop_class for cx in assoc.accepted_contexts):
        return SendResult(item.path, None, "SOP class not accepted by the peer")
    if not assoc.is_established:
        return SendResult(item.path, None, "association lost")
    try:
        payload = item.payload
        status = assoc.send_c_store(payload if isinstance(payload, Dataset) else dcmread(payload))
    except (OSError, ValueError, AttributeError, InvalidDicomError) as exc:
        return SendResult(item.path, None, f"not sent: {exc}")  # unreadable or no context
    if "Status" not in status:
        return SendResult(item.path, None, "no response (association lost)")
    comment = str(status.get("ErrorComment", "") or "")
    return SendResult(item.path, int(status.Status), comment)


def _contexts(pairs: Iterable[tuple[UID, UID]]) -> list[PresentationContext]:
    """One context per (SOP class, syntax); native syntaxes may fall back to the others."""
    wanted: dict[UID, list[UID]] = {}
    for sop_class, syntax in pairs:
        options = [syntax]
        if not syntax.is_compressed:
            options += [s for s in UNCOMPRESSED_TRANSFER_SYNTAXES if s != syntax]
        for option in options:
            if option not in wanted.setdefault(sop_class, []):
                wanted[sop_class].append(option)
    contexts = [
        build_context(sop_class, [syntax])
        for sop_class, syntaxes in wanted.items()
        for syntax in syntaxes
    ]
    if len(contexts) > MAX_CONTEXTS:
        raise ValueError(
            f"{len(contexts)} SOP class/transfer syntax pairs, one association allows "
            f"{MAX_CONTEXTS}: send fewer kinds of file at once"
        )
    return contexts


def _files(paths: Iterable[Path | str]) -> Iterable[tuple[Path, bool]]:
    """Files named on the command line (explicit) and the visible files under folders."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(names):
                    if not name.startswith("."):
                        yield Path(root) / name, False
        else:
            yield path, True


def _kind(path: Path) -> str | None:
    """By content: "dicom" (Part 10 file), "image" (JPEG or PNG) or None."""
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
        if head[128:132] == b"DICM":
            return "dicom"
        with Image.open(path) as image:
            return "image" if image.format in WRAPPED_FORMATS else None
    except OSError:
        return None


def _vl_microscopic_header(
    path: Path, patient_id: str, accession: str, study_uid: str, series_uid: str
) -> Dataset:
    """Every VL Microscopic Image module attribute except Image Pixel."""
    captured = datetime.fromtimestamp(path.stat().st_mtime)
    now = datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = VLMicroscopicImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    # Patient
    ds.PatientName = ""
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    # General Study
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = now.strftime("%Y%m%d")
    ds.StudyTime = now.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.AccessionNumber = accession
    # General Series
    ds.Modality = "GM"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    # General Equipment: the camera is unknown, the converting software is not.
    ds.Manufacturer = ""
    ds.SoftwareVersions = f"lisplugin {importlib.metadata.version('lisplugin')}"
    # General Image and VL Image
    ds.PatientOrientation = ""
    ds.ContentDate = captured.strftime("%Y%m%d")
    ds.ContentTime = captured.strftime("%H%M%S")
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    # Acquisition Context
    ds.AcquisitionContextSequence = []
    # Specimen: the slide is identified by the accession number when there is one.
    slide_id = accession or path.stem
    ds.ContainerIdentifier = slide_id
    ds.IssuerOfTheContainerIdentifierSequence = []
    ds.ContainerTypeCodeSequence = [_code(*_SLIDE)]
    specimen = Dataset()
    specimen.SpecimenIdentifier = slide_id
    specimen.SpecimenUID = generate_uid()
    specimen.IssuerOfTheSpecimenIdentifierSequence = []
    specimen.SpecimenPreparationSequence = []
    ds.SpecimenDescriptionSequence = [specimen]
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue = value
    code.CodingSchemeDesignator = scheme
    code.CodeMeaning = meaning
    return code


def _mark_lossy(ds: Dataset, ratio: str | None) -> None:
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = ["ISO_10918_1"]
    if ratio is not None:
        ds.LossyImageCompressionRatio = [ratio]


def _jpeg_frame(data: bytes) -> _JpegFrame | None:
    """Walk the JPEG markers up to the frame header; None when ``data`` is not a JPEG."""
    if data[:2] != b"\xff\xd8":
        return None
    position, adobe, jfif = 2, None, False
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        segment = data[position + 4 : position + 2 + length]
        if marker == 0xE0 and segment.startswith(b"JFIF\x00"):
            jfif = True
        elif marker == 0xEE and segment.startswith(b"Adobe") and len(segment) >= 12:
            adobe = segment[11]
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and len(segment) >= 6:
            count = segment[5]
            components = tuple(
                (segment[6 + 3 * i], segment[7 + 3 * i] >> 4, segment[7 + 3 * i] & 0x0F)
                for i in range(count)
                if len(segment) >= 9 + 3 * i
            )
            return _JpegFrame(marker, segment[0], components, adobe, jfif)
        position += 2 + length
    return None


def _baseline_photometric(frame: _JpegFrame) -> str | None:
    """The Photometric Interpretation of a baseline JPEG kept as it is, or None to decode it.

    Only process 1 (SOF0, 8 bit) fits JPEG Baseline; the VL Image module allows RGB and
    YBR_FULL_422 (chroma subsampled) for colour, so a non-subsampled YCbCr stream is decoded.
    """
    if frame.marker != 0xC0 or frame.precision != 8:
        return None
    if len(frame.components) == 1:
        return "MONOCHROME2"
    if len(frame.components) != 3:
        return None
    ids = tuple(c[0] for c in frame.components)
    if frame.adobe_transform == 0 or (
        frame.adobe_transform is None and not frame.jfif and ids == tuple(b"RGB")
    ):
        return "RGB"
    luma, *chroma = frame.components
    if all(c[1:] == (1, 1) for c in chroma) and luma[1:] != (1, 1):
        return "YBR_FULL_422"
    return None
