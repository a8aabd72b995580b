"""Result delivery order and failure handling (issue 10, findings 1, 7 and 8).

The outbox sends real ORUs over MLLP to the LIS simulator, which is stopped and started again on
its port to play an LIS outage. Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import yaml
from sqlalchemy import select
from test_hl7_mllp import free_port

from lisplugin.config import REPO_ROOT, Hl7Settings, Settings
from lisplugin.core.types import ResultValue
from lisplugin.hl7.ack import ReceivedHeader
from lisplugin.hl7.lis_sim import LisSimulator
from lisplugin.hl7.oru import build_oru
from lisplugin.service.metrics import OUTBOX_FAILURES
from lisplugin.service.outbox import OutboxWorker, needing_attention
from lisplugin.service.runtime import hl7_sender
from lisplugin.storage.db import Database
from lisplugin.storage.orm import Case, CaseStatus, OutboxMessage, OutboxStatus

pytestmark = pytest.mark.reliability

LOINC = yaml.safe_load((REPO_ROOT / "config" / "loinc.yaml").read_text(encoding="utf-8"))
BACKOFF = 30.0


class Lis:
    """The LIS simulator on a fixed port that can go down and come back."""

    def __init__(self, *, reject: bool = False, fail_first: int = 0) -> None:
        self.port = free_port()
        self.reject, self.fail_first = reject, fail_first
        self.sim: LisSimulator | None = None
        self.received: list[str] = []

    def up(self) -> None:
        self.sim = LisSimulator(
            port=self.port, reject=self.reject, fail_first=self.fail_first
        ).start()

    def down(self) -> None:
        if self.sim is not None:
            self.received += self.sim.received
            self.sim.stop()
            self.sim = None

    def control_ids(self) -> list[str]:
        messages = self.received + (self.sim.received if self.sim else [])
        return [ReceivedHeader(m).control_id for m in messages]


@pytest.fixture
def lis() -> Iterator[Lis]:
    peer = Lis()
    yield peer
    peer.down()


def worker(db: Database, lis: Lis, **kwargs: int) -> OutboxWorker:
    settings = Settings(hl7=Hl7Settings(lis_port=lis.port, ack_timeout_seconds=3))
    return OutboxWorker(
        db, {"hl7": hl7_sender(settings)}, backoff=lambda attempt: BACKOFF, **kwargs
    )


def new_case(db: Database, key: str) -> int:
    with db.session() as session:
        case = Case(case_key=key, status=CaseStatus.REVIEW, patient={})
        session.add(case)
        session.flush()
        return case.id


def queue(db: Database, case_id: int, control_id: str, status: str) -> None:
    """An ORU as the scheduler and sign-out queue them (valid for the LIS simulator)."""
    message = build_oru(
        [ResultValue("neutrophil_pct", 61.0, "%", 40, 75), ResultValue("wbc_classified", 150, "")],
        [],
        status,  # type: ignore[arg-type]
        None,
        {"id": "PAT1", "name_family": "DOE", "accession_number": f"ACC{case_id}"},
        LOINC,
        control_id,
        Hl7Settings(),
        datetime.now(UTC),
    )
    with db.session() as session:
        session.add(
            OutboxMessage(
                case_id=case_id,
                channel="hl7",
                control_id=control_id,
                result_status=status,
                payload=message,
                status=OutboxStatus.PENDING,
            )
        )


def statuses(db: Database) -> dict[str, OutboxStatus]:
    with db.session() as session:
        return {m.control_id: m.status for m in session.scalars(select(OutboxMessage))}


def test_final_after_an_outage_supersedes_the_unsent_preliminary(db: Database, lis: Lis) -> None:
    """The issue's sign-out during an LIS outage: P fails, the F is queued, the LIS returns.
    The P must never reach the LIS after the F; as the F replaces it, it is not sent at all."""
    case = new_case(db, "acc:OUTAGE")
    outbox = worker(db, lis)
    queue(db, case, "LP1-1", "P")
    now = datetime.now(UTC)
    assert outbox.run_once(now) == 1  # LIS down: no answer, P backs off
    queue(db, case, "LP1-2", "F")  # signed out meanwhile
    lis.up()
    for later in (1, BACKOFF + 1, 3 * BACKOFF):
        outbox.run_once(now + timedelta(seconds=later))
    assert lis.control_ids() == ["LP1-2"]
    assert statuses(db) == {"LP1-1": OutboxStatus.SUPERSEDED, "LP1-2": OutboxStatus.DELIVERED}


def test_a_cases_messages_leave_in_order_and_resends_keep_msh10(db: Database, lis: Lis) -> None:
    case, other = new_case(db, "acc:ORDER"), new_case(db, "acc:OTHER")
    outbox = worker(db, lis)
    queue(db, case, "LP2-1", "F")
    now = datetime.now(UTC)
    assert outbox.run_once(now) == 1  # down: F backs off
    queue(db, case, "LP2-2", "C")
    queue(db, other, "LP3-1", "F")
    lis.up()
    outbox.run_once(now + timedelta(seconds=BACKOFF / 2))  # C waits behind F; the other goes
    assert lis.control_ids() == ["LP3-1"]
    outbox.run_once(now + timedelta(seconds=BACKOFF + 1))  # F, then C behind it
    assert lis.control_ids() == ["LP3-1", "LP2-1", "LP2-2"]
    assert set(statuses(db).values()) == {OutboxStatus.DELIVERED}


def test_silent_receiver_costs_one_timeout_per_pass(db: Database, lis: Lis) -> None:
    """With the LIS down, one pass tries one message, not every case's (each would wait the
    ACK timeout and hold up every other channel)."""
    for n in range(4):
        queue(db, new_case(db, f"acc:SILENT{n}"), f"LP4-{n}", "F")
    outbox = worker(db, lis)
    assert outbox.run_once() == 1


def _failures(outcome: str) -> float:
    return OUTBOX_FAILURES.labels("hl7", outcome)._value.get()


def test_ar_is_retried_then_parked_and_shows_as_degraded(db: Database) -> None:
    lis = Lis(reject=True)
    lis.up()
    try:
        case = new_case(db, "acc:AR")
        queue(db, case, "LP5-1", "F")
        outbox = worker(db, lis, max_attempts_refused=3)
        refused, parked = _failures("refused"), _failures("parked")
        now = datetime.now(UTC) + timedelta(seconds=1)
        for n in range(5):
            outbox.run_once(now + timedelta(seconds=n * (BACKOFF + 1)))
        assert lis.control_ids() == ["LP5-1"] * 3  # same MSH-10 each time, then parked
        assert statuses(db) == {"LP5-1": OutboxStatus.REJECTED}
        assert (_failures("refused") - refused, _failures("parked") - parked) == (3, 1)
        assert needing_attention(db, 600)["outbox_parked"] == 1
    finally:
        lis.down()


def test_ae_is_parked_at_once_until_a_later_result_is_delivered(db: Database) -> None:
    lis = Lis(fail_first=1)
    lis.up()
    try:
        case = new_case(db, "acc:AE")
        queue(db, case, "LP6-1", "F")
        outbox = worker(db, lis)
        errors = _failures("error")
        outbox.run_once()
        outbox.run_once(datetime.now(UTC) + timedelta(seconds=BACKOFF + 1))
        assert lis.control_ids() == ["LP6-1"]
        assert _failures("error") - errors == 1
        assert needing_attention(db, 600) == {"outbox_parked": 1, "outbox_overdue": 0}
        queue(db, case, "LP6-2", "C")  # corrected and sent again: the LIS has a result
        outbox.run_once()
        assert needing_attention(db, 600) == {"outbox_parked": 0, "outbox_overdue": 0}
    finally:
        lis.down()


def test_overdue_results_show_as_degraded(db: Database) -> None:
    queue(db, new_case(db, "acc:LATE"), "LP7-1", "F")
    assert needing_attention(db, 600)["outbox_overdue"] == 0
    assert needing_attention(db, -1)["outbox_overdue"] == 1
