"""The analyser's WBC and platelet counts arriving after the order, over real MLLP.

An OML^O21 without counts and a capture make a case in review (P to the LIS simulator); the
analyser's ORU^R01 (then OUL^R22) with the WBC count, sent by python-hl7's MLLP client to the
daemon's listener, adds absolute counts and the ABS_* flags to the next result: a new P while in
review, held for review after the sign-out when it raises a new finding, and a corrected C
when it raises none. Unknown specimens, malformed counts and another patient are answered AE
with ERR; nothing is changed by them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hl7
import httpx
import pytest
from hl7.client import MLLPClient
from review_support import (
    PASSWORD,
    GroundTruthDetector,
    ReviewRuntime,
    ServerThread,
    acknowledge_all,
    free_port,
    ingest,
    obx_values,
    review_capture,
)
from sqlalchemy import func, select

from lisplugin.config import Settings
from lisplugin.hl7.lis_sim import LisSimulator
from lisplugin.hl7.oru import parse_ack
from lisplugin.http.app import create_app
from lisplugin.service.pipeline import Pipeline
from lisplugin.service.users import hash_password
from lisplugin.storage.orm import OutboxMessage
from lisplugin.storage.orm_review import AuditEvent, Role, User

ACCESSION, PATIENT = "ACC8001", "PAT8001"

OML = "\r".join(
    [
        "MSH|^~\\&|LIS|LAB|LISPLUGIN|LAB|20240315091500||OML^O21^OML_O21|ORD8001|P|2.5.1",
        f"PID|1||{PATIENT}^^^HOSP^MR||DOE^JANE||19800101|F",
        f"ORC|NW|PL8001|{ACCESSION}",
        f"OBR|1|PL8001|{ACCESSION}|69738-3^Differential panel, method unspecified - Blood^LN",
        f"SPM|1|{ACCESSION}||BLDV^Blood venous^HL70487",
    ]
)


def analyser_result(
    control_id: str,
    wbc: str | None,
    platelets: str | None = None,
    *,
    message_type: str = "ORU^R01",
    accession: str = ACCESSION,
    placer: str = "PL8001",
    patient: str = PATIENT,
) -> str:
    """The CBC as the analyser's middleware forwards it (ORU^R01, or OUL^R22 with an SPM)."""
    obx = [
        ("6690-2^Leukocytes^LN", wbc),
        ("718-7^Hemoglobin^LN", "13.1"),
        ("777-3^PLT^LN", platelets),
    ]
    lines = [
        f"MSH|^~\\&|XN-LINK|LAB|LISPLUGIN|LAB|20240315094200||{message_type}|{control_id}|P|2.5.1",
        f"PID|1||{patient}^^^HOSP^MR||DOE^JANE||19800101|F",
    ]
    if message_type.startswith("OUL"):
        lines += [f"SPM|1|{accession}||BLDV", "OBR|1|||58410-2^CBC^LN"]
    else:
        lines += [f"ORC|RE|{placer}|{accession}", f"OBR|1|{placer}|{accession}|58410-2^CBC^LN"]
    units = {"6690-2": "10*3/uL", "718-7": "g/dL", "777-3": "10*3/uL"}
    lines += [
        f"OBX|{i + 1}|NM|{code}||{value}|{units[code.split('^')[0]]}|||||F"
        for i, (code, value) in enumerate((c, v) for c, v in obx if v is not None)
    ]
    return "\r".join(lines)


