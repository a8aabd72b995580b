"""The scheduled orders the Modality Worklist SCP answers with: cases with an order, no result.

A case is scheduled from the order's arrival (ORM^O01 / OML^O21) until it is analysed; a
cancelled order leaves the worklist. The Study Instance UID is the case's own once a capture
arrived, else one derived from the case key, the same on every query, so captures made from
the worklist share one study.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydicom.uid import generate_uid
from sqlalchemy import select

from lisplugin.dicom.mwl import MAX_MATCHES, WorklistItem
from lisplugin.storage.db import Database
from lisplugin.storage.orm import Case, CaseStatus

SCHEDULED = (CaseStatus.AWAITING_IMAGES, CaseStatus.RECEIVING)


def _scheduled_at(order: dict[str, Any], case: Case) -> datetime:
    collected = order.get("collected_at")
    if collected:
        return datetime.fromisoformat(collected)
    created = case.created_at
    return created if created.tzinfo else created.replace(tzinfo=UTC)


def scheduled_orders(db: Database) -> list[WorklistItem]:
    with db.session() as session:
        cases = session.scalars(
            select(Case)
            .where(Case.status.in_(SCHEDULED))
            .where(Case.order.is_not(None))
            .order_by(Case.id.desc())
            .limit(MAX_MATCHES)
        ).all()
        items = []
        for case in cases:
            order, patient = case.order or {}, case.patient or {}
            if not order:  # a JSON null
                continue
            referring = "^".join(
                [
                    order.get("ordering_provider_family_name", ""),
                    order.get("ordering_provider_given_name", ""),
                ]
            ).rstrip("^")
            items.append(
                WorklistItem(
                    accession_number=case.accession_number or "",
                    patient_id=patient.get("id", ""),
                    patient_id_issuer=patient.get("id_authority", ""),
                    patient_family_name=patient.get("name_family", ""),
                    patient_given_name=patient.get("name_given", ""),
                    patient_birth_date=patient.get("birth_date", ""),
                    patient_sex=patient.get("sex", ""),
                    study_instance_uid=case.study_instance_uid
                    or generate_uid(entropy_srcs=["lisplugin-mwl", case.case_key]),
                    requested_procedure_id=order.get("placer_order_number", "")
                    or case.accession_number
                    or "",
                    requested_procedure_code=order.get("test_code", ""),
                    requested_procedure_coding_scheme=order.get("test_coding_system", ""),
                    requested_procedure_description=order.get("test_text", ""),
                    priority=order.get("priority", ""),
                    scheduled_at=_scheduled_at(order, case),
                    referring_physician=referring,
                )
            )
        return items
