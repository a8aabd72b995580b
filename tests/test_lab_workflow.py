"""What a haematology laboratory needs to sign a result, over the real sockets.

The analyser's WBC count comes with the order (OML^O21 over MLLP, OBX 6690-2) and the ORU the
LIS simulator receives carries absolute counts, the ABS_* flags and the model versions. The
case under review is a synthetic capture analysed by the real ingest, scheduler and classifier
(cells from the generator's ground truth, see ``review_support``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import hl7
import httpx
import pydicom
import pytest
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

from lisplugin.config import Settings
from lisplugin.hl7.lis_sim import LisSimulator
from lisplugin.hl7.mllp import send_message
from lisplugin.http.app import create_app
from lisplugin.service import users
from lisplugin.service.pipeline import Pipeline
from lisplugin.storage.orm_review import Role, User

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def oml_o21(accession: str, patient_id: str, wbc: str, units: str = "10*9/L") -> str:
    """An OML^O21 as a LIS sends it after the analyser's CBC: the WBC count in an OBX."""
    return "\r".join(
        [
            f"MSH|^~\\&|LIS|LAB|LISPLUGIN|LAB|20261121083000||OML^O21^OML_O21|{accession}-1|P|"
            "2.5.1||||||UNICODE UTF-8",
            f"PID|1||{patient_id}^^^HOSP^MR||NGUYỄN^THỊ||19700101|F",
            f"ORC|NW|{accession}|{accession}",
            f"OBR|1|{accession}|{accession}|69738-3^Differential panel^LN",
            f"OBX|1|NM|6690-2^Leukocytes [#/volume] in Blood by Automated count^LN||{wbc}|"
            f"{units}|4.0-10.0|L|||F",
        ]
    )


@dataclass
class Lab:
    runtime: ReviewRuntime
    lis: LisSimulator
    detector: GroundTruthDetector
    folder: Path
    url: str

    def order(self, message: str) -> str:
        """Send an order over MLLP; the ACK code."""
        port = self.runtime.settings.hl7.listen_port
        return send_message("127.0.0.1", port, message, timeout=10).code

    def capture(self, seed: int, accession: str, patient_id: str) -> int:
        path = review_capture(self.folder, self.detector, seed, accession, patient_id)
        return ingest(self.runtime, path)

    def deliver(self) -> list[str]:
        """Every pending message to the LIS simulator; the ORUs it has received."""
        self.runtime.outbox.run_once()
        return [m for m in self.lis.received if "ORU^R01" in m]

    def client(self, username: str) -> httpx.Client:
        client = httpx.Client(base_url=self.url, timeout=60)
        answer = client.post("/api/session", json={"username": username, "password": PASSWORD})
        answer.raise_for_status()
        client.cookies.clear()
        client.headers["Authorization"] = f"Bearer {answer.json()['token']}"
        return client


@pytest.fixture(scope="module")
def base_pipeline() -> Pipeline:
    return Pipeline.from_settings(Settings())


@pytest.fixture(scope="module")
def password_hash() -> str:
    return users.hash_password(PASSWORD)


def make_lab(
    tmp_path: Path, database_url: str, base: Pipeline, password_hash: str, **review: object
) -> Iterator[Lab]:
    lis = LisSimulator(port=free_port()).start()
    settings = Settings(
        storage={"path": tmp_path / "var"},
        database={"url": database_url},
        hl7={
            "listen_host": "127.0.0.1",
            "listen_port": free_port(),
            "lis_host": "127.0.0.1",
            "lis_port": lis.port,
            "ack_timeout_seconds": 5,
        },
        review=review,
    )
    detector = GroundTruthDetector()
    runtime = ReviewRuntime(settings, base, detector)
    with runtime.db.session() as session:
        for name, role in (("tech", Role.TECHNOLOGIST), ("path", Role.PATHOLOGIST)):
            session.add(User(username=name, password_hash=password_hash, role=role))
    runtime.mllp.start()
    try:
        with ServerThread(create_app(runtime), free_port()) as server:
            yield Lab(runtime, lis, detector, tmp_path / "in", server.url)
    finally:
        runtime.mllp.stop()
        lis.stop()
        runtime.db.dispose()


@pytest.fixture
def lab(
    tmp_path: Path, database_url: str, base_pipeline: Pipeline, password_hash: str
) -> Iterator[Lab]:
    yield from make_lab(tmp_path, database_url, base_pipeline, password_hash)


def notes(oru: str) -> list[str]:
    return [str(s[3]) for s in hl7.parse(oru.replace("\n", "\r")) if str(s[0]) == "NTE"]


def equipment(oru: str) -> dict[str, str]:
    """OBX-3 code -> OBX-18 as sent."""
    parsed = hl7.parse(oru.replace("\n", "\r"))
    return {str(obx[3][0][0]): str(obx[18]) for obx in parsed.segments("OBX")}


