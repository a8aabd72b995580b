"""Reports of a case: DICOM SR and annotations (validated by dciodvfy, read back by highdicom),
the PDF (rendered by pdftoppm), the JSON report (validated against its schema), the PACS sender
against a real Storage SCP, and the HTTP routes."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import highdicom as hd
import jsonschema
import numpy as np
import pytest
import yaml
from daemon import free_port
from dicom_factory import dciodvfy, instance, save, smear
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.sr.codedict import codes
from pydicom.uid import (
    Comprehensive3DSRStorage,
    EncapsulatedPDFStorage,
    MicroscopyBulkSimpleAnnotationsStorage,
    VLWholeSlideMicroscopyImageStorage,
    generate_uid,
)
from pynetdicom import AE, evt
from report_factory import (
    CELLS,
    COLUMNS,
    MODELS,
    PATIENT_ID,
    ROWS,
    SPACING_MM,
    dciodvfy_errors,
    multiframe_capture,
    result_for,
    vl_capture,
)

from lisplugin.config import (
    DEFAULT_CONFIG_DIR,
    DatabaseSettings,
    PacsSettings,
    Settings,
    StorageSettings,
)
from lisplugin.core.analysis import result_values
from lisplugin.core.delivery import ReceiverUnavailable
from lisplugin.core.reference import parse_reference_ranges
from lisplugin.core.rules import PatientContext
from lisplugin.core.types import SpecimenResult
from lisplugin.dicom.decode import fields_from_dataset
from lisplugin.http.reports import router
from lisplugin.reports.annotations import build_annotations, cell_polygon, polygon_area
from lisplugin.reports.coding import CELL_TYPES, Producer, Verification
from lisplugin.reports.fonts import FontMissing, fonts
from lisplugin.reports.json_report import case_report
from lisplugin.reports.pacs import pacs_sender
from lisplugin.reports.pdf import build_encapsulated_pdf, build_pdf
from lisplugin.reports.sources import read_headers
from lisplugin.reports.sr import SPECIMEN_GROUP, build_sr, field_identifier
from lisplugin.service.outbox import OutboxWorker
from lisplugin.service.reports import write_case_reports
from lisplugin.service.runtime import Runtime
from lisplugin.storage.db import Database
from lisplugin.storage.orm import Case, OutboxMessage, OutboxStatus, PendingReport

REPO = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((REPO / "interfaces/schemas/case-report.schema.json").read_text())
LOINC = yaml.safe_load((DEFAULT_CONFIG_DIR / "loinc.yaml").read_text())
PRODUCER = Producer("LISPLUGIN", MODELS)


def _require_dciodvfy() -> None:
    if dciodvfy() is None:
        pytest.skip("dciodvfy not installed (apt-get install dicom3tools)")


def _valid(path: Path) -> None:
    _require_dciodvfy()
    assert dciodvfy_errors(path) == []


@pytest.fixture
def captures(tmp_path: Path) -> list[Path]:
    """Two VL Microscopic fields of one study, as a microscope sends them."""
    first = vl_capture(tmp_path, "field-1", seed=1)
    study = str(dcmread(first).StudyInstanceUID)
    return [first, vl_capture(tmp_path, "field-2", seed=2, study_uid=study)]


def _values(group: Any) -> dict[str, tuple[float, str]]:
    return {m.name.value: (float(m.value), m.unit.value) for m in group.get_measurements()}


def test_sr_is_valid_and_reads_back(captures: list[Path], tmp_path: Path) -> None:
    result = result_for(captures)
    headers = read_headers(captures)
    sr = build_sr(result, headers, loinc_map=LOINC, producer=PRODUCER, preliminary=True)
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    _valid(path)

    back = hd.sr.srread(path)
    source = dcmread(captures[0], stop_before_pixels=True)
    assert back.SOPClassUID == Comprehensive3DSRStorage
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.SeriesInstanceUID != source.SeriesInstanceUID
    assert (back.PatientID, back.PatientName, back.AccessionNumber) == (
        PATIENT_ID,
        source.PatientName,
        source.AccessionNumber,
    )
    assert (back.PreliminaryFlag, back.CompletionFlag, back.VerificationFlag) == (
        "PRELIMINARY",
        "COMPLETE",
        "UNVERIFIED",
    )
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in back.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == set(headers)

    report = hd.sr.MeasurementReport.from_sequence([back])
    device = report.get_observer_contexts(observer_type=codes.DCM.Device)[0]
    attributes = device.observer_identifying_attributes
    assert attributes.name == "LISPLUGIN"
    assert all(f"{n} {v}" in attributes.model_name for n, v in MODELS.items())

    results = LOINC["results"]
    groups = {g.tracking_identifier: g for g in report.get_image_measurement_groups()}
    assert set(groups) == {SPECIMEN_GROUP, field_identifier(0), field_identifier(1)}
    specimen = _values(groups[SPECIMEN_GROUP])
    assert specimen[results["rbc_counted"]["code"]] == (result["counts"]["RBC"], "{cells}")
    assert specimen[results["plt_counted"]["code"]] == (result["counts"]["PLT"], "{cells}")
    assert specimen[results["wbc_classified"]["code"]] == (result["wbc_classified"], "{cells}")
    for label, percent in result["differential"].items():
        key = "erythroblast_per_100wbc" if label == "erythroblast" else f"{label}_pct"
        assert specimen[results[key]["code"]] == (percent, results[key]["units"])
    (review,) = groups[SPECIMEN_GROUP].get_qualitative_evaluations()
    assert review.value.meaning == "Review required"
    texts = [
        item.TextValue
        for item in groups[SPECIMEN_GROUP][0].ContentSequence
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "C00034375"
    ]
    assert [t.split(" ")[0] for t in texts] == [f["code"] for f in result["flags"]]

    failed = groups[field_identifier(1)]
    field = result["fields"][1]
    assert _values(failed)["LPL-CLIPPED"][0] == pytest.approx(field["quality"]["clipped_fraction"])
    (quality,) = failed.get_qualitative_evaluations()
    assert quality.value == codes.DCM.UsableDoesNotMeetTheQualityControlStandard
    (image,) = failed.source_images
    assert image.referenced_sop_instance_uid == field["source"]


def test_signed_out_sr_names_its_verifying_observer(captures: list[Path], tmp_path: Path) -> None:
    signed = Verification("jdoe", "HAEM LAB", datetime(2026, 11, 21, 14, 5, 9, tzinfo=UTC))
    result = result_for(captures)
    result["review"] = {"acknowledged": {"min_wbc": {"username": "jdoe", "reason": "2 films"}}}
    sr = build_sr(
        result,
        read_headers(captures),
        loinc_map=LOINC,
        producer=PRODUCER,
        preliminary=False,
        verification=signed,
        comments=["jdoe: Toxic granulation."],
    )
    path = tmp_path / "signed.dcm"
    sr.save_as(path)
    _valid(path)
    back = dcmread(path)
    assert (back.PreliminaryFlag, back.VerificationFlag) == ("FINAL", "VERIFIED")
    observer = back.VerifyingObserverSequence[0]
    assert (str(observer.VerifyingObserverName), observer.VerifyingOrganization) == (
        "jdoe^",
        "HAEM LAB",
    )
    assert observer.VerificationDateTime.startswith("20261121140509")
    texts = [str(e.value) for e in back.iterall() if e.keyword == "TextValue"]
    assert "Comment jdoe: Toxic granulation." in texts
    assert any(t.startswith("min_wbc") and "acknowledged by jdoe: 2 films" in t for t in texts)
    assert back.SoftwareVersions[1:] == [f"{n} {v}" for n, v in MODELS.items()]  # both models


def test_annotations_are_valid_and_read_back(captures: list[Path], tmp_path: Path) -> None:
    result = result_for(captures)
    anns = build_annotations(result, read_headers(captures), producer=PRODUCER)
    assert len(anns) == len(captures)  # 2D: one referenced image per object
    assert len({a.SeriesInstanceUID for a in anns}) == 1
    for number, (ann, capture) in enumerate(zip(anns, captures, strict=True)):
        path = tmp_path / f"ann-{number}.dcm"
        ann.save_as(path)
        _valid(path)
        back = hd.ann.annread(path)
        source = dcmread(capture, stop_before_pixels=True)
        assert back.StudyInstanceUID == source.StudyInstanceUID
        assert back.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert "ReferencedFrameNumber" not in back.ReferencedImageSequence[0]
        assert (back.AnnotationCoordinateType, back.PixelOriginInterpretation) == ("2D", "FRAME")

        cells = [c for c in result["cells"] if c["field"] == number]
        labels = [g.label for g in back.AnnotationGroupSequence]
        assert labels == ["RBC", "PLT", "neutrophil", "lymphocyte", "unidentified"]
        for group in back.AnnotationGroupSequence:
            members = [c for c in cells if c["class"] == group.label]
            assert group.number_of_annotations == len(members)
            assert group.graphic_type == hd.ann.GraphicTypeValues.POLYGON
            assert group.annotated_property_type == CELL_TYPES[group.label]
            for polygon, cell in zip(group.get_graphic_data("2D"), members, strict=True):
                np.testing.assert_allclose(polygon, cell_polygon(cell), atol=1e-3)
            names, values, units = group.get_measurements()
            measured = {
                n.meaning: (v, u.value) for n, v, u in zip(names, values.T, units, strict=True)
            }
            np.testing.assert_allclose(
                measured["Detection score"][0], [c["score"] for c in members], atol=1e-6
            )
            areas = [polygon_area(cell_polygon(c)) * (SPACING_MM * 1000) ** 2 for c in members]
            np.testing.assert_allclose(measured["Area"][0], areas, rtol=1e-5)
            assert measured["Area"][1] == "um2"
            assert ("Probability" in measured) == (group.label not in ("RBC", "PLT"))


def test_multi_frame_capture_gets_one_annotation_object_per_frame(tmp_path: Path) -> None:
    path = multiframe_capture(tmp_path, frames=2)
    result = result_for([path])
    anns = build_annotations(result, read_headers([path]), producer=PRODUCER)
    assert [a.ReferencedImageSequence[0].ReferencedFrameNumber for a in anns] == [1, 2]
    for number, ann in enumerate(anns):
        out = tmp_path / f"ann-{number}.dcm"
        ann.save_as(out)
        _valid(out)
        back = hd.ann.annread(out)
        assert back.PixelOriginInterpretation == "FRAME"
        names = {
            m.name.meaning for g in back.AnnotationGroupSequence for m in g.MeasurementsSequence
        }
        assert "Area" not in names  # no pixel spacing: no area, and never one in pixels
    sr = build_sr(
        result, read_headers([path]), loinc_map=LOINC, producer=PRODUCER, preliminary=False
    )
    sr.save_as(tmp_path / "sr.dcm")
    _valid(tmp_path / "sr.dcm")
    report = hd.sr.MeasurementReport.from_sequence([hd.sr.srread(tmp_path / "sr.dcm")])
    frames = {
        g.tracking_identifier: g.source_images[0].referenced_frame_numbers
        for g in report.get_image_measurement_groups()
        if g.tracking_identifier != SPECIMEN_GROUP
    }
    assert frames == {field_identifier(0): [1], field_identifier(1): [2]}


def _whole_slide(folder: Path) -> Path:
    """A TILED_FULL whole-slide image of 2 x 2 tiles, each tile one field."""
    tiles = np.stack([smear(ROWS, COLUMNS, seed=s) for s in range(4)])
    ds = instance(tiles, sop_class=VLWholeSlideMicroscopyImageStorage)
    ds.PatientID, ds.AccessionNumber, ds.Modality = PATIENT_ID, "ACCWSI", "SM"
    ds.FrameOfReferenceUID = generate_uid()
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = 2 * COLUMNS, 2 * ROWS
    ds.TotalPixelMatrixFocalPlanes = ds.NumberOfOpticalPaths = 1
    optical_path = Dataset()
    optical_path.OpticalPathIdentifier = "1"
    ds.OpticalPathSequence = [optical_path]
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = origin.YOffsetInSlideCoordinateSystem = 20
    ds.TotalPixelMatrixOriginSequence = [origin]
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    measures = Dataset()
    measures.PixelSpacing = [SPACING_MM, SPACING_MM]
    measures.SliceThickness = 0.004
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    return save(ds, folder / "wsi.dcm")


def test_whole_slide_cells_are_placed_in_the_total_pixel_matrix(tmp_path: Path) -> None:
    path = _whole_slide(tmp_path)
    result = result_for([path])
    (ann,) = build_annotations(result, read_headers([path]), producer=PRODUCER)
    ann.save_as(tmp_path / "ann.dcm")
    _valid(tmp_path / "ann.dcm")
    back = hd.ann.annread(tmp_path / "ann.dcm")
    assert back.PixelOriginInterpretation == "VOLUME"
    assert "ReferencedFrameNumber" not in back.ReferencedImageSequence[0]
    rbc = back.get_annotation_group(1)
    assert rbc.number_of_annotations == 4 * sum(1 for kind, *_ in CELLS if kind == "RBC")
    polygons = rbc.get_graphic_data("2D")
    first_rbc = next(c for c in result["cells"] if c["class"] == "RBC" and c["field"] == 0)
    offsets = [(0, 0), (COLUMNS, 0), (0, ROWS), (COLUMNS, ROWS)]  # row-major tiles
    per_field = len(polygons) // 4
    for tile, offset in enumerate(offsets):
        np.testing.assert_allclose(
            polygons[tile * per_field], cell_polygon(first_rbc) + offset, atol=1e-2
        )


def _report(result: dict[str, Any], documents: list[Any] | None = None) -> dict[str, Any]:
    specimen = SpecimenResult(
        counts=result["counts"],
        differential=result["differential"],
        class_counts=result["class_counts"],
        wbc_classified=result["wbc_classified"],
        flags=(),
        fields=(),
    )
    ranges = parse_reference_ranges(
        yaml.safe_load((DEFAULT_CONFIG_DIR / "reference-ranges.yaml").read_text())
    )
    return case_report(
        case={
            "id": 7,
            "case_key": "acc:ACC0042",
            "accession_number": "ACC0042",
            "study_instance_uid": "1.2.3",
            "status": "review",
            "analysed_at": datetime(2026, 11, 21, 8, 30, tzinfo=UTC),
        },
        patient={
            "id": PATIENT_ID,
            "name_family": "Doe",
            "name_given": "Jane",
            "birth_date": "19700101",
            "sex": "F",
        },
        order={
            "placer_order_number": "PL1",
            "filler_order_number": "FI1",
            "test_code": "69738-3",
            "test_text": "Differential",
            "collected_at": "2026-11-21T07:55:00",
            "ordering_provider_family_name": "House",
            "ordering_provider_given_name": "Greg",
        },
        result=result,
        result_status="P",
        values=result_values(specimen, ranges, PatientContext(age_years=56, sex="F")),
        documents=documents or [],
        generated_at=datetime(2026, 11, 21, 8, 31, tzinfo=UTC),
    )


def _images(paths: list[Path]) -> dict[str, np.ndarray]:
    return {f.source: f.image for p in paths for f in fields_from_dataset(dcmread(p))}


def test_json_report_validates_against_its_schema(captures: list[Path]) -> None:
    report = _report(result_for(captures))
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    validator = jsonschema.Draft202012Validator(
        SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    validator.validate(json.loads(json.dumps(report)))
    flags = {v["key"]: v["abnormal_flag"] for v in report["values"]}
    assert flags["lymphocyte_pct"] == "H" and flags["monocyte_pct"] == "L"
    broken = json.loads(json.dumps(report))
    broken["result"]["cells"][0]["kind"] = "XYZ"
    assert not validator.is_valid(broken)


def test_pdf_renders_with_table_and_gallery(captures: list[Path], tmp_path: Path) -> None:
    report = _report(result_for(captures))
    pdf = build_pdf(report, _images(captures))
    assert pdf.startswith(b"%PDF")
    path = tmp_path / "report.pdf"
    path.write_bytes(pdf)
    pdftoppm = shutil.which("pdftoppm")
    if pdftoppm is None:
        pytest.skip("pdftoppm not installed (apt-get install poppler-utils)")
    subprocess.run(
        [pdftoppm, "-png", "-r", "60", "-f", "1", "-l", "1", str(path), str(tmp_path / "page")],
        check=True,
        timeout=60,
    )
    (png,) = tmp_path.glob("page*.png")
    page = np.asarray(Image.open(png).convert("RGB"))
    assert page.shape[0] > page.shape[1] > 400  # A4 portrait
    ink = (page < 200).any(axis=2)
    assert ink.mean() > 0.03  # text, tables and thumbnails, not a blank page
    colourful = (page.max(axis=2).astype(int) - page.min(axis=2)) > 60
    assert colourful.sum() > 2000  # the status banner and the cell thumbnails


def _pdf_text(pdf: bytes, tmp_path: Path) -> str:
    """The text of a PDF as poppler extracts it (what a reader copies or searches)."""
    pdftotext = shutil.which("pdftotext")
    if pdftotext is None:
        pytest.skip("pdftotext not installed (apt-get install poppler-utils)")
    path = tmp_path / "text.pdf"
    path.write_bytes(pdf)
    run = subprocess.run(
        [pdftotext, "-enc", "UTF-8", str(path), "-"], capture_output=True, timeout=60, check=True
    )
    return " ".join(run.stdout.decode().split())


#: Names in the scripts a laboratory meets: Latin with diacritics, Vietnamese, Greek,
#: Cyrillic, Japanese, Chinese and Korean.
NAMES = [
    ("Łukasiewicz", "Żaneta"),
    ("Nguyễn", "Thị Ánh"),
    ("Παπαδόπουλος", "Ελένη"),
    ("Иванова", "Мария"),
    ("山田", "太郎"),
    ("王", "秀英"),
    ("김", "민준"),
]


@pytest.mark.parametrize(("family", "given"), NAMES)
def test_pdf_prints_names_in_every_script(
    family: str, given: str, captures: list[Path], tmp_path: Path
) -> None:
    report = _report(result_for(captures))
    report["patient"] = {**report["patient"], "name_family": family, "name_given": given}
    text = _pdf_text(build_pdf(report, {}), tmp_path)
    assert f"{family}, {given}" in text
    assert "■" not in text and "cannot" not in text


def test_pdf_names_reviewers_dispositions_comments_and_models(
    captures: list[Path], tmp_path: Path
) -> None:
    result = result_for(captures)
    result["review"] = {
        "acknowledged": {
            "min_wbc": {
                "username": "Ōtani",
                "at": "2026-11-21T09:00:00+00:00",
                "reason": "smear thin, second slide ordered",
                "text": result["flags"][0]["text"],
            }
        },
        "technical_review": {"username": "bob", "at": "2026-11-21T08:50:00+00:00"},
    }
    report = _report(result)
    report["comments"] = [
        {"username": "alice", "at": "2026-11-21T09:01:00+00:00", "text": "Toxic granulation."}
    ]
    jsonschema.Draft202012Validator(SCHEMA).validate(json.loads(json.dumps(report)))
    text = _pdf_text(build_pdf(report, {}), tmp_path)
    assert "technical review by bob" in text and "awaiting sign-out by a pathologist" in text
    assert "technologist review required" not in text
    assert "acknowledged by Ōtani" in text and "smear thin, second slide ordered" in text
    assert "unidentified (review): 2 leukocytes unidentified - open" in text
    assert "alice" in text and "Toxic granulation." in text
    for name, version in MODELS.items():  # the analysis's detector and classifier versions
        assert f"{name} {version}" in text
    assert "UTC" in text  # times say their zone

    report["verified_by"] = {"username": "alice", "organization": "LAB", "at": "2026-11-21T09:02"}
    report["report_status"] = "final"
    text = _pdf_text(build_pdf(report, {}), tmp_path)
    assert "FINAL - signed out by alice (LAB)" in text and "technical review by bob" in text


def test_pdf_without_the_fonts_says_which_package(tmp_path: Path) -> None:
    with pytest.raises(FontMissing, match="fonts-dejavu-core"):
        fonts((tmp_path,))


def test_encapsulated_pdf_is_valid_and_in_the_study(captures: list[Path], tmp_path: Path) -> None:
    pdf = build_pdf(_report(result_for(captures)), _images(captures))
    headers = list(read_headers(captures).values())
    ds = build_encapsulated_pdf(
        pdf, headers[0], headers, producer=PRODUCER, created_at=datetime.now(UTC)
    )
    path = tmp_path / "pdf.dcm"
    ds.save_as(path, enforce_file_format=True)
    _valid(path)
    back = dcmread(path)
    assert back.SOPClassUID == EncapsulatedPDFStorage
    assert back.StudyInstanceUID == headers[0].StudyInstanceUID
    assert back.EncapsulatedDocument[: back.EncapsulatedDocumentLength] == pdf


class StorageSCP:
    """A pynetdicom Storage SCP for the report SOP classes that answers a chosen status."""

    def __init__(self, status: int = 0x0000, classes: tuple[str, ...] | None = None) -> None:
        self.status = status
        self.received: list[Dataset] = []
        self.ae = AE(ae_title="PACS")
        for uid in classes or (
            Comprehensive3DSRStorage,
            MicroscopyBulkSimpleAnnotationsStorage,
            EncapsulatedPDFStorage,
        ):
            self.ae.add_supported_context(uid)
        self.port = free_port()
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store)],
        )

    def _store(self, event: evt.Event) -> Dataset:
        self.received.append(event.dataset)
        status = Dataset()
        status.Status = self.status
        if self.status:
            status.ErrorComment = "disk full"
        return status

    def stop(self) -> None:
        self.server.shutdown()


def _message(path: Path) -> OutboxMessage:
    return OutboxMessage(
        channel="dicom",
        control_id="1.2",
        result_status="P",
        payload=str(path),
        status=OutboxStatus.PENDING,
    )


def test_pacs_sender_maps_answers_to_deliveries(captures: list[Path], tmp_path: Path) -> None:
    sr = build_sr(
        result_for(captures),
        read_headers(captures),
        loinc_map=LOINC,
        producer=PRODUCER,
        preliminary=True,
    )
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    cases = [
        (StorageSCP(), (True, "0000", "")),
        (StorageSCP(0xB000), (True, "B000", "disk full")),
        (StorageSCP(0xA700), (False, "A700", "disk full")),
        (StorageSCP(classes=(EncapsulatedPDFStorage,)), (False, "0122", None)),
    ]
    for scp, (accepted, code, text) in cases:
        try:
            sender = pacs_sender(
                PacsSettings(enabled=True, host="127.0.0.1", port=scp.port, ae_title="PACS"),
                "LISPLUGIN",
            )
            delivery = sender(_message(path))
        finally:
            scp.stop()
        assert (delivery.accepted, delivery.code) == (accepted, code)
        if text is not None:
            assert delivery.text == text
    assert cases[0][0].received[0].SOPInstanceUID == sr.SOPInstanceUID

    unreachable = pacs_sender(PacsSettings(enabled=True, port=free_port()), "LISPLUGIN")
    with pytest.raises(ReceiverUnavailable):
        unreachable(_message(path))
    missing = pacs_sender(PacsSettings(enabled=True, port=free_port()), "LISPLUGIN")(
        _message(tmp_path / "gone.dcm")
    )
    assert not missing.accepted and "gone.dcm" in missing.text


@pytest.fixture
def runtime(tmp_path: Path, database_url: str) -> Iterator[Runtime]:
    settings = Settings(
        storage=StorageSettings(path=tmp_path / "var"),
        database=DatabaseSettings(url=database_url),
        pacs=PacsSettings(enabled=True, host="127.0.0.1", port=free_port(), ae_title="PACS"),
    )
    runtime = Runtime(settings)
    yield runtime
    runtime.db.dispose()


def _stored_case(runtime: Runtime, captures: list[Path]) -> int:
    """Captures stored by the daemon's own store, an analysed result and its ORU row."""
    for path in captures:
        case = runtime.store.store(dcmread(path), path.read_bytes())
    result = result_for(captures)
    db: Database = runtime.db
    with db.session() as session:
        row = session.get(Case, case.id)
        assert row is not None
        row.result = result
        session.add(
            OutboxMessage(
                case_id=case.id,
                channel="hl7",
                control_id=f"LP{case.id}-1",
                result_status="P",
                payload="MSH|...",
                status=OutboxStatus.PENDING,
            )
        )
    return case.id