@dataclass
class Lab:
    runtime: ReviewRuntime
    lis: LisSimulator
    url: str
    mllp_port: int

    def send(self, message: str) -> tuple[str, str, str, str]:
        """MSA-1, MSA-2 and text of the ACK, and the whole ACK."""
        with MLLPClient("127.0.0.1", self.mllp_port) as client:
            ack = client.send_message(message).decode("utf-8").strip("\x0b\x1c\r")
        return (*parse_ack(ack), ack)

    def deliver(self) -> list[str]:
        """Run the outbox once; the messages the LIS received since."""
        before = len(self.lis.received)
        self.runtime.outbox.run_once()
        return self.lis.received[before:]

    def messages(self) -> int:
        with self.runtime.db.session() as session:
            return int(session.scalar(select(func.count()).select_from(OutboxMessage)) or 0)

    def client(self, username: str) -> httpx.Client:
        client = httpx.Client(base_url=self.url, timeout=60)
        token = client.post("/api/session", json={"username": username, "password": PASSWORD})
        client.headers["Authorization"] = f"Bearer {token.json()['token']}"
        return client


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lis = LisSimulator(port=free_port()).start()
    settings = Settings(
        storage={"path": tmp_path / "var"},
        database={"url": f"sqlite:///{tmp_path / 'lisplugin.db'}"},
        hl7={
            "listen_host": "127.0.0.1",
            "listen_port": free_port(),
            "lis_host": "127.0.0.1",
            "lis_port": lis.port,
            "ack_timeout_seconds": 5,
        },
    )
    detector = GroundTruthDetector()
    runtime = ReviewRuntime(settings, Pipeline.from_settings(settings), detector)
    with runtime.db.session() as session:
        session.add(
            User(username="paul", password_hash=hash_password(PASSWORD), role=Role.PATHOLOGIST)
        )
    runtime.mllp.start()
    try:
        with ServerThread(create_app(runtime), free_port()) as server:
            lab = Lab(runtime, lis, server.url, settings.hl7.listen_port)
            assert lab.send(OML)[0] == "AA"
            case_id = ingest(
                runtime, review_capture(tmp_path / "in", detector, 41, ACCESSION, PATIENT)
            )
            assert case_id == 1
            yield lab
    finally:
        runtime.mllp.stop()
        lis.stop()
        runtime.db.dispose()


def nte(message: str) -> list[str]:
    """NTE-3 of each NTE, unescaped."""
    parsed = hl7.parse(message.replace("\n", "\r"))
    return [parsed.unescape(str(s[3])) for s in parsed.segments("NTE")]


def flag_codes(case: dict[str, Any]) -> set[str]:
    return {f["code"] for f in case["result"]["flags"]}


def sign_out(client: httpx.Client) -> httpx.Response:
    version = client.get("/api/cases/1").json()["version"]
    version = acknowledge_all(client, "/api/cases/1", version)
    return client.post(
        "/api/cases/1/signout",
        json={"version": version, "override": "one field only; film reviewed by microscopy"},
    )


def test_analyser_counts_after_the_order_give_absolute_counts_and_abs_flags(lab: Lab) -> None:
    # The OML had no WBC count: the preliminary result has no absolute counts.
    [first] = lab.deliver()
    assert obx_values(first)["neutrophil_pct"][1] == "P"
    assert "neutrophil_abs" not in obx_values(first)
    paul = lab.client("paul")
    case = paul.get("/api/cases/1").json()
    assert case["status"] == "review" and not flag_codes(case) & {"ABS_NEUT", "ABS_NEUT_SEVERE"}
    share = case["result"]["differential"]["neutrophil"]

    # The analyser's ORU^R01: WBC 0.3 x10^9/L, so neutrophils are < 0.5 x10^9/L whatever share.
    code, control, _, ack = lab.send(analyser_result("XN0001", "0.3", "250"))
    assert (code, control) == ("AA", "XN0001") and "ACK^R01" in ack
    [second] = lab.deliver()
    values = obx_values(second)
    assert values["neutrophil_abs"] == (f"{round(share / 100 * 0.3, 2):.2f}", "P")
    notes = nte(second)
    assert any(n.startswith("ABS_NEUT_SEVERE (critical)") for n in notes), notes
    assert any("WBC 0.3 x10^9/L and platelet 250 x10^9/L" in n for n in notes), notes
    case = paul.get("/api/cases/1").json()
    assert case["status"] == "review" and "ABS_NEUT_SEVERE" in flag_codes(case)
    assert case["order"]["analyser_counts"]["platelet_count"] == 250.0
    assert case["order"]["analyser_counts"]["matched_by"] == "OBR-3"

    # The same message again (its ACK was lost): AA, and nothing new for the LIS.
    assert lab.send(analyser_result("XN0001", "0.3", "250"))[0] == "AA"
    assert lab.deliver() == []

    # Signed out with the new flags acknowledged: final, with the absolute counts.
    assert sign_out(paul).status_code == 200
    [final] = lab.deliver()
    assert obx_values(final)["neutrophil_abs"][1] == "F"

    # A corrected count that changes what the flags say: back to review, nothing sent ...
    messages = lab.messages()
    assert lab.send(analyser_result("XN0002", "0.2", message_type="OUL^R22"))[0] == "AA"
    case = paul.get("/api/cases/1").json()
    assert case["status"] == "review" and lab.messages() == messages
    acknowledged = case["result"]["review"]["acknowledged"]
    assert "ABS_NEUT_SEVERE" not in acknowledged  # asked again: it says 0.2 now
    assert case["order"]["analyser_counts"] == {
        **case["order"]["analyser_counts"],
        "wbc_count": 0.2,
        "platelet_count": 250.0,  # kept from the first message
        "message_type": "OUL^R22",
        "matched_by": "SPM-2.1",
    }
    # ... until a pathologist signs it out again: corrected.
    assert sign_out(paul).status_code == 200
    [corrected] = lab.deliver()
    assert obx_values(corrected)["neutrophil_abs"] == (f"{round(share / 100 * 0.2, 2):.2f}", "C")

    # New counts that change no flag's words (platelets, no estimate from one field): a
    # corrected result at once, the case stays final.
    # (named by the placer order number only, as some middleware sends it)
    assert lab.send(analyser_result("XN0003", None, "240", accession=""))[0] == "AA"
    [again] = lab.deliver()
    assert obx_values(again)["neutrophil_abs"][1] == "C"
    assert any("platelet 240 x10^9/L" in n for n in nte(again))
    assert any("one field only" in n for n in nte(again))  # the sign-out's override stays
    case = paul.get("/api/cases/1").json()
    assert case["status"] == "final" and case["order"]["analyser_counts"]["matched_by"] == "OBR-2"
    with lab.runtime.db.session() as session:
        actions = session.scalars(
            select(AuditEvent.action).where(AuditEvent.username == "hl7:XN-LINK^LAB")
        ).all()
    assert actions.count("analyser.counts") == 3