def test_oml_o21_wbc_count_gives_absolute_counts_and_abs_flags(lab: Lab) -> None:
    assert lab.order(oml_o21("ACC7001", "PAT7001", "0.4")) == "AA"
    lab.capture(31, "ACC7001", "PAT7001")
    (oru,) = lab.deliver()
    values = obx_values(oru)
    share = float(values["neutrophil_pct"][0])
    absolute = float(values["neutrophil_abs"][0])
    assert absolute == pytest.approx(share / 100 * 0.4, abs=0.006)
    assert float(values["lymphocyte_abs"][0]) == pytest.approx(
        float(values["lymphocyte_pct"][0]) / 100 * 0.4, abs=0.006
    )
    codes = [n.split(" ", 1)[0] for n in notes(oru)]
    assert "ABS_NEUT_SEVERE" in codes  # < 0.5 x10^9/L whatever the neutrophil share
    # every value names the models that made it: both for the differential, the detector for
    # the counts
    sent = equipment(oru)
    detector, classifier = (lab.runtime.pipeline().detector, lab.runtime.pipeline().classifier)
    assert sent["26499-4"] == (
        f"detector {detector.version}^LISPLUGIN~classifier {classifier.version}^LISPLUGIN"
    )
    assert sent["LPL-RBC-COUNTED"] == f"detector {detector.version}^LISPLUGIN"


def test_without_a_wbc_count_there_are_no_absolute_counts(lab: Lab) -> None:
    lab.capture(32, "ACC7002", "PAT7002")
    (oru,) = lab.deliver()
    assert not [k for k in obx_values(oru) if k.endswith("_abs")]
    assert not [n for n in notes(oru) if n.startswith("ABS_")]


def test_unusable_wbc_count_is_refused_with_an_error(lab: Lab) -> None:
    assert lab.order(oml_o21("ACC7003", "PAT7003", "7.9", units="mmol/L")) == "AE"


# --- sign-out that is safe ------------------------------------------------------------------


def test_sign_out_needs_every_flag_acknowledged_and_an_override_below_the_minimum(
    lab: Lab,
) -> None:
    case_id = lab.capture(33, "ACC7010", "PAT7010")
    tech, path = lab.client("tech"), lab.client("path")
    url = f"/api/cases/{case_id}"
    case = path.get(url).json()
    holding = [f["code"] for f in case["result"]["flags"] if f["severity"] != "info"]
    assert "WBC_FEW" in holding  # one field: a handful of leukocytes, minimum 100

    refused = path.post(f"{url}/signout", json={"version": case["version"], "override": "x"})
    assert refused.status_code == 409
    assert all(code in refused.json()["detail"] for code in holding)
    # WBC_FEW asks for a reason (rules.yaml ack_reason)
    bare = tech.post(f"{url}/flags/WBC_FEW/acknowledge", json={"version": case["version"]})
    assert bare.status_code == 422 and "reason" in bare.json()["detail"]
    missing = tech.post(f"{url}/flags/NO_SUCH/acknowledge", json={"version": case["version"]})
    assert missing.status_code == 404
    version = acknowledge_all(tech, url, case["version"])
    acknowledged = path.get(url).json()["result"]["review"]["acknowledged"]
    assert set(acknowledged) == set(holding)
    assert acknowledged["WBC_FEW"]["username"] == "tech"

    canned = {c["code"]: c["text"] for c in tech.get("/api/canned-comments").json()}
    assert tech.post(f"{url}/comments", json={"canned": "TOXIC"}).status_code == 201
    assert tech.post(f"{url}/comments", json={"text": "Few cells: thin film."}).status_code == 201
    assert tech.post(f"{url}/comments", json={"canned": "NOPE"}).status_code == 422

    below = path.post(f"{url}/signout", json={"version": version})
    assert below.status_code == 422 and "override" in below.json()["detail"]
    done = path.post(
        f"{url}/signout", json={"version": version, "override": "Leukopenic patient, 2 films"}
    )
    assert done.status_code == 200, done.text
    assert done.json()["result_status"] == "F"
    oru = lab.deliver()[-1]
    sent = notes(oru)
    assert f"tech: {canned['TOXIC']}" in sent and "tech: Few cells: thin film." in sent
    assert any(n.startswith("override by path: released with") and "2 films" in n for n in sent)
    trail = path.get(f"{url}/audit").json()
    signout = next(e for e in trail if e["action"] == "case.signout")
    assert signout["after"]["override"]["text"] == "Leukopenic patient, 2 films"
    assert {e["action"] for e in trail} >= {"flag.acknowledge", "comment.add", "case.signout"}


@pytest.fixture
def two_stage_lab(
    tmp_path: Path, database_url: str, base_pipeline: Pipeline, password_hash: str
) -> Iterator[Lab]:
    yield from make_lab(tmp_path, database_url, base_pipeline, password_hash, two_stage=True)


