"""The case report as a PDF for people, and the same PDF as a DICOM Encapsulated PDF.

The page shows what a technologist or pathologist needs to sign out a smear: patient and
order, the differential with the patient's reference intervals and H/L flags (the same values
the ORU carries), the review flags, a gallery of the cells of each class cropped from the
captures, the image quality of each field and the model versions. It is drawn from the JSON
report (``json_report.case_report``), so the two can never disagree.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np
from PIL import Image as PILImage
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian, generate_uid
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.platypus import (
    Flowable,
    Image,
    KeepTogether,
    Paragraph,
    SimpleDocTemplate,
    Spacer,
    Table,
    TableStyle,
)
from reportlab.platypus.doctemplate import BaseDocTemplate

from lisplugin.reports import coding
from lisplugin.reports.coding import Producer
from lisplugin.reports.fonts import Fonts, fonts

SERIES_NUMBER = 902
SERIES_DESCRIPTION = "lisplugin differential (PDF)"
DOCUMENT_TITLE = "Blood smear leukocyte differential"
#: Thumbnails shown per class (highest detection scores first) and their size.
GALLERY_PER_CLASS = 16
GALLERY_COLUMNS = 8
THUMB_PX = 96
THUMB_SIZE = 20 * mm
#: Context around a cell box in its thumbnail, as a share of the box size on each side.
THUMB_MARGIN = 0.25

_STATUS_BANNER = {
    "preliminary": (
        "PRELIMINARY - not verified: awaiting review and sign-out by a pathologist",
        colors.HexColor("#b45309"),
    ),
    "final": ("FINAL - every review rule passed", colors.HexColor("#166534")),
    "corrected": ("CORRECTED - replaces an earlier final result", colors.HexColor("#1d4ed8")),
}
_FLAG_COLOURS = {"H": colors.HexColor("#b91c1c"), "L": colors.HexColor("#1d4ed8")}
#: How the report names the result keys it shows (the rest by their key).
_VALUE_NAMES = {
    "wbc_classified": "Leukocytes classified",
    "rbc_counted": "Red cells detected",
    "wbc_counted": "Leukocytes detected",
    "plt_counted": "Platelets detected",
    "plt_per_field": "Platelets per field",
    "plt_estimate": "Platelet estimate",
}
#: Decimals of the values that are neither shares nor counts of cells.
_DECIMALS = {"plt_per_field": 1, "plt_estimate": 0}
#: What each model of ``model_versions`` does.
_MODEL_NAMES = {"detector": "Cell detector", "classifier": "Leukocyte classifier"}
#: UCUM units as the table prints them.
_UNITS = {"{cells}": "cells", "/100{WBCs}": "/100 WBC", "10*9/L": "x10^9/L"}


def build_pdf(report: Mapping[str, Any], images: Mapping[str, np.ndarray]) -> bytes:
    """The PDF of a JSON report; ``images`` maps field sources to their RGB pixels.

    Raises ``FontMissing`` when the fonts that print every script are not installed.
    """
    font = fonts()
    styles = _styles(font)
    small = styles["small"]
    buffer = io.BytesIO()
    doc = SimpleDocTemplate(
        buffer,
        pagesize=A4,
        leftMargin=15 * mm,
        rightMargin=15 * mm,
        topMargin=15 * mm,
        bottomMargin=18 * mm,
        title=f"{DOCUMENT_TITLE} - case {report['case']['id']}",
        author=report["generator"],
        subject=str(report["case"]["case_key"]),
    )
    review = report["result"].get("review") or {}
    story: list[Flowable] = [
        Paragraph(DOCUMENT_TITLE, styles["Title"]),
        _banner(report["report_status"], report.get("verified_by"), review, styles),
        Spacer(1, 4 * mm),
        _identity_table(report, small),
    ]
    missing = font.unprintable(_patient_name(report["patient"]))
    if missing:
        story.append(
            Paragraph(
                f"<b>The patient name has characters no installed font prints ({_escape(missing)})"
                ": check the name in the LIS; install fonts-droid-fallback and fonts-nanum.</b>",
                ParagraphStyle("warn", parent=small, textColor=colors.HexColor("#b91c1c")),
            )
        )
    story += [
        Spacer(1, 5 * mm),
        Paragraph("Differential", styles["Heading2"]),
        _values_table(report),
    ]
    story.append(Paragraph("Review flags", styles["Heading2"]))
    story += _flags(report["result"], review, small)
    story.append(Paragraph("Comments", styles["Heading2"]))
    story += _comments(report.get("comments") or [], review, small)
    story.append(Paragraph("Cells by class", styles["Heading2"]))
    story += _gallery(report["result"], images, small)
    story.append(Paragraph("Field quality", styles["Heading2"]))
    story.append(_fields_table(report["result"], small))
    story.append(Paragraph("Models", styles["Heading2"]))
    story.append(_models_table(report))
    doc.build(story, onFirstPage=_footer(report), onLaterPages=_footer(report))
    return buffer.getvalue()


def _styles(font: Fonts) -> dict[str, ParagraphStyle]:
    """The sample styles in the embedded fonts (the base fonts print Latin-1 only)."""
    sample = getSampleStyleSheet()
    styles = {
        name: ParagraphStyle(
            name,
            parent=sample[name],
            fontName=font.bold if name != "Normal" else font.regular,
        )
        for name in ("Title", "Heading2", "Normal")
    }
    styles["small"] = ParagraphStyle("small", parent=styles["Normal"], fontSize=8, leading=10)
    return styles


def _grid() -> list[tuple[Any, ...]]:
    return [
        ("GRID", (0, 0), (-1, -1), 0.25, colors.HexColor("#9ca3af")),
        ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#e5e7eb")),
        ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
        ("FONTNAME", (0, 0), (-1, -1), fonts().regular),
        ("FONTSIZE", (0, 0), (-1, -1), 8),
    ]


def _escape(text: Any) -> str:
    """Text for a reportlab Paragraph (its markup is XML-like), in fonts that have it."""
    return fonts().markup(text)


def _patient_name(patient: Mapping[str, Any]) -> str:
    return ", ".join(p for p in (patient.get("name_family"), patient.get("name_given")) if p)


def _banner(
    status: str,
    verified_by: Mapping[str, Any] | None,
    review: Mapping[str, Any],
    styles: Mapping[str, ParagraphStyle],
) -> Table:
    text, colour = _STATUS_BANNER[status]
    technical = review.get("technical_review")
    if verified_by:  # a person released it, not the rules
        text = (
            f"{text.split(' - ')[0]} - signed out by {_escape(verified_by['username'])} "
            f"({_escape(verified_by['organization'])}), {_date(verified_by['at'])}"
        )
        if technical:
            text += f"; technical review by {_escape(technical['username'])}"
    elif status == "preliminary" and technical:
        text = (
            f"PRELIMINARY - technical review by {_escape(technical['username'])}, "
            f"{_date(technical['at'])}; awaiting sign-out by a pathologist"
        )
    style = ParagraphStyle(
        "banner", parent=styles["Normal"], textColor=colors.white, fontName=fonts().bold
    )
    table = Table([[Paragraph(text, style)]], colWidths=[180 * mm])
    table.setStyle(
        TableStyle([("BACKGROUND", (0, 0), (-1, -1), colour), ("LEFTPADDING", (0, 0), (-1, -1), 6)])
    )
    return table


def _flags(
    result: Mapping[str, Any], review: Mapping[str, Any], small: ParagraphStyle
) -> list[Flowable]:
    """Each flag with its disposition: who acknowledged it, when and why, or still open."""
    acknowledged = review.get("acknowledged") or {}
    parts: list[Flowable] = []
    for f in result.get("flags", []):
        ack = acknowledged.get(f["code"])
        if f["severity"] == "info":
            disposition = "for information"
        elif ack:
            reason = f": {_escape(ack['reason'])}" if ack.get("reason") else ""
            disposition = f"acknowledged by {_escape(ack['username'])}, {_date(ack['at'])}{reason}"
        else:
            disposition = "<b>open</b>"
        parts.append(
            Paragraph(
                f"<b>{_escape(f['code'])}</b> ({_escape(f['severity'])}): {_escape(f['text'])}"
                f" - {disposition}",
                small,
            )
        )
    return parts or [Paragraph("None: every review rule passed.", small)]


def _comments(
    comments: Sequence[Mapping[str, Any]], review: Mapping[str, Any], small: ParagraphStyle
) -> list[Flowable]:
    """Reviewers' comments (they go to the LIS as NTE), and the below-minimum override."""
    parts: list[Flowable] = [
        Paragraph(f"<b>{_escape(c['username'])}</b>, {_date(c['at'])}: {_escape(c['text'])}", small)
        for c in comments
    ]
    override = review.get("override")
    if override:
        parts.append(
            Paragraph(
                f"<b>Released below the minimum count</b> ({override['wbc_classified']} of "
                f"{override['minimum']} leukocytes) by {_escape(override['username'])}, "
                f"{_date(override['at'])}: {_escape(override['text'])}",
                small,
            )
        )
    return parts or [Paragraph("None.", small)]


