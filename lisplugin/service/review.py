"""Expert review of a case: the worklist, reclassifying cells, comments and sign-out.

Sign-out is safe by construction: every flag that holds the result (severity review or
critical) must be acknowledged first, with a reason where the rule asks for one; a differential
below the minimum count (``analysis.min_wbc_classified``) goes out only with an override
comment, which is audited and sent as an NTE; in two-stage mode (``review.two_stage``) a
technologist's technical review comes before the pathologist's sign-out. These decisions are
kept with the result (``result["review"]``), so the reports show them; a reclassification
undoes the technical review (the result it approved changed) but keeps the acknowledgements.

Changes to a case are guarded by its optimistic-locking counter (``Case.version``): the client
names the version it saw, and a change made to an older version is refused with a conflict
instead of silently overwriting someone else's work. Every change writes an audit event in
the same transaction. Sign-out releases the reviewed result to the LIS through the outbox:
``F``, or ``C`` when a final result for the case was sent before.
"""

from __future__ import annotations

import copy
import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from lisplugin.config import Hl7Settings, Settings
from lisplugin.core.analysis import (
    median_rbc_diameter,
    result_values,
    specimen_classifier,
    specimen_sample,
)
from lisplugin.core.crops import PBC_CROP_PX, in_view, leukocyte_crop, pbc_scale
from lisplugin.core.revision import RevisionError, reclassified, reclassify, revise
from lisplugin.core.rules import PatientContext, PreviousResult, reason_required
from lisplugin.core.saliency import heat_overlay, occlusion_sensitivity
from lisplugin.core.types import (
    Detection,
    Field,
    Flag,
    LeukocyteClassifier,
    ResultValue,
    SpecimenResult,
)
from lisplugin.dicom.decode import UnusableInstance
from lisplugin.dicom.frames import read_frame
from lisplugin.service.cases import EXTEND_MARK, queue_oru
from lisplugin.service.outbox import as_utc
from lisplugin.service.pipeline import Pipeline, patient_context
from lisplugin.storage.orm import Case, CaseStatus
from lisplugin.storage.orm_review import SIGN_OUT_ACTION, AuditEvent, CaseComment

#: States whose result a reviewer may change; a change to a released result reopens the case.
REVIEWABLE = frozenset({CaseStatus.REVIEW, CaseStatus.VERIFIED, CaseStatus.FINAL})
MAX_COMMENT = 4000
CANNED_COMMENTS = "comments.yaml"


class ReviewError(Exception):
    """A review action that cannot be done; ``status`` is the HTTP status that says why."""

    status = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(ReviewError):
    status = 404


class Conflict(ReviewError):
    status = 409


class Invalid(ReviewError):
    status = 422


