"""The Storage SCP over real sockets, with pynetdicom and DCMTK as the modality."""

from __future__ import annotations

import io
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import (
    SCP_AET,
    Recorder,
    c_store,
    dcmtk,
    instance,
    jpeg_instance,
    roundtrip_bytes,
    running_scp,
    save,
    smear,
)
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.uid import (
    JPEG2000,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    RLELossless,
)
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import Verification

from lisplugin.dicom.decode import UnusableInstance
from lisplugin.dicom.scp import (
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    SUCCESS,
    error_comment,
)
from lisplugin.dicom.sop import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES

PIXELS = smear()


def _native(syntax: UID) -> Callable[[], Dataset]:
    def make() -> Dataset:
        ds = instance(PIXELS)
        ds.file_meta.TransferSyntaxUID = syntax
        return ds

    return make


def _compressed(syntax: UID, photometric: str = "RGB", **options: object) -> Callable[[], Dataset]:
    def make() -> Dataset:
        ds = instance(PIXELS)
        ds.PhotometricInterpretation = photometric  # YBR_ICT/RCT: the encoder applies the MCT
        ds.compress(syntax, generate_instance_uid=False, **options)
        return roundtrip_bytes(ds)

    return make


#: transfer syntax -> (instance factory, largest mean absolute pixel error allowed)
ENCODINGS: dict[UID, tuple[Callable[[], Dataset], float]] = {
    ExplicitVRLittleEndian: (_native(ExplicitVRLittleEndian), 0.0),
    ImplicitVRLittleEndian: (_native(ImplicitVRLittleEndian), 0.0),
    DeflatedExplicitVRLittleEndian: (_native(DeflatedExplicitVRLittleEndian), 0.0),
    JPEGBaseline8Bit: (lambda: jpeg_instance(PIXELS), 3.0),
    JPEG2000Lossless: (_compressed(JPEG2000Lossless, "YBR_RCT"), 0.0),
    JPEG2000: (_compressed(JPEG2000, "YBR_ICT", j2k_cr=[8]), 3.0),
    RLELossless: (_compressed(RLELossless), 0.0),
}

#: DCMTK storescu option that proposes the transfer syntax of the file it sends.
STORESCU_PROPOSE: dict[UID, str] = {
    ExplicitVRLittleEndian: "-xe",
    ImplicitVRLittleEndian: "-xi",
    DeflatedExplicitVRLittleEndian: "-xd",
    JPEGBaseline8Bit: "-xy",
    JPEG2000Lossless: "-xv",
    JPEG2000: "-xw",
    RLELossless: "-xr",
}


@pytest.fixture(scope="module")
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def scp_port(recorder: Recorder) -> Iterator[int]:
    with running_scp(recorder) as scp:
        yield scp.port


@pytest.fixture(autouse=True)
def _reset(recorder: Recorder) -> None:
    recorder.stored.clear()
    recorder.fail_with = None


def _assert_still_serving(port: int, recorder: Recorder) -> None:
    ds = instance(PIXELS)
    assert c_store(port, ds).Status == SUCCESS
    assert recorder.stored[-1][0].SOPInstanceUID == ds.SOPInstanceUID


def test_every_supported_syntax_has_an_encoding_under_test() -> None:
    assert set(ENCODINGS) == set(TRANSFER_SYNTAXES)
    assert set(STORESCU_PROPOSE) == set(TRANSFER_SYNTAXES)


def test_c_echo_with_pynetdicom(scp_port: int) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp_port, ae_title=SCP_AET)
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == SUCCESS
    finally:
        assoc.release()