def test_two_stage_review_technologist_then_pathologist(two_stage_lab: Lab) -> None:
    lab = two_stage_lab
    case_id = lab.capture(34, "ACC7020", "PAT7020")
    tech, path = lab.client("tech"), lab.client("path")
    url = f"/api/cases/{case_id}"
    case = tech.get(url).json()
    early = tech.post(f"{url}/technical-review", json={"version": case["version"]})
    assert early.status_code == 409  # flags still open
    version = acknowledge_all(tech, url, case["version"])
    not_yet = path.post(f"{url}/signout", json={"version": version, "override": "ok"})
    assert not_yet.status_code == 409 and "technical review" in not_yet.json()["detail"]
    done = tech.post(f"{url}/technical-review", json={"version": version})
    assert done.status_code == 200, done.text
    assert done.json()["review"]["technical_review"]["username"] == "tech"
    # a change after the technical review undoes it: the result it approved is gone
    cell = next(c for c in tech.get(url).json()["result"]["cells"] if c["kind"] == "WBC")
    changed = tech.patch(
        f"{url}/cells/{cell['id']}",
        json={"class": "artefact", "version": done.json()["version"]},
    ).json()
    assert "technical_review" not in path.get(url).json()["result"]["review"]
    version = acknowledge_all(tech, url, changed["version"])
    version = tech.post(f"{url}/technical-review", json={"version": version}).json()["version"]
    signed = path.post(f"{url}/signout", json={"version": version, "override": "few cells"})
    assert signed.status_code == 200, signed.text


# --- delta check ------------------------------------------------------------------------------


def test_delta_check_uses_only_verified_results_of_the_same_patient(lab: Lab) -> None:
    path = lab.client("path")
    first = lab.capture(35, "ACC7030", "PAT7030")  # preliminary (P): in review
    second = lab.capture(36, "ACC7031", "PAT7030")
    assert path.get(f"/api/cases/{second}").json()["result"]["previous"] is None
    url = f"/api/cases/{first}"
    version = acknowledge_all(path, url, path.get(url).json()["version"])
    signed = path.post(f"{url}/signout", json={"version": version, "override": "few cells"})
    assert signed.status_code == 200, signed.text
    third = lab.capture(37, "ACC7032", "PAT7030")
    previous = path.get(f"/api/cases/{third}").json()["result"]["previous"]
    assert (previous["case_id"], previous["accession_number"]) == (first, "ACC7030")
    # the same identifier from another assigning authority is another patient
    other = oml_o21("ACC7033", "PAT7030", "7.0").replace("^^^HOSP^MR", "^^^OTHER^MR")
    assert lab.order(other) == "AA"
    fourth = lab.capture(38, "ACC7033", "PAT7030")
    assert path.get(f"/api/cases/{fourth}").json()["result"]["previous"] is None


def test_case_page_shows_progress_previous_result_and_an_unknown_case_is_404(lab: Lab) -> None:
    client = httpx.Client(base_url=lab.url, timeout=60)
    client.post("/api/session", json={"username": "path", "password": PASSWORD})
    case_id = lab.capture(39, "ACC7040", "PAT7040")
    page = client.get(f"/cases/{case_id}")
    assert page.status_code == 200
    assert 'id="count-progress"' in page.text and 'id="sign-out"' in page.text
    missing = client.get("/cases/999999")
    assert missing.status_code == 404 and "text/html" in missing.headers["content-type"]


def test_more_captures_grow_the_differential_and_keep_reviewer_decisions(lab: Lab) -> None:
    case_id = lab.capture(40, "ACC7050", "PAT7050")
    tech = lab.client("tech")
    url = f"/api/cases/{case_id}"
    case = tech.get(url).json()
    cell = next(c for c in case["result"]["cells"] if c["kind"] == "WBC")
    target = "basophil" if cell["class"] != "basophil" else "monocyte"
    changed = tech.patch(
        f"{url}/cells/{cell['id']}", json={"class": target, "version": case["version"]}
    )
    version = acknowledge_all(tech, url, changed.json()["version"])
    before = tech.get(url).json()
    nothing_new = tech.post(f"{url}/add-captures", json={"version": version})
    assert nothing_new.status_code == 409

    # a second slide of the same accession arrives while the case is in review
    second = review_capture(lab.folder, lab.detector, 41, "ACC7050", "PAT7050")
    lab.runtime.store.store(pydicom.dcmread(second), second.read_bytes())
    waiting = tech.get(url).json()  # the case page as the reviewer reloads it
    assert waiting["captures_after_analysis"] == 1
    answer = tech.post(f"{url}/add-captures", json={"version": waiting["version"]})
    assert answer.status_code == 202, answer.text
    lab.runtime.scheduler.run_once()
    grown = tech.get(url).json()
    assert grown["status"] == "review" and grown["captures_after_analysis"] == 0
    assert len(grown["result"]["fields"]) == 2
    assert grown["result"]["wbc_classified"] > before["result"]["wbc_classified"]
    kept = [c for c in grown["result"]["cells"] if "original_class" in c]
    assert [(c["field"], c["box"], c["class"]) for c in kept] == [
        (cell["field"], cell["box"], target)
    ]
    assert set(grown["result"]["review"]["acknowledged"]) == set(
        before["result"]["review"]["acknowledged"]
    )
    trail = [e["action"] for e in tech.get(f"{url}/audit").json()]
    assert "case.add_captures" in trail