@pytest.mark.parametrize(
    ("message", "code", "where", "words"),
    [
        (
            analyser_result("XN0101", "5.0", accession="ACC0000", placer="PL0000"),
            "204",
            "OBR^1^3",
            "no case for",
        ),
        (analyser_result("XN0102", "5,0"), "102", "OBX^1^5", "not a number"),
        (analyser_result("XN0103", "5000"), "102", "OBX^1^5", "plausible"),
        (analyser_result("XN0104", "5.0", patient="PAT0000"), "207", "PID^1^3", "not the patient"),
        (analyser_result("XN0105", None), "101", "OBX^1^3", "no WBC or platelet"),
    ],
)
def test_unusable_analyser_results_are_answered_ae_and_change_nothing(
    lab: Lab, message: str, code: str, where: str, words: str
) -> None:
    lab.deliver()
    before = lab.client("paul").get("/api/cases/1").json()
    answer, control, text, ack = lab.send(message)
    assert answer == "AE" and control == message.split("|")[9], ack
    err = hl7.parse(ack.replace("\n", "\r")).segment("ERR")
    assert str(err[2]) == where and str(err[3]).startswith(code), ack
    assert words in text
    after = lab.client("paul").get("/api/cases/1").json()
    assert after["version"] == before["version"] and after["order"] == before["order"]
    assert lab.deliver() == []


def test_counts_before_the_analysis_are_used_by_it(lab: Lab, tmp_path: Path) -> None:
    lab.deliver()
    order = OML.replace(ACCESSION, "ACC8002").replace("ORD8001", "ORD8002")
    assert lab.send(order.replace("PL8001", "PL8002"))[0] == "AA"
    counts = analyser_result("XN0201", "12.5", accession="ACC8002", placer="PL8002")
    assert lab.send(counts)[0] == "AA"
    assert lab.deliver() == []  # nothing to report yet: no capture
    capture = review_capture(
        tmp_path / "more", lab.runtime.pipeline().detector, 42, "ACC8002", PATIENT
    )  # type: ignore[arg-type]
    case_id = ingest(lab.runtime, capture)
    [result] = lab.deliver()
    share = lab.client("paul").get(f"/api/cases/{case_id}").json()["result"]["differential"]
    assert (
        obx_values(result)["neutrophil_abs"][0]
        == f"{round(share['neutrophil'] / 100 * 12.5, 2):.2f}"
    )