def test_c_echo_with_dcmtk(scp_port: int) -> None:
    echoscu = dcmtk("echoscu")
    if echoscu is None:
        pytest.skip("DCMTK echoscu not installed (apt-get install dcmtk)")
    run = subprocess.run(
        [echoscu, "-aec", SCP_AET, "127.0.0.1", str(scp_port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("syntax", list(ENCODINGS), ids=lambda s: s.name)
def test_each_transfer_syntax_round_trips_to_pixels(
    syntax: UID, scp_port: int, recorder: Recorder
) -> None:
    make, tolerance = ENCODINGS[syntax]
    sent = make()
    assert sent.file_meta.TransferSyntaxUID == syntax

    status = c_store(scp_port, sent)

    assert status.Status == SUCCESS, status
    _, raw, fields = recorder.stored[-1]
    kept = dcmread(io.BytesIO(raw))
    assert kept.file_meta.TransferSyntaxUID == syntax  # stored as sent, not re-encoded
    assert kept.SOPInstanceUID == sent.SOPInstanceUID
    assert kept.file_meta.SourceApplicationEntityTitle == "TESTSCU"
    if syntax.is_compressed:
        assert kept.PixelData == sent.PixelData
    assert [f.source for f in fields] == [str(sent.SOPInstanceUID)]
    image = fields[0].image
    assert image.shape == PIXELS.shape and image.dtype == np.uint8
    error = np.abs(image.astype(float) - PIXELS.astype(float)).mean()
    assert error <= tolerance


@pytest.mark.parametrize("syntax", list(STORESCU_PROPOSE), ids=lambda s: s.name)
def test_dcmtk_storescu_stores_each_syntax(
    syntax: UID, scp_port: int, recorder: Recorder, tmp_path: Path
) -> None:
    storescu = dcmtk("storescu")
    if storescu is None:
        pytest.skip("DCMTK storescu not installed (apt-get install dcmtk)")
    sent = ENCODINGS[syntax][0]()
    path = save(sent, tmp_path / "instance.dcm")

    run = subprocess.run(
        [storescu, STORESCU_PROPOSE[syntax], "-aec", SCP_AET, "127.0.0.1", str(scp_port), path],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert run.returncode == 0, run.stdout + run.stderr
    ds, _, fields = recorder.stored[-1]
    assert ds.SOPInstanceUID == sent.SOPInstanceUID
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert fields[0].image.shape == PIXELS.shape


@pytest.mark.parametrize("tool", ["dcmcjpeg", "dcmcrle"])
def test_dcmtk_encoded_files_decode(
    tool: str, scp_port: int, recorder: Recorder, tmp_path: Path
) -> None:
    """DCMTK's own JPEG Baseline and RLE encoders, not only pydicom's/Pillow's."""
    binary, storescu = dcmtk(tool), dcmtk("storescu")
    if binary is None or storescu is None:
        pytest.skip(f"DCMTK {tool}/storescu not installed (apt-get install dcmtk)")
    plain = save(instance(PIXELS), tmp_path / "plain.dcm")
    encoded = tmp_path / "encoded.dcm"
    options = ["+eb"] if tool == "dcmcjpeg" else []
    subprocess.run([binary, *options, plain, encoded], check=True, timeout=60)
    syntax = dcmread(encoded, stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert syntax == (JPEGBaseline8Bit if tool == "dcmcjpeg" else RLELossless)

    run = subprocess.run(
        [storescu, STORESCU_PROPOSE[syntax], "-aec", SCP_AET, "127.0.0.1", str(scp_port), encoded],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert run.returncode == 0, run.stdout + run.stderr
    image = recorder.stored[-1][2][0].image
    assert np.abs(image.astype(float) - PIXELS.astype(float)).mean() <= 3.0


def _no_pixel_data() -> Dataset:
    return instance(None)


def _hsv() -> Dataset:
    ds = instance(PIXELS)
    ds.PhotometricInterpretation = "HSV"
    return ds


def _garbage_jpeg() -> Dataset:
    noise = np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    return jpeg_instance(PIXELS, b"\xff\xd8" + noise + b"\xff\xd9")


def _truncated_jpeg() -> Dataset:
    buffer = io.BytesIO()
    Image.fromarray(PIXELS).save(buffer, format="JPEG")
    return jpeg_instance(PIXELS, buffer.getvalue()[: len(buffer.getvalue()) // 2])


def _no_study_uid() -> Dataset:
    ds = instance(PIXELS)
    del ds.StudyInstanceUID
    return ds


def _malformed_study_uid() -> Dataset:
    ds = instance(PIXELS)
    ds.StudyInstanceUID = "../../etc"
    return ds


BAD_INPUTS = {
    "no-pixel-data": (_no_pixel_data, CANNOT_UNDERSTAND, "no pixel data"),
    "unsupported-photometric": (_hsv, CANNOT_UNDERSTAND, "unsupported photometric HSV"),
    "corrupt-jpeg": (_garbage_jpeg, CANNOT_UNDERSTAND, "JPEG frame without a readable SOF"),
    "truncated-jpeg": (_truncated_jpeg, CANNOT_UNDERSTAND, "frame 1 truncated (no end marker)"),
    "missing-study-uid": (_no_study_uid, DATASET_DOES_NOT_MATCH_SOP_CLASS, "missing Study UID"),
    "malformed-study-uid": (
        _malformed_study_uid,
        DATASET_DOES_NOT_MATCH_SOP_CLASS,
        "malformed Study UID",
    ),
}


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_documented_status_and_server_keeps_serving(
    case: str, scp_port: int, recorder: Recorder
) -> None:
    make, expected_status, comment = BAD_INPUTS[case]

    status = c_store(scp_port, make())

    assert status.Status == expected_status
    assert status.ErrorComment.startswith(comment)
    assert len(status.ErrorComment) <= 64
    assert recorder.stored == []
    _assert_still_serving(scp_port, recorder)


@pytest.mark.parametrize(
    ("in_meta", "keyword", "value", "comment"),
    [
        (True, "MediaStorageSOPInstanceUID", "1.2.3.4", "SOP Instance UID differs from request"),
        (False, "SOPClassUID", str(CTImageStorage), "SOP Class UID differs from request"),
    ],
)
def test_request_and_data_set_must_agree(
    in_meta: bool,
    keyword: str,
    value: str,
    comment: str,
    scp_port: int,
    recorder: Recorder,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In chunked mode pynetdicom sends a file's bytes with the UIDs of its file meta."""
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    ds = instance(PIXELS)
    ds.preamble = b"\x00" * 128
    setattr(ds.file_meta if in_meta else ds, keyword, value)
    path = tmp_path / "instance.dcm"
    ds.save_as(path)  # not enforce_file_format, which would reset the meta UIDs
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ds.file_meta.MediaStorageSOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp_port, ae_title=SCP_AET)
    try:
        status = assoc.send_c_store(path)
    finally:
        assoc.release()
    assert (status.Status, status.ErrorComment) == (DATASET_DOES_NOT_MATCH_SOP_CLASS, comment)
    assert recorder.stored == []


def test_storage_failure_is_out_of_resources(scp_port: int, recorder: Recorder) -> None:
    recorder.fail_with = OSError("disk full")

    status = c_store(scp_port, instance(PIXELS))

    assert status.Status == OUT_OF_RESOURCES
    assert status.ErrorComment == "storage failed: OSError"
    recorder.fail_with = None
    _assert_still_serving(scp_port, recorder)


def test_unusable_from_callback_maps_by_kind(scp_port: int, recorder: Recorder) -> None:
    recorder.fail_with = UnusableInstance("neither accession nor study", identity=True)
    status = c_store(scp_port, instance(PIXELS))
    assert status.Status == DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert status.ErrorComment == "neither accession nor study"


def test_unsupported_sop_class_is_rejected_at_negotiation(scp_port: int, tmp_path: Path) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", scp_port, ae_title=SCP_AET)
    assert not assoc.is_established
    assert not assoc.is_rejected  # accepted then aborted: no acceptable context at all

    storescu = dcmtk("storescu")
    if storescu is None:
        return
    ct = save(instance(PIXELS, sop_class=CTImageStorage), tmp_path / "ct.dcm")
    run = subprocess.run(
        [storescu, "-aec", SCP_AET, "127.0.0.1", str(scp_port), ct],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    assert "No presentation context for: (CT)" in run.stdout + run.stderr


def test_only_supported_contexts_are_accepted(scp_port: int) -> None:
    ae = AE(ae_title="TESTSCU")
    for sop_class in (*STORAGE_SOP_CLASSES, CTImageStorage):
        ae.add_requested_context(sop_class, list(TRANSFER_SYNTAXES))
    assoc = ae.associate("127.0.0.1", scp_port, ae_title=SCP_AET)
    assert assoc.is_established
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        rejected = {cx.abstract_syntax for cx in assoc.rejected_contexts}
    finally:
        assoc.release()
    assert accepted == set(STORAGE_SOP_CLASSES)
    assert rejected == {CTImageStorage}


def test_multi_frame_instance_yields_one_field_per_frame(scp_port: int, recorder: Recorder) -> None:
    frames = np.stack([smear(seed=n) for n in range(3)])
    ds = instance(frames, sop_class=MultiFrameTrueColorSecondaryCaptureImageStorage)

    assert c_store(scp_port, ds).Status == SUCCESS

    fields = recorder.stored[-1][2]
    assert [f.source for f in fields] == [f"{ds.SOPInstanceUID}#frame={n}" for n in (1, 2, 3)]
    for field, expected in zip(fields, frames, strict=True):
        assert np.array_equal(field.image, expected)


def test_calling_ae_allow_list() -> None:
    recorder = Recorder()
    with running_scp(recorder, allowed_calling_aets=["MICROSCOPE1"]) as scp:
        ae = AE(ae_title="INTRUDER")
        ae.add_requested_context(Verification)
        refused = ae.associate("127.0.0.1", scp.port, ae_title=SCP_AET)
        assert refused.is_rejected

        assert c_store(scp.port, instance(PIXELS), calling_aet="MICROSCOPE1").Status == SUCCESS
    assert len(recorder.stored) == 1


def test_called_ae_title_is_checked() -> None:
    """Issue 10 finding 5: an association addressed to another AE title is rejected."""
    with running_scp(Recorder()) as scp:
        ae = AE(ae_title="MICROSCOPE1")
        ae.add_requested_context(Verification)
        misdirected = ae.associate("127.0.0.1", scp.port, ae_title="PACS")
        assert misdirected.is_rejected
        addressed = ae.associate("127.0.0.1", scp.port, ae_title=SCP_AET)
        assert addressed.is_established
        addressed.release()


def test_error_comment_is_a_valid_lo() -> None:
    comment = error_comment("frame 1 undecodable:\n  libjpeg \\ error " + "x" * 100)
    assert comment.startswith("frame 1 undecodable: libjpeg error x")
    assert len(comment) == 64 and "\\" not in comment and "\n" not in comment


def test_associations_wake_on_data_and_close_their_wake_sockets(
    scp_port: int, recorder: Recorder
) -> None:
    """The SCP's associations poll by waiting on their socket and queues (``dicom.reactor``):
    many C-STOREs on one association and many associations all succeed, and each association's
    wake-up socket pair is closed with it (no descriptor left behind)."""
    import os
    import time

    import pynetdicom.association

    from lisplugin.dicom import reactor

    assert isinstance(pynetdicom.association.time, reactor._ReactorClock)

    def descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    c_store(scp_port, instance(PIXELS))  # the server's threads and sockets exist already
    before = descriptors()
    datasets = [instance(PIXELS) for _ in range(40)]
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", scp_port, ae_title=SCP_AET)
    assert assoc.is_established
    try:
        assert all(assoc.send_c_store(ds).Status == SUCCESS for ds in datasets)
    finally:
        assoc.release()
    for _ in range(20):
        assert c_store(scp_port, instance(PIXELS)).Status == SUCCESS
    assert len(recorder.stored) == 1 + 40 + 20
    deadline = time.monotonic() + 10
    while descriptors() > before and time.monotonic() < deadline:
        time.sleep(0.05)  # the server's association threads finish after the release
    assert descriptors() <= before