def audit(
    session: Session,
    username: str,
    action: str,
    case_id: int | None = None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> None:
    session.add(
        AuditEvent(username=username, case_id=case_id, action=action, before=before, after=after)
    )


def get_case(session: Session, case_id: int) -> Case:
    case = session.get(Case, case_id)
    if case is None:
        raise NotFound(f"no case {case_id}")
    return case


def _case_to_change(session: Session, case_id: int, version: int) -> Case:
    case = get_case(session, case_id)
    if case.version != version:
        raise Conflict(
            f"case {case_id} was changed after you loaded it (you saw version {version}, it is "
            f"now version {case.version}); reload the case and make your change again"
        )
    return case


def _flush(session: Session, case_id: int) -> None:
    """Write now, so that a concurrent change is a conflict here and not a failed commit."""
    try:
        session.flush()
    except StaleDataError:
        raise Conflict(
            f"case {case_id} was changed by someone else at the same moment; reload it"
        ) from None


def case_context(case: Case) -> PatientContext:
    """The patient as the case's analysis saw them: age on that day, the order's counts, and
    the earlier verified result it was compared with."""
    at = as_utc(case.analysed_at) if case.analysed_at else datetime.now(UTC)
    previous = PreviousResult.from_json((case.result or {}).get("previous"))
    return patient_context(dict(case.patient or {}), case.order, at, previous)


def _revised(
    pipeline: Pipeline, case: Case, result: dict[str, Any]
) -> tuple[SpecimenResult, dict[str, Any]]:
    return revise(result, pipeline.rules, pipeline.ranges, case_context(case))


def reported_values(pipeline: Pipeline, case: Case) -> list[ResultValue]:
    """The values the LIS would get for the case's result as it stands (rounded, flagged)."""
    specimen, _ = _revised(pipeline, case, case.result or {})
    return result_values(specimen, pipeline.ranges, case_context(case))


def reclassify_cell(
    session: Session,
    pipeline: Pipeline,
    case_id: int,
    cell_id: int,
    new_class: str,
    version: int,
    username: str,
) -> Case:
    """Give one leukocyte detection a class and recount; a released result is reopened."""
    case = _case_to_change(session, case_id, version)
    if case.status not in REVIEWABLE or case.result is None:
        raise Conflict(f"case {case_id} is {case.status.value}; only analysed cases are reviewed")
    _cell(case, cell_id)  # 404 for a cell that is not there
    try:
        changed = reclassify(case.result, cell_id, new_class)
    except RevisionError as exc:
        raise Invalid(str(exc)) from None
    old_class = case.result["cells"][cell_id]["class"]
    if old_class == new_class:
        return case
    _, revised = _revised(pipeline, case, changed)
    review = revised.get("review") or {}
    if review.get("technical_review"):  # it approved a result that has now changed
        revised["review"] = {k: v for k, v in review.items() if k != "technical_review"}
    before_status = case.status
    case.result = revised
    case.status = CaseStatus.REVIEW
    audit(
        session,
        username,
        "cell.reclassify",
        case.id,
        before={"cell_id": cell_id, "class": old_class, "status": before_status.value},
        after={"cell_id": cell_id, "class": new_class, "status": case.status.value},
    )
    _flush(session, case_id)
    return case


def canned_comments(settings: Settings) -> dict[str, str]:
    """Code -> text of the site's canned comments (``config/comments.yaml``; none without it)."""
    if not (settings.config_dir / CANNED_COMMENTS).is_file():
        return {}
    entries = (settings.load_yaml(CANNED_COMMENTS) or {}).get("comments") or []
    return {str(e["code"]): str(e["text"]) for e in entries}


def add_comment(
    session: Session,
    case_id: int,
    text: str,
    username: str,
    canned: str | None = None,
    settings: Settings | None = None,
) -> CaseComment:
    """A result comment (sent as NTE on sign-out): free ``text``, or the text of the site's
    ``canned`` comment (with ``text`` after it)."""
    case = get_case(session, case_id)
    if canned is not None:
        known = canned_comments(settings) if settings else {}
        if canned not in known:
            raise Invalid(f"no canned comment {canned!r}; one of {', '.join(known)}")
        text = f"{known[canned]} {text.strip()}"
    text = text.strip()
    if not 0 < len(text) <= MAX_COMMENT:
        raise Invalid(f"a comment has 1 to {MAX_COMMENT} characters")
    comment = CaseComment(case_id=case.id, username=username, text=text)
    session.add(comment)
    session.flush()
    audit(session, username, "comment.add", case.id, after={"comment_id": comment.id, "text": text})
    return comment


def _review_state(case: Case) -> dict[str, Any]:
    return copy.deepcopy((case.result or {}).get("review") or {})


def _set_review(case: Case, review: dict[str, Any]) -> None:
    """A new result dict, so that the change is seen (and the case version counts up)."""
    case.result = {**(case.result or {}), "review": review}


def open_flags(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Flags that hold the result and nobody has acknowledged yet."""
    acknowledged = ((result.get("review") or {}).get("acknowledged")) or {}
    return [
        f
        for f in result.get("flags") or []
        if f["severity"] != "info" and f["code"] not in acknowledged
    ]


def acknowledge_flag(
    session: Session,
    pipeline: Pipeline,
    case_id: int,
    code: str,
    reason: str,
    version: int,
    username: str,
) -> Case:
    """A reviewer has seen flag ``code`` and judged it (``reason`` where the rule asks)."""
    case = _case_to_change(session, case_id, version)
    if case.status != CaseStatus.REVIEW or case.result is None:
        raise Conflict(f"case {case_id} is {case.status.value}, not in review")
    flag = next((f for f in case.result.get("flags") or [] if f["code"] == code), None)
    if flag is None or flag["severity"] == "info":
        raise NotFound(f"case {case_id} has no review flag {code}")
    reason = reason.strip()
    if len(reason) > MAX_COMMENT:
        raise Invalid(f"a reason has at most {MAX_COMMENT} characters")
    if not reason and reason_required(pipeline.rules, Flag(**flag)):
        raise Invalid(f"{code} needs a reason to be acknowledged")
    review = _review_state(case)
    entry = {
        "username": username,
        "at": datetime.now(UTC).isoformat(),
        "reason": reason,
        "text": flag["text"],
    }
    review.setdefault("acknowledged", {})[code] = entry
    _set_review(case, review)
    audit(session, username, "flag.acknowledge", case.id, after={"code": code, **entry})
    _flush(session, case_id)
    return case


def complete_technical_review(
    session: Session, pipeline: Pipeline, case_id: int, version: int, username: str
) -> Case:
    """The technologist's stage of a two-stage review: every flag acknowledged, then handed
    to a pathologist for sign-out."""
    case = _case_to_change(session, case_id, version)
    if case.status != CaseStatus.REVIEW or case.result is None:
        raise Conflict(f"case {case_id} is {case.status.value}, not in review")
    _require_acknowledged(case)
    review = _review_state(case)
    review["technical_review"] = {"username": username, "at": datetime.now(UTC).isoformat()}
    _set_review(case, review)
    audit(session, username, "case.technical_review", case.id, after=review["technical_review"])
    _flush(session, case_id)
    return case


def _require_acknowledged(case: Case) -> None:
    still_open = open_flags(case.result or {})
    if still_open:
        raise Conflict(
            "acknowledge every review flag first; open: " + ", ".join(f["code"] for f in still_open)
        )


def add_captures(session: Session, case_id: int, version: int, username: str) -> Case:
    """Count the captures that arrived after the analysis (a second slide, more fields) into
    the case under review: it is analysed again and keeps the reviewer's decisions."""
    case = _case_to_change(session, case_id, version)
    if case.status != CaseStatus.REVIEW or case.result is None:
        raise Conflict(f"case {case_id} is {case.status.value}, not in review")
    late = captures_after_analysis(case)
    if not late:
        raise Conflict(f"case {case_id} has no captures newer than its result")
    case.result = {**case.result, EXTEND_MARK: True}
    case.status = CaseStatus.QUEUED
    audit(
        session,
        username,
        "case.add_captures",
        case.id,
        before={"status": CaseStatus.REVIEW.value},
        after={"status": case.status.value, "captures": late},
    )
    _flush(session, case_id)
    return case


def case_comments(session: Session, case_id: int) -> list[CaseComment]:
    return list(
        session.scalars(
            select(CaseComment).where(CaseComment.case_id == case_id).order_by(CaseComment.id)
        )
    )


@dataclass(frozen=True)
class SignedOut:
    control_id: str
    result_status: str  # F or C
    version: int


def _reviewed_cells(result: dict[str, Any]) -> tuple[int, int]:
    leukocytes = [c for c in result.get("cells") or [] if c["kind"] == "WBC"]
    return len(reclassified(result)), len(leukocytes)


def sign_out(
    session: Session,
    pipeline: Pipeline,
    hl7: Hl7Settings,
    case_id: int,
    version: int,
    username: str,
    override: str = "",
) -> SignedOut:
    """Release the reviewed result: ORU with ``F`` (``C`` after an earlier final) in the outbox.

    Refused (409) while a review flag is open or, in two-stage mode, before the technical
    review; refused (422) below the minimum count without an ``override`` comment. Reviewers'
    comments and the override go out as NTE. The caller wakes the outbox once the
    transaction is committed.
    """
    case = _case_to_change(session, case_id, version)
    if case.status != CaseStatus.REVIEW or case.result is None:
        hint = "; change a cell to correct it" if case.status in REVIEWABLE else ""
        raise Conflict(f"case {case_id} is {case.status.value}, not in review{hint}")
    _require_acknowledged(case)
    review = _review_state(case)
    if pipeline.settings.review.two_stage and not review.get("technical_review"):
        raise Conflict("two-stage review: a technologist completes the technical review first")
    specimen, revised = _revised(pipeline, case, case.result)
    minimum = pipeline.settings.analysis.min_wbc_classified
    override = override.strip()
    now = datetime.now(UTC)
    if specimen.wbc_classified < minimum:
        if not override:
            raise Invalid(
                f"only {specimen.wbc_classified} of the minimum {minimum} leukocytes are "
                "classified: add captures, or sign out with an override comment saying why"
            )
        review["override"] = {
            "username": username,
            "at": now.isoformat(),
            "text": override[:MAX_COMMENT],
            "wbc_classified": specimen.wbc_classified,
            "minimum": minimum,
        }
        revised["review"] = review
    values = result_values(specimen, pipeline.ranges, case_context(case))
    status = "C" if case.final_sent else "F"
    changed, leukocytes = _reviewed_cells(revised)
    note = Flag(
        "SIGNED_OUT",
        f"verified by {username}; {changed} of {leukocytes} leukocyte detections reclassified",
        "info",
    )
    comments = [f"{c.username}: {c.text}" for c in case_comments(session, case.id)]
    if review.get("override"):
        comments.append(
            f"override by {username}: released with {specimen.wbc_classified} of the minimum "
            f"{minimum} leukocytes: {review['override']['text']}"
        )
    control_id = queue_oru(
        session,
        case,
        values,
        [*specimen.flags, note],
        status,
        pipeline.loinc_map,
        hl7,
        as_utc(case.analysed_at) if case.analysed_at else now,
        comments=comments,
    )
    before = {"status": case.status.value, "final_sent": case.final_sent}
    case.result = revised
    case.status = CaseStatus.FINAL
    case.final_sent = True
    audit(
        session,
        username,
        SIGN_OUT_ACTION,
        case.id,
        before=before,
        after={
            "status": case.status.value,
            "result_status": status,
            "control_id": control_id,
            "values": {v.key: v.value for v in values},
            "override": review.get("override"),
        },
    )
    _flush(session, case_id)
    return SignedOut(control_id, status, case.version)


def captures_after_analysis(case: Case) -> int:
    """Captures stored since the result was made: a case with reviewer decisions keeps them
    out of its result until someone re-analyses it (which discards those decisions)."""
    if case.analysed_at is None:
        return 0
    analysed = as_utc(case.analysed_at)
    return sum(1 for i in case.instances if as_utc(i.received_at) > analysed)


#: Most worklist entries one request returns: the page and the API page through the rest.
WORKLIST_MAX = 500


@dataclass(frozen=True)
class WorklistPage:
    entries: list[dict[str, Any]]
    total: int  # cases waiting for review, on every page


def worklist(
    session: Session,
    now: datetime | None = None,
    *,
    limit: int = 100,
    offset: int = 0,
) -> WorklistPage:
    """Cases waiting for review: STAT first, then the longest waiting, ``limit`` from
    ``offset``. Reads the cases' summaries only, never their cells."""
    now = now or datetime.now(UTC)
    limit = max(1, min(limit, WORKLIST_MAX))
    waiting_since = func.coalesce(Case.analysed_at, Case.updated_at)
    waiting = Case.status == CaseStatus.REVIEW
    rows = session.execute(
        select(
            Case.id,
            Case.accession_number,
            Case.patient,
            Case.stat,
            Case.summary,
            Case.version,
            waiting_since.label("since"),
        )
        .where(waiting)
        .order_by(Case.stat.desc(), waiting_since, Case.id)
        .limit(limit)
        .offset(max(offset, 0))
    ).all()
    total = session.scalar(select(func.count()).select_from(Case).where(waiting)) or 0
    entries = []
    for row in rows:
        since = as_utc(row.since)
        summary = row.summary or {}
        patient = row.patient or {}
        entries.append(
            {
                "id": row.id,
                "accession_number": row.accession_number,
                "patient_id": patient.get("id"),
                "patient_name": ", ".join(
                    p for p in (patient.get("name_family"), patient.get("name_given")) if p
                ),
                "stat": bool(row.stat),
                "reasons": summary.get("reasons") or [],
                "waiting_seconds": max((now - since).total_seconds(), 0.0),
                "waiting_since": since,
                "wbc_classified": summary.get("wbc_classified", 0),
                "version": row.version,
            }
        )
    return WorklistPage(entries, total)


# --- images ----------------------------------------------------------------------------------


def _field(case: Case, index: int) -> Field:
    """The analysed field ``index`` of a case, decoded from its stored DICOM instance."""
    fields = (case.result or {}).get("fields") or []
    if not 0 <= index < len(fields):
        raise NotFound(f"case {case.id} has {len(fields)} fields")
    uid, _, frame = fields[index]["source"].partition("#frame=")
    instance = next((i for i in case.instances if i.sop_instance_uid == uid), None)
    if instance is None:
        raise NotFound(f"field {index} of case {case.id} is not a stored DICOM instance")
    number = int(frame or 1)
    try:
        return read_frame(instance.path, number)  # that frame alone, however many there are
    except UnusableInstance as exc:
        raise NotFound(f"instance {uid}: {exc.reason}") from None


def field_cells(case: Case, index: int) -> list[dict[str, Any]]:
    """The cells of field ``index`` as the result holds them (outlines included)."""
    result = case.result or {}
    if not 0 <= index < len(result.get("fields") or []):
        raise NotFound(f"case {case.id} has {len(result.get('fields') or [])} fields")
    return [c for c in result.get("cells") or [] if c["field"] == index]


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def field_png(case: Case, index: int) -> bytes:
    return png(_field(case, index).image)


def _cell(case: Case, cell_id: int) -> dict[str, Any]:
    cells = (case.result or {}).get("cells") or []
    if not 0 <= cell_id < len(cells):
        raise NotFound(f"case {case.id} has no cell {cell_id}")
    return cells[cell_id]


def cell_crop(
    case: Case,
    cell_id: int,
    out_size: int = PBC_CROP_PX,
    decoded: dict[int, Field] | None = None,
) -> np.ndarray:
    """The scale-normalised window the classifier saw (same scale evidence as the analysis).

    ``out_size`` above the classifier's 160 px shows the same window with more of the
    field's detail, where the field has it. ``decoded``: fields already decoded, by index,
    kept there as they are decoded (many cells of one case: each field decoded once).
    """
    cell = _cell(case, cell_id)
    index = int(cell["field"])
    if decoded is None:
        field = _field(case, index)
    else:
        if index not in decoded:
            decoded[index] = _field(case, index)
        field = decoded[index]
    height, width = field.image.shape[:2]
    neighbours = [
        Detection(c["kind"], c["score"], tuple(c["box"]))  # type: ignore[arg-type]
        for c in case.result["cells"]  # type: ignore[index]
        if c["field"] == cell["field"]
    ]
    box = tuple(cell["box"])
    described = case.result["fields"][cell["field"]]  # type: ignore[index]  # _field checked it
    scale = pbc_scale(
        field.pixel_spacing_um,
        median_rbc_diameter(neighbours, width, height),
        box,  # type: ignore[arg-type]
        shared=described.get("shared_scale"),
    )
    # cut as the analysis cut it (``leukocyte_crops``): a circular stop's black painted as glass
    return leukocyte_crop(in_view(field.image), box, scale, out_size)  # type: ignore[arg-type]


def cell_stain_reference(case: Case, cell_id: int) -> np.ndarray | None:
    """The stain reference the cell's crop was classified against (its field's
    ``stain_reference``, the specimen's chromatin); None: its crop was its own reference
    (or the result was stored before the reference was kept)."""
    described = case.result["fields"][_cell(case, cell_id)["field"]]  # type: ignore[index]
    reference = described.get("stain_reference")
    return None if reference is None else np.asarray(reference, dtype=np.float32)


def case_classifier(
    case: Case, classifier: LeukocyteClassifier, reference: np.ndarray | None
) -> LeukocyteClassifier:
    """The classifier as it read the case's cells: its features normalised on the case's
    leukocytes where the model does that (``specimen_norms``). The statistics are measured
    again on the leukocytes the result keeps, which are all of them unless a field failed
    quality control (its cells are not kept; then the answer may differ by a little)."""
    leukocytes = [c for c in case.result["cells"] if c["kind"] == "WBC"]  # type: ignore[index]
    chosen = specimen_sample(classifier, len(leukocytes))
    if not chosen:
        return classifier
    decoded: dict[int, Field] = {}
    crops = [cell_crop(case, int(leukocytes[i]["id"]), decoded=decoded) for i in chosen]
    return specimen_classifier(classifier, crops, reference)


class SaliencyCache:
    """Occlusion maps are costly (about 150 classifier runs): one at a time, and kept."""

    def __init__(self, size: int = 256) -> None:
        self._lock = threading.Lock()
        self._images: OrderedDict[tuple[Any, ...], tuple[bytes, str, float]] = OrderedDict()
        self._size = size

    def render(self, case: Case, cell_id: int, pipeline: Pipeline) -> tuple[bytes, str, float]:
        """PNG of the part of the cell's window the classifier sees, with its saliency overlaid
        (320 px), the top class and its probability."""
        if _cell(case, cell_id)["kind"] != "WBC":
            raise Invalid(f"cell {cell_id} is not a leukocyte detection; it was not classified")
        key = (case.id, case.analysed_at, cell_id, pipeline.classifier.version)
        with self._lock:
            if key not in self._images:
                crop = cell_crop(case, cell_id)
                reference = cell_stain_reference(case, cell_id)
                classifier = case_classifier(case, pipeline.classifier, reference)
                found = occlusion_sensitivity(crop, classifier, nucleus=reference)
                seen = found.seen(crop)  # the part the classifier looks at
                overlay = Image.fromarray(heat_overlay(seen, found.heat))
                image = np.asarray(overlay.resize((PBC_CROP_PX * 2, PBC_CROP_PX * 2)))
                self._images[key] = (png(image), found.top_class, found.probability)
                while len(self._images) > self._size:
                    self._images.popitem(last=False)
            self._images.move_to_end(key)
            return self._images[key]