def test_write_case_reports_keeps_files_and_queues_dicom(
    runtime: Runtime, captures: list[Path]
) -> None:
    case_id = _stored_case(runtime, captures)
    written = write_case_reports(runtime.db, case_id, runtime.settings)
    names = sorted(p.name for p in written)
    assert "report.pdf" in names and "report.json" in names
    report = json.loads((written[-1]).read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(report)
    kinds = [d["kind"] for d in report["documents"]]
    assert kinds == ["sr", "ann", "ann", "pdf"]
    assert report["report_status"] == "preliminary" and report["patient"]["id"] == PATIENT_ID
    for document in report["documents"]:
        path = written[0].parent / document["file"]
        _valid(path)
        assert dcmread(path).SOPInstanceUID == document["sop_instance_uid"]
    with runtime.db.session() as session:
        queued = session.query(OutboxMessage).filter_by(channel="dicom").all()
        assert sorted(m.control_id for m in queued) == sorted(
            d["sop_instance_uid"] for d in report["documents"]
        )
        assert {(m.result_status, m.status) for m in queued} == {("P", OutboxStatus.PENDING)}
        assert all(Path(m.payload).is_file() for m in queued)

    pacs = StorageSCP()
    settings = runtime.settings.pacs.model_copy(update={"port": pacs.port})
    worker = OutboxWorker(
        runtime.db, {"dicom": pacs_sender(settings, "LISPLUGIN")}, backoff=lambda n: 60.0
    )
    try:
        worker.run_once()
    finally:
        pacs.stop()
    assert sorted(ds.SOPInstanceUID for ds in pacs.received) == sorted(
        d["sop_instance_uid"] for d in report["documents"]
    )
    with runtime.db.session() as session:
        delivered = session.query(OutboxMessage).filter_by(channel="dicom").all()
        assert {(m.status, m.ack_code) for m in delivered} == {(OutboxStatus.DELIVERED, "0000")}


def test_reports_a_failure_left_owed_are_made_later(runtime: Runtime, captures: list[Path]) -> None:
    """The ORU is committed, the reports fail (their folder cannot be made): the case stays
    owed its reports, and the scheduler makes them once the obstacle is gone."""
    blocker = runtime.settings.storage.path / "reports"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a folder")
    for path in captures:
        case = runtime.store.store(dcmread(path), path.read_bytes())
    runtime.scheduler.queue_stable(now=datetime.now(UTC) + timedelta(days=1))
    assert runtime.scheduler.run_once() == [case.id]
    with runtime.db.session() as session:
        assert session.query(OutboxMessage).filter_by(channel="hl7").count() == 1
        assert session.get(PendingReport, case.id) is not None
    later = datetime.now(UTC) + timedelta(seconds=runtime.settings.cases.report_retry_seconds + 1)
    assert runtime.scheduler.catch_up_reports(datetime.now(UTC)) == []  # still in its grace
    assert runtime.scheduler.catch_up_reports(later) == []  # fails again, stays owed
    blocker.unlink()
    assert runtime.scheduler.catch_up_reports(later) == [case.id]
    report = json.loads((blocker / str(case.id) / "report.json").read_text())
    with runtime.db.session() as session:
        assert session.get(PendingReport, case.id) is None
        queued = session.query(OutboxMessage).filter_by(channel="dicom").all()
        assert sorted(m.control_id for m in queued) == sorted(
            d["sop_instance_uid"] for d in report["documents"]
        )
    assert runtime.scheduler.catch_up_reports(later) == []  # nothing owed any more


def test_http_routes_serve_the_reports(runtime: Runtime, captures: list[Path]) -> None:
    app = FastAPI()
    app.state.runtime = runtime
    app.include_router(router)
    client = TestClient(app)
    case_id = _stored_case(runtime, captures)
    assert client.get(f"/api/cases/{case_id}/reports/sr").status_code == 404  # not yet made
    assert client.get("/api/cases/999/reports/pdf").json()["detail"] == "no case 999"
    write_case_reports(runtime.db, case_id, runtime.settings)

    sr = client.get(f"/api/cases/{case_id}/reports/sr")
    assert sr.headers["content-type"] == "application/dicom"
    assert hd.sr.srread(io.BytesIO(sr.content)).SOPClassUID == Comprehensive3DSRStorage
    pdf = client.get(f"/api/cases/{case_id}/reports/pdf")
    assert pdf.headers["content-type"] == "application/pdf" and pdf.content.startswith(b"%PDF")
    body = client.get(f"/api/cases/{case_id}/reports/json").json()
    assert body["case"]["id"] == case_id
    both = client.get(f"/api/cases/{case_id}/reports/ann")
    assert both.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    assert both.content.count(b"DICM") == 2
    second = client.get(f"/api/cases/{case_id}/reports/ann/2")
    assert second.headers["content-type"] == "application/dicom"
    assert client.get(f"/api/cases/{case_id}/reports/ann/3").status_code == 404
