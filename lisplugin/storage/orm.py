"""Database tables (SQLAlchemy 2 typed ORM). The schema is created by Alembic migrations only."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Enum,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    event,
    inspect,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Mapper, mapped_column, relationship

from lisplugin.core.report import result_summary


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class CaseStatus(enum.StrEnum):
    AWAITING_IMAGES = "awaiting_images"  # order known, no capture yet
    RECEIVING = "receiving"  # captures arriving, waiting for the case to be stable
    QUEUED = "queued"  # stable or triggered; analysis pending (survives restarts)
    REVIEW = "review"  # analysed, flagged, preliminary result sent
    VERIFIED = "verified"  # analysed, passed every rule, final result sent
    FINAL = "final"  # signed out by a pathologist
    FAILED = "failed"  # analysis failed; see error
    CANCELLED = "cancelled"  # the LIS cancelled the order (ORC-1 CA/DC); not analysed


class OutboxStatus(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"  # AA
    REJECTED = "rejected"  # parked: AE, or AR past the retry bound; needs attention
    SUPERSEDED = "superseded"  # an unsent P replaced by a later F/C of its case: never sent


def _enum(cls: type[enum.StrEnum]) -> Enum:
    return Enum(cls, native_enum=False, length=32, values_callable=lambda e: [m.value for m in e])


class Case(Base):
    """A specimen: every capture and the order that share an accession number (or study UID)."""

    __tablename__ = "cases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_key: Mapped[str] = mapped_column(String(128), unique=True)
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    status: Mapped[CaseStatus] = mapped_column(_enum(CaseStatus), index=True)
    patient: Mapped[dict[str, Any]] = mapped_column(default=dict)  # id, name, birth_date, sex
    order: Mapped[dict[str, Any] | None] = mapped_column(default=None)  # parsed HL7 order
    result: Mapped[dict[str, Any] | None] = mapped_column(default=None)  # specimen result JSON
    #: Derived from ``result`` on every write (see ``_derive_summary``): what lists read.
    summary: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    #: Derived from ``order``: the order's priority is STAT (lists sort on it in SQL).
    stat: Mapped[bool] = mapped_column(default=False)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    last_instance_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    analysed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    final_sent: Mapped[bool] = mapped_column(default=False)  # an F result reached the outbox
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )
    #: Optimistic-locking counter: concurrent editors see a conflict instead of overwriting.
    version: Mapped[int] = mapped_column(Integer, default=1)
    #: The process analysing the case and until when its claim holds (``service.claims``):
    #: another process takes a queued case over only once the claim has run out.
    claimed_by: Mapped[str | None] = mapped_column(String(64), default=None)
    claimed_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)

    instances: Mapped[list[Instance]] = relationship(back_populates="case", order_by="Instance.id")

    __mapper_args__ = {"version_id_col": version}


@event.listens_for(Case, "before_insert")
@event.listens_for(Case, "before_update")
def _derive_summary(_mapper: Mapper[Case], _connection: Any, case: Case) -> None:
    """Keep the list columns in step with the result and the order, whoever writes them."""
    state = inspect(case)
    if state.pending or state.attrs.result.history.has_changes():
        case.summary = result_summary(case.result)
    if state.pending or state.attrs.order.history.has_changes():
        case.stat = (case.order or {}).get("priority") == "S"
    moved_on = state.attrs.status.history.has_changes()
    if moved_on and not state.attrs.claimed_by.history.has_changes():
        # A case whose state moved on (analysed, re-opened by a capture, re-queued) is nobody's
        # work any more: whoever queues it next must not wait for an old claim to run out.
        case.claimed_by = None
        case.claimed_until = None


class Instance(Base):
    """A stored DICOM instance (the file is fsync'd before the row is committed)."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    frames: Mapped[int] = mapped_column(Integer, default=1)
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    case: Mapped[Case] = relationship(back_populates="instances")


class QuarantinedInstance(Base):
    """An instance refused with a DICOM failure status, kept with the reason."""

    __tablename__ = "quarantine"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class OrderMessage(Base):
    """Every accepted order message, as received, for traceability."""

    __tablename__ = "order_messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"), index=True)
    control_id: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class PendingReport(Base):
    """A case whose reports must be made again: added in the transaction that releases a
    result, removed once the reports are on disk, so that a stop in between is caught up."""

    __tablename__ = "pending_reports"

    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"), primary_key=True)
    due_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class OutboxMessage(Base):
    """A message waiting for (or past) delivery; a resend keeps its control id."""

    __tablename__ = "outbox"
    __table_args__ = (UniqueConstraint("channel", "control_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"), index=True)
    channel: Mapped[str] = mapped_column(String(16))  # "hl7" (LIS) or "dicom" (PACS)
    control_id: Mapped[str] = mapped_column(String(64))
    result_status: Mapped[str] = mapped_column(String(1))  # P, F or C
    payload: Mapped[str] = mapped_column(Text)
    status: Mapped[OutboxStatus] = mapped_column(_enum(OutboxStatus), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    ack_code: Mapped[str | None] = mapped_column(String(16))  # HL7 MSA-1 or DICOM status
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: The process sending the message and until when (no other process sends it meanwhile).
    claimed_by: Mapped[str | None] = mapped_column(String(64), default=None)
    claimed_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
