"""The analyser's WBC and platelet counts arriving after the order: absolute counts, rules again.

The counts are kept with the case's order (``order["analyser_counts"]``; they take precedence
over counts an order's OBX carried, being the analyser's own later word) and, once the case has
a result, the result is evaluated again with them, as a reviewer's change would be: absolute
counts per class (26499-4 ... 30392-5), the ABS_* rules, and the smear's platelet estimate
against the analyser's count (PLT_ESTIMATE_XCHECK). What then goes to the LIS is what a
laboratory expects of a result that gains information after its release:

* not analysed yet: nothing; the analysis uses the counts;
* in review, nothing final sent: a new preliminary (P) with the absolute counts; the case stays
  in review, and any new flag must be acknowledged before sign-out;
* released (verified or signed out) and every flag that holds a result already acknowledged
  (or none raised): a corrected result (C) with the absolute counts, at once; the differential
  it reports is the one released, so no person needs to look again;
* released, and the counts raise a flag that holds a result (e.g. ABS_NEUT_SEVERE) and nobody
  has acknowledged: the case goes back to review and nothing is sent until a pathologist signs
  it out (then C): a new critical finding is not released unseen;
* in review after a release (a reviewer reopened it): nothing now; the sign-out sends C.

The same counts again (a resent message) change nothing and are acknowledged AA again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from lisplugin.core.analysis import result_values
from lisplugin.core.revision import revise
from lisplugin.core.types import Flag
from lisplugin.hl7.ack import ErrorCode, MessageRejected
from lisplugin.hl7.analyser import AnalyserCounts
from lisplugin.service.cases import queue_oru
from lisplugin.service.outbox import as_utc
from lisplugin.service.pipeline import ANALYSER_KEY, Pipeline
from lisplugin.service.review import audit, case_comments, case_context, open_flags
from lisplugin.storage.db import Database
from lisplugin.storage.orm import Case, CaseStatus

log = logging.getLogger(__name__)

RELEASED = (CaseStatus.VERIFIED, CaseStatus.FINAL)


@dataclass(frozen=True)
class CountsApplied:
    case_id: int
    outcome: str  # unchanged, stored, preliminary, corrected or review
    control_id: str | None  # of the ORU queued, when one was


def find_case(session: Session, counts: AnalyserCounts) -> tuple[Case, str] | None:
    """The case the message is about and the field that named it: an accession number first
    (every identifier in turn), then an order's filler or placer number."""
    for source, value in counts.identifiers:
        case = session.scalar(
            select(Case).where(Case.accession_number == value).order_by(Case.id.desc()).limit(1)
        )
        if case is not None:
            return case, source
    for source, value in counts.identifiers:
        for key in ("filler_order_number", "placer_order_number"):
            case = session.scalar(
                select(Case)
                .where(Case.order[key].as_string() == value)
                .order_by(Case.id.desc())
                .limit(1)
            )
            if case is not None:
                return case, source
    return None


def apply_analyser_counts(
    db: Database, pipeline: Pipeline, counts: AnalyserCounts
) -> CountsApplied:
    """Keep the counts with their case and act on them (module docstring), in one transaction.

    ``MessageRejected`` (AE) for a specimen no case knows, or a patient other than the case's.
    """
    return db.transaction(lambda session: _apply(session, pipeline, counts))


