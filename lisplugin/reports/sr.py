"""The case result as a DICOM Comprehensive 3D SR holding a TID 1500 Measurement Report.

A PACS or viewer reads numbers from SR, not from a PDF: every count, differential percentage
and field-quality measure is a coded TID 300 measurement, each review flag a qualitative
evaluation. One measurement group describes the specimen (all captures), one group per field
its image quality and the capture (and frame) it came from. The document goes into the
captures' study as a new series and copies their patient and study attributes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    DeviceObserverIdentifyingAttributes,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    SubjectContext,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import DT

from lisplugin.reports import coding
from lisplugin.reports.coding import Producer, ResultCode, Verification
from lisplugin.reports.sources import FieldRef, fields_by_source

SERIES_NUMBER = 900
SERIES_DESCRIPTION = "lisplugin differential (SR)"
#: Identifier of the specimen-wide measurement group (fields are "Field <n>", n from 1).
SPECIMEN_GROUP = "Specimen"


def build_sr(
    result: Mapping[str, Any],
    headers: Mapping[str, Dataset],
    *,
    loinc_map: Mapping[str, Any],
    producer: Producer,
    preliminary: bool,
    verification: Verification | None = None,
    comments: Sequence[str] = (),
) -> Comprehensive3DSR:
    """The SR of ``result``, computed from the captures whose headers are ``headers``.

    ``preliminary`` sets Preliminary Flag (0040,A496): a result that waits for review is
    PRELIMINARY, a released one FINAL. Verification Flag is VERIFIED, with the person, the
    laboratory and the time of the sign-out in Verifying Observer Sequence, when a person signed
    the result out (``verification``); a result released by the rules alone stays UNVERIFIED.
    """
    if not headers:
        raise ValueError("an SR needs at least one source image")
    evidence = list(headers.values())
    refs = fields_by_source(result, headers)
    algorithm = AlgorithmIdentification(
        name=coding.MANUFACTURER,
        version=producer.software_version,
        parameters=[f"{name} {version}" for name, version in producer.model_versions.items()]
        or None,
    )
    groups = [_specimen_group(result, evidence, loinc_map, algorithm, comments)]
    groups += [
        _field_group(field, headers, refs[int(field["index"])], algorithm)
        for field in result.get("fields", [])
        if int(field["index"]) in refs
    ]
    report = MeasurementReport(
        observation_context=_observation_context(producer, evidence[0]),
        procedure_reported=_procedures(loinc_map),
        imaging_measurements=groups,
        referenced_images=evidence,
    )
    sr = Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=generate_uid(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=coding.MANUFACTURER,
        is_complete=True,
        is_final=not preliminary,
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name="lisplugin",
        # a list, as pydicom wants multiple values (highdicom's hint says tuple)
        software_versions=producer.software_versions,  # type: ignore[arg-type]
        coding_schemes=[coding.PRIVATE_SCHEME_ITEM],
        is_verified=verification is not None,
        verifying_observer_name=verification.person_name if verification else None,
        verifying_organization=verification.organization if verification else None,
    )
    if verification is not None:  # highdicom stamps the time of writing; the SR says signing
        sr.VerifyingObserverSequence[0].VerificationDateTime = DT(verification.at)
    return sr


def _procedures(loinc_map: Mapping[str, Any]) -> list[CodedConcept]:
    """Procedure reported: the site's differential panel (as in the ORU) by light microscopy."""
    return [coding.map_concept(loinc_map["panel"]), coding.concept(codes.SCT.LightMicroscopy)]


def _observation_context(producer: Producer, first: Dataset) -> ObservationContext:
    device = DeviceObserverIdentifyingAttributes(
        uid=producer.uid,
        name=producer.station,
        manufacturer_name=coding.MANUFACTURER,
        model_name=producer.model_name,
    )
    return ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        ),
        subject_context=SubjectContext.from_image(first),
    )


def _measurement(code: ResultCode, value: float) -> Measurement:
    return Measurement(name=code.concept, value=float(value), unit=coding.unit(code.units))