def _date(text: str | None) -> str:
    """YYYYMMDD (DICOM/HL7) or ISO dates and times as people read them (local time, zone)."""
    value = (text or "").strip()
    if len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    try:
        return datetime.fromisoformat(value).astimezone().strftime("%Y-%m-%d %H:%M %Z")
    except ValueError:
        return value


def _identity_table(report: Mapping[str, Any], style: ParagraphStyle) -> Table:
    patient, order, case = report["patient"], report["order"] or {}, report["case"]
    name = _patient_name(patient)
    provider = " ".join(
        p
        for p in (
            order.get("ordering_provider_given_name"),
            order.get("ordering_provider_family_name"),
        )
        if p
    )
    test = " ".join(p for p in (order.get("test_code"), order.get("test_text")) if p)
    left = [
        ("Patient", name or "-"),
        ("Patient ID", patient.get("id") or "-"),
        ("Birth date", _date(patient.get("birth_date")) or "-"),
        ("Sex", patient.get("sex") or "-"),
        ("Case", f"{case['id']} ({case['case_key']})"),
    ]
    right = [
        ("Accession", case.get("accession_number") or "-"),
        (
            "Order",
            " / ".join(
                n for n in (order.get("placer_order_number"), order.get("filler_order_number")) if n
            )
            or "no order received",
        ),
        ("Test", test or "-"),
        ("Ordered by", provider or "-"),
        ("Collected", _date(order.get("collected_at")) or "-"),
        ("Analysed", _date(case.get("analysed_at")) or "-"),
        ("Report", _date(report["generated_at"])),
    ]
    rows = []
    for i in range(max(len(left), len(right))):
        row = []
        for column in (left, right):
            label, value = column[i] if i < len(column) else ("", "")
            row += [Paragraph(f"<b>{label}</b>", style), Paragraph(_escape(value), style)]
        rows.append(row)
    table = Table(rows, colWidths=[24 * mm, 66 * mm, 24 * mm, 66 * mm])
    table.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP")]))
    return table


