"""Coverage-guided fuzzing (atheris) of the DICOM entry point: bytes as a C-STORE data set.

The bytes are parsed by pydicom as the SCP parses a received data set (Explicit VR Little
Endian), then go through the SCP's one ingest path (``StorageSCP.receive``: header checks,
storage in a real SQLite database and folder, or quarantine). What counts as a crash:

* ``receive`` raising, or answering anything but a known DICOM status and a text;
* a data set pydicom parses completely that ``validate_header`` refuses with anything but
  ``UnusableInstance`` (whose reason the modality gets): every refusal must say why;
* an accepted instance whose frames fail with anything but ``UnusableInstance``.

``python -m fuzz.run dicom [libFuzzer options] [corpus folder]``; ``make fuzz`` runs it
longer. Seeds: a few valid instances (``seeds()``).
"""

from __future__ import annotations

import io
import logging
import sys
import tempfile
from contextlib import suppress
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, VLMicroscopicImageStorage, generate_uid
from pynetdicom.dsutils import decode

from fuzz.corpus import fuzz
from lisplugin.config import DicomSettings, InstanceLimits
from lisplugin.dicom.decode import UnusableInstance, iter_fields, validate_header
from lisplugin.dicom.scp import StorageSCP
from lisplugin.service.ingest import InstanceStore
from lisplugin.storage.db import Database

#: Small limits: a fuzzed header that declares a huge image is refused, not allocated.
LIMITS = InstanceLimits(max_pixels_per_frame=256 * 256, max_frames=16)
#: DICOM statuses ``receive`` may answer (success, cannot understand, not matching, out of
#: resources).
STATUSES = {0x0000, 0xC000, 0xA900, 0xA700}


class Target:
    """A real ingest path on a throw-away folder and SQLite database."""

    def __init__(self, folder: Path) -> None:
        self.db = Database(f"sqlite:///{folder / 'fuzz.db'}")
        self.db.migrate()
        self.store = InstanceStore(self.db, folder, LIMITS)
        settings = DicomSettings(limits=LIMITS)
        self.scp = StorageSCP(settings, self._store, self.store.quarantine)

    def _store(self, ds: Dataset, raw: bytes) -> None:
        self.store.store(ds, raw)

    def one_input(self, data: bytes) -> None:
        try:
            ds = decode_instance(data)
            sop_class = str(ds.get("SOPClassUID", "") or "")
            sop_uid = str(ds.get("SOPInstanceUID", "") or "").strip()
            complete = _parses_completely(ds)
        except Exception:
            return  # not a data set: the SCP refuses it as undecodable, before any check
        status, comment = self.scp.receive(ds, data, "FUZZ", sop_class, sop_uid)
        if status not in STATUSES or not isinstance(comment, str):
            raise AssertionError(f"unexpected answer {status!r} {comment!r}")
        if complete:
            with suppress(UnusableInstance):
                validate_header(ds, LIMITS)
        if status == 0x0000:
            try:
                for _field in iter_fields(ds, LIMITS):
                    pass
            except UnusableInstance:
                pass


def decode_instance(data: bytes) -> Dataset:
    """The bytes as the SCP parses a data set received in Explicit VR Little Endian."""
    ds = decode(io.BytesIO(data), False, True)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _parses_completely(ds: Dataset) -> bool:
    """Every element (nested ones too) has a value pydicom can read."""
    try:
        for element in ds.iterall():
            _ = element.value
        return True
    except Exception:
        return False


def seeds() -> list[bytes]:
    """Valid instances to start from: RGB 8-bit, grey 16-bit, two frames."""
    found = []
    for photometric, samples, bits, frames in (
        ("RGB", 3, 8, 1),
        ("MONOCHROME2", 1, 16, 1),
        ("RGB", 3, 8, 2),
    ):
        ds = Dataset()
        ds.SOPClassUID = VLMicroscopicImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.AccessionNumber = "FUZZ1"
        ds.PatientID = "FUZZP"
        ds.Modality = "GM"
        shape = (frames, 8, 8, samples) if frames > 1 else (8, 8, samples)
        dtype = np.uint8 if bits == 8 else np.uint16
        pixels = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
        if samples == 1:
            pixels = pixels[..., 0]
        ds.set_pixel_data(pixels, photometric, bits, generate_instance_uid=False)
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        write_dataset(buffer, ds)
        found.append(buffer.getvalue())
    return found


def main(argv: list[str]) -> None:
    logging.disable(logging.CRITICAL)  # a line per refused input would set the pace
    with tempfile.TemporaryDirectory(prefix="fuzz-dicom-") as folder:
        fuzz(argv, Target(Path(folder)).one_input, seeds())


if __name__ == "__main__":
    main(sys.argv)
