"""Orders for a case whose result was released (issue 10, finding 5): an XO that changes the
patient, or a CA, is answered AE and applied to nothing; the same order re-sent is still AA.

Through the daemon's order listener (``Runtime.accept_order``) over a real MLLP connection, on
SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hl7.client import MLLPClient
from sqlalchemy import select
from test_hl7_mllp import free_port, unframe

from lisplugin.config import Settings
from lisplugin.hl7.lis_sim import build_test_order
from lisplugin.hl7.mllp import BackgroundServer
from lisplugin.hl7.oru import parse_ack
from lisplugin.service.runtime import Runtime
from lisplugin.storage.orm import Case, CaseStatus, OrderMessage

pytestmark = pytest.mark.reliability

ORIGINAL = {"accession": "ACC-ID1", "patient_id": "PAT-1", "family": "ROE", "given": "ANN"}


@pytest.fixture
def runtime(database_url: str, tmp_path: Path) -> Iterator[Runtime]:
    settings = Settings(
        storage={"path": tmp_path / "var"},
        database={"url": database_url},
        hl7={"listen_host": "127.0.0.1", "listen_port": free_port()},
    )
    daemon = Runtime(settings)
    daemon.mllp.start()
    yield daemon
    daemon.mllp.stop()
    daemon.db.dispose()


def send(mllp: BackgroundServer, message: str) -> tuple[str, str, str]:
    with MLLPClient("127.0.0.1", mllp.server.port) as client:
        return parse_ack(unframe(client.send_message(message)))


def released(runtime: Runtime, status: CaseStatus) -> None:
    assert send(runtime.mllp, build_test_order(**ORIGINAL, control_id="O-1"))[0] == "AA"
    with runtime.db.session() as session:
        session.scalars(select(Case)).one().status = status  # a result went to the LIS


@pytest.mark.parametrize("status", [CaseStatus.REVIEW, CaseStatus.VERIFIED, CaseStatus.FINAL])
@pytest.mark.parametrize(
    "change",
    [
        {"family": "SMITH", "order_control": "XO"},
        {"patient_id": "PAT-2", "order_control": "XO"},
        {"order_control": "CA"},
    ],
    ids=["other-name", "other-id", "cancel"],
)
def test_order_changing_a_released_case_is_refused(
    runtime: Runtime, status: CaseStatus, change: dict[str, str]
) -> None:
    released(runtime, status)
    code, control_id, text = send(
        runtime.mllp, build_test_order(**{**ORIGINAL, **change}, control_id="O-2")
    )
    assert (code, control_id) == ("AE", "O-2")
    assert "already released" in text and "SMITH" not in text and "PAT-2" not in text
    with runtime.db.session() as session:
        case = session.scalars(select(Case)).one()
        assert (case.status, case.patient["name_family"], case.patient["id"]) == (
            status,
            "ROE",
            "PAT-1",
        )
        assert session.scalars(select(OrderMessage.control_id)).all() == ["O-1"]


def test_same_order_again_after_release_is_accepted(runtime: Runtime) -> None:
    released(runtime, CaseStatus.VERIFIED)
    again = build_test_order(**ORIGINAL, order_control="XO", control_id="O-3")
    assert send(runtime.mllp, again)[0] == "AA"