def _value_name(key: str) -> str:
    if key in _VALUE_NAMES:
        return _VALUE_NAMES[key]
    label = key.removesuffix("_pct").removesuffix("_per_100wbc").removesuffix("_abs")
    name = {"ig": "Immature granulocytes"}.get(label, label.replace("_", " ").capitalize())
    return f"{name}, absolute" if key.endswith("_abs") else name


def _value_text(key: str, value: float, is_share: bool) -> str:
    decimals = 1 if is_share else 2 if key.endswith("_abs") else _DECIMALS.get(key, 0)
    return f"{value:.{decimals}f}"


def _interval(value: Mapping[str, Any]) -> str:
    low, high = value["reference_low"], value["reference_high"]
    if low is None and high is None:
        return ""
    return f"{'' if low is None else f'{low:g}'} - {'' if high is None else f'{high:g}'}"


def _values_table(report: Mapping[str, Any]) -> Table:
    class_counts = report["result"].get("class_counts", {})
    rows: list[list[Any]] = [["", "Cells", "Result", "Units", "Reference", "Flag"]]
    styles = _grid()
    for value in report["values"]:
        label = value["key"].removesuffix("_pct").removesuffix("_per_100wbc")
        is_share = label != value["key"]
        rows.append(
            [
                _value_name(value["key"]),
                str(class_counts.get(label, "")) if is_share else "",
                _value_text(value["key"], value["value"], is_share),
                _UNITS.get(value["units"], value["units"]),
                _interval(value),
                value["abnormal_flag"],
            ]
        )
        colour = _FLAG_COLOURS.get(value["abnormal_flag"])
        if colour is not None:
            line = len(rows) - 1
            styles += [
                ("TEXTCOLOR", (0, line), (-1, line), colour),
                ("FONTNAME", (0, line), (-1, line), fonts().bold),
            ]
    table = Table(
        rows, colWidths=[60 * mm, 20 * mm, 25 * mm, 25 * mm, 30 * mm, 15 * mm], repeatRows=1
    )
    styles.append(("ALIGN", (1, 0), (-1, -1), "RIGHT"))
    table.setStyle(TableStyle(styles))
    return table