def _specimen_group(
    result: Mapping[str, Any],
    evidence: Sequence[Dataset],
    loinc_map: Mapping[str, Any],
    algorithm: AlgorithmIdentification,
    comments: Sequence[str] = (),
) -> MeasurementsAndQualitativeEvaluations:
    """Counts per kind, the differential and the review status of the whole specimen."""
    measurements = [
        _measurement(
            coding.named_result(
                loinc_map, f"{kind.lower()}_counted", f"{kind} detected", "{cells}"
            ),
            n,
        )
        for kind, n in result.get("counts", {}).items()
    ]
    classified = coding.named_result(
        loinc_map, "wbc_classified", "Leukocytes classified", "{cells}"
    )
    measurements.append(_measurement(classified, result.get("wbc_classified", 0)))
    differential = result.get("differential", {})
    measurements += [
        _measurement(coding.differential_code(loinc_map, label), differential[label])
        for label in coding.ordered_labels(differential)
    ]
    review = coding.REVIEW_REQUIRED if result.get("needs_review") else coding.REVIEW_NOT_REQUIRED
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=generate_uid(), identifier=SPECIMEN_GROUP),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[QualitativeEvaluation(coding.REVIEW_STATUS, review)],
        source_images=[
            SourceImageForMeasurementGroup(ds.SOPClassUID, ds.SOPInstanceUID) for ds in evidence
        ],
    )
    flags = result.get("flags", [])
    acknowledged = (result.get("review") or {}).get("acknowledged") or {}
    _add_texts(
        group,
        [
            f"{f['code']} ({f['severity']}): {f['text']}{_disposition(acknowledged.get(f['code']))}"
            for f in flags
        ]
        + [f"Comment {text}" for text in comments],
    )
    return group


def _disposition(ack: Mapping[str, Any] | None) -> str:
    if not ack:
        return ""
    reason = f": {ack['reason']}" if ack.get("reason") else ""
    return f" - acknowledged by {ack['username']}{reason}"


def _field_group(
    field: Mapping[str, Any],
    headers: Mapping[str, Dataset],
    ref: FieldRef,
    algorithm: AlgorithmIdentification,
) -> MeasurementsAndQualitativeEvaluations:
    """The image-quality measures of one field and the capture (frame) it was taken from."""
    quality = field["quality"]
    measurements = [
        _measurement(ResultCode(coding.concept(code), "1"), quality[key])
        for code, key in (
            (coding.FOCUS, "focus"),
            (coding.EXPOSURE, "exposure"),
            (coding.CLIPPED, "clipped_fraction"),
        )
    ]
    verdict = (
        codes.DCM.UsableMeetsTheQualityControlStandard
        if quality["passed"]
        else codes.DCM.UsableDoesNotMeetTheQualityControlStandard
    )
    source = headers[ref.sop_instance_uid]
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=generate_uid(), identifier=field_identifier(int(field["index"]))
        ),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[QualitativeEvaluation(codes.DCM.ImageQuality, verdict)],
        source_images=[
            SourceImageForMeasurementGroup(
                source.SOPClassUID,
                source.SOPInstanceUID,
                referenced_frame_numbers=None if ref.frame is None else [ref.frame],
            )
        ],
    )
    _add_texts(group, [str(reason) for reason in quality.get("reasons", [])])
    return group


def field_identifier(index: int) -> str:
    """Tracking identifier of a field's group: fields are numbered from 1 for people."""
    return f"Field {index + 1}"


def _add_texts(group: MeasurementsAndQualitativeEvaluations, texts: Sequence[str]) -> None:
    """Free-text qualitative evaluations (TID 1501 TEXT row), e.g. review flags."""
    container = group[0]
    for text in texts:
        container.ContentSequence.append(
            TextContentItem(
                name=coding.concept(coding.QUALITATIVE_TEXT),
                value=text,
                relationship_type="CONTAINS",
            )
        )