def _apply(session: Session, pipeline: Pipeline, counts: AnalyserCounts) -> CountsApplied:
    found = find_case(session, counts)
    if found is None:
        shown = ", ".join(f"{source} {value}" for source, value in counts.identifiers)
        raise MessageRejected(
            ErrorCode.UNKNOWN_KEY_IDENTIFIER,
            f"no case for {shown}: send the order (or the captures) first",
            counts.location(counts.identifiers[0][0]),
        )
    case, source = found
    known = (case.patient or {}).get("id") or ""
    if counts.patient_id and known and counts.patient_id.casefold() != known.casefold():
        log.warning("case %s: analyser counts for another patient refused", case.id)
        raise MessageRejected(  # the identifiers are PHI: not repeated
            ErrorCode.APPLICATION_INTERNAL_ERROR,
            f"PID-3 is not the patient of the case {source} names: check the specimen",
            "PID^1^3",
            ack_code="AE",
        )
    order = dict(case.order or {})
    before = dict(order.get(ANALYSER_KEY) or {})
    new = {
        "wbc_count": counts.wbc_count if counts.wbc_count is not None else before.get("wbc_count"),
        "platelet_count": counts.platelet_count
        if counts.platelet_count is not None
        else before.get("platelet_count"),
    }
    if before and {k: before.get(k) for k in new} == new:
        return CountsApplied(case.id, "unchanged", None)
    order[ANALYSER_KEY] = {
        **new,
        "control_id": counts.control_id,
        "message_type": counts.message_type,
        "sender": counts.sender,
        "matched_by": source,
        "observed_at": counts.observed_at.isoformat() if counts.observed_at else None,
        "received_at": datetime.now(UTC).isoformat(),
    }
    case.order = order
    audit(
        session,
        f"hl7:{counts.sender or 'analyser'}",
        "analyser.counts",
        case.id,
        before={k: before.get(k) for k in new},
        after={**new, "control_id": counts.control_id, "status": case.status.value},
    )
    if case.result is None or case.status not in (CaseStatus.REVIEW, *RELEASED):
        session.flush()
        return CountsApplied(case.id, "stored", None)
    return _reevaluate(session, pipeline, case, counts)


def _reevaluate(
    session: Session, pipeline: Pipeline, case: Case, counts: AnalyserCounts
) -> CountsApplied:
    """The case's result with the new counts, and the message a laboratory expects of it."""
    assert case.result is not None
    context = case_context(case)
    specimen, revised = revise(case.result, pipeline.rules, pipeline.ranges, context)
    review: dict[str, Any] = dict(revised.get("review") or {})
    # An acknowledgement is of what the flag said: one whose text the counts changed (an
    # absolute count, the analyser's platelets) is asked for again.
    said = {f["code"]: f["text"] for f in revised.get("flags") or []}
    acknowledged = dict(review.get("acknowledged") or {})
    stale = [c for c, a in acknowledged.items() if c in said and a.get("text") != said[c]]
    if stale:
        review["acknowledged"] = {c: a for c, a in acknowledged.items() if c not in stale}
        revised["review"] = review
    still_open = open_flags(revised)
    if still_open and review.get("technical_review"):  # it approved other flags
        revised["review"] = {k: v for k, v in review.items() if k != "technical_review"}
    before_status = case.status
    case.result = revised
    values = result_values(specimen, pipeline.ranges, context)
    observed = as_utc(case.analysed_at) if case.analysed_at else datetime.now(UTC)
    note = Flag(
        "ANALYSER_COUNTS",
        "absolute counts from the analyser's "
        + " and ".join(
            f"{name} {value:g} x10^9/L"
            for name, value in (("WBC", context.wbc_count), ("platelet", context.platelet_count))
            if value is not None
        )
        + f" ({counts.message_type} {counts.control_id})",
        "info",
    )
    outcome, control_id = "review", None
    if before_status in RELEASED and still_open:
        case.status = CaseStatus.REVIEW  # a new finding is not released unseen
    elif before_status in RELEASED:
        # The C replaces the released result: its comments and override go out again.
        comments = [f"{c.username}: {c.text}" for c in case_comments(session, case.id)]
        if override := review.get("override"):
            comments.append(
                f"override by {override['username']}: released with "
                f"{override['wbc_classified']} of the minimum {override['minimum']} "
                f"leukocytes: {override['text']}"
            )
        control_id = queue_oru(
            session,
            case,
            values,
            [*specimen.flags, note],
            "C",
            pipeline.loinc_map,
            pipeline.settings.hl7,
            observed,
            comments=comments,
        )
        case.final_sent = True
        outcome = "corrected"
    elif not case.final_sent:  # in review, only a preliminary sent so far
        control_id = queue_oru(
            session,
            case,
            values,
            [*specimen.flags, note],
            "P",
            pipeline.loinc_map,
            pipeline.settings.hl7,
            observed,
        )
        outcome = "preliminary"
    audit(
        session,
        f"hl7:{counts.sender or 'analyser'}",
        "analyser.reevaluate",
        case.id,
        before={"status": before_status.value},
        after={
            "status": case.status.value,
            "outcome": outcome,
            "control_id": control_id,
            "open_flags": [f["code"] for f in still_open],
            "acknowledgements_withdrawn": stale,
        },
    )
    session.flush()
    log.info("case %s: analyser counts applied, %s", case.id, outcome)
    return CountsApplied(case.id, outcome, control_id)