def crop_cell(image: np.ndarray, box: Sequence[float]) -> PILImage.Image:
    """A square thumbnail of the cell in ``box`` with some context, THUMB_PX wide."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0, 1.0) * (1 + 2 * THUMB_MARGIN)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    height, width = image.shape[:2]
    left, top = int(max(cx - side / 2, 0)), int(max(cy - side / 2, 0))
    right, bottom = int(min(cx + side / 2, width)), int(min(cy + side / 2, height))
    crop = PILImage.fromarray(image[top : max(bottom, top + 1), left : max(right, left + 1)])
    return crop.resize((THUMB_PX, THUMB_PX), PILImage.Resampling.LANCZOS)


def _png(image: PILImage.Image) -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    buffer.seek(0)
    return buffer


def _gallery(
    result: Mapping[str, Any],
    images: Mapping[str, np.ndarray],
    small: ParagraphStyle,
) -> list[Flowable]:
    sources = {int(f["index"]): str(f["source"]) for f in result.get("fields", [])}
    by_class: dict[str, list[Mapping[str, Any]]] = {}
    for cell in result.get("cells", []):
        if sources.get(int(cell["field"])) in images:
            by_class.setdefault(str(cell["class"]), []).append(cell)
    if not by_class:
        return [Paragraph("No cells, or the captures are no longer stored.", small)]
    parts: list[Flowable] = []
    for label in coding.ordered_labels(by_class):
        cells = sorted(by_class[label], key=lambda c: -float(c["score"]))
        shown = cells[:GALLERY_PER_CLASS]
        thumbs = [
            Image(
                _png(crop_cell(images[sources[int(c["field"])]], c["box"])),
                width=THUMB_SIZE,
                height=THUMB_SIZE,
            )
            for c in shown
        ]
        rows = [thumbs[i : i + GALLERY_COLUMNS] for i in range(0, len(thumbs), GALLERY_COLUMNS)]
        rows[-1] += [""] * (GALLERY_COLUMNS - len(rows[-1]))
        grid = Table(rows, colWidths=[THUMB_SIZE + 2 * mm] * GALLERY_COLUMNS)
        grid.setStyle(
            TableStyle(
                [("LEFTPADDING", (0, 0), (-1, -1), 1), ("RIGHTPADDING", (0, 0), (-1, -1), 1)]
            )
        )
        title = f"{_escape(coding.cell_type(label).meaning)} ({_escape(label)})"
        count = f"{len(shown)} of {len(cells)} shown" if len(cells) > len(shown) else len(cells)
        parts.append(
            KeepTogether([Paragraph(f"<b>{title}</b>: {count}", small), grid, Spacer(1, 2 * mm)])
        )
    return parts


def _focus_text(quality: Mapping[str, Any]) -> str:
    """Focus, with the sharpness (contrast-free) beside it when the result has one."""
    sharpness = quality.get("sharpness")
    focus = f"{quality['focus']:.1f}"
    return focus if sharpness is None else f"{focus} / {sharpness:.2f}"


def _fields_table(result: Mapping[str, Any], style: ParagraphStyle) -> Table:
    rows: list[list[Any]] = [
        ["Field", "Source", "Size", "Focus / sharpness", "Exposure", "Clipped", "QC"]
    ]
    for field in result.get("fields", []):
        quality = field["quality"]
        verdict = "passed" if quality["passed"] else "failed: " + "; ".join(quality["reasons"])
        rows.append(
            [
                str(int(field["index"]) + 1),
                Paragraph(_escape(field["source"]), style),
                f"{field['width']} x {field['height']}",
                _focus_text(quality),
                f"{quality['exposure']:.2f}",
                f"{quality['clipped_fraction']:.1%}",
                Paragraph(_escape(verdict), style),
            ]
        )
    table = Table(
        rows,
        colWidths=[12 * mm, 56 * mm, 20 * mm, 22 * mm, 16 * mm, 16 * mm, 33 * mm],
        repeatRows=1,
    )
    table.setStyle(TableStyle(_grid()))
    return table


def _models_table(report: Mapping[str, Any]) -> Table:
    rows = [["Software", "Version"], ["lisplugin", report["generator"].removeprefix("lisplugin ")]]
    rows += [
        [_MODEL_NAMES.get(name, name), version]
        for name, version in report["result"].get("model_versions", {}).items()
    ]
    table = Table(rows, colWidths=[80 * mm, 60 * mm], hAlign="LEFT")
    table.setStyle(TableStyle(_grid()))
    return table


def _footer(report: Mapping[str, Any]) -> Any:
    """Draws case, patient and page number on every page (patient ID: pages get separated)."""
    line = (
        f"Case {report['case']['id']} - patient {report['patient'].get('id') or '-'} - "
        f"{report['report_status']} - {report['generator']}"
    )

    def draw(canvas: Any, doc: BaseDocTemplate) -> None:
        canvas.saveState()
        canvas.setFont(fonts().regular, 7)
        canvas.drawString(15 * mm, 10 * mm, line)
        canvas.drawRightString(A4[0] - 15 * mm, 10 * mm, f"page {doc.page}")
        canvas.restoreState()

    return draw


def build_encapsulated_pdf(
    pdf: bytes,
    header: Dataset,
    sources: Sequence[Dataset],
    *,
    producer: Producer,
    created_at: datetime,
) -> Dataset:
    """``pdf`` as an Encapsulated PDF instance in the study of ``header`` (a capture's header).

    Patient and study attributes are copied from ``header``; ``sources`` are the captures the
    PDF shows cells of (Source Instance Sequence); Burned In Annotation is YES because the
    document names the patient.
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = EncapsulatedPDFStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "SpecificCharacterSet" in header:
        ds.SpecificCharacterSet = header.SpecificCharacterSet
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyID",
        "AccessionNumber",
    ):
        setattr(ds, keyword, header.get(keyword))
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = SERIES_NUMBER
    ds.SeriesDescription = SERIES_DESCRIPTION
    ds.Manufacturer = coding.MANUFACTURER
    ds.ManufacturerModelName = "lisplugin"
    ds.SoftwareVersions = producer.software_versions
    ds.ConversionType = "WSD"
    ds.InstanceNumber = 1
    ds.ContentDate = created_at.strftime("%Y%m%d")
    ds.ContentTime = created_at.strftime("%H%M%S")
    ds.AcquisitionDateTime = created_at.strftime("%Y%m%d%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = DOCUMENT_TITLE
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    references = []
    for source in sources:
        item = Dataset()
        item.ReferencedSOPClassUID = source.SOPClassUID
        item.ReferencedSOPInstanceUID = source.SOPInstanceUID
        references.append(item)
    ds.SourceInstanceSequence = references
    ds.EncapsulatedDocument = pdf + b"\x00" * (len(pdf) % 2)  # OB values have even length
    ds.EncapsulatedDocumentLength = len(pdf)
    return ds
