"""The review API over real HTTP: sign-in, sessions, CSRF, roles, locking, audit, sign-out.

The app runs in uvicorn on a loopback port with the daemon's runtime; the case under review
is a synthetic capture stored and analysed by the real ingest and scheduler (cells from the
generator's ground truth, see ``review_support``). Results go to the LIS simulator through
the real outbox. Tests that concern storage run on SQLite and PostgreSQL.
"""

from __future__ import annotations

import html
import io
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import numpy as np
import pydicom
import pytest
from PIL import Image
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
from sqlalchemy import select, text, update
from sqlalchemy.exc import DBAPIError

from lisplugin.config import Settings
from lisplugin.core.types import LEUKOCYTE_CLASSES
from lisplugin.hl7.lis_sim import LisSimulator, build_test_order
from lisplugin.hl7.orders import parse_order
from lisplugin.http.app import create_app
from lisplugin.service import users
from lisplugin.service.ingest import apply_order
from lisplugin.service.pipeline import Pipeline
from lisplugin.storage.orm import Case, CaseStatus
from lisplugin.storage.orm_review import AuditEvent, Role, User, UserSession

sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Station:
    runtime: ReviewRuntime
    url: str
    case_id: int
    lis: LisSimulator
    detector: GroundTruthDetector
    folder: Path

    def client(self, username: str | None = None) -> httpx.Client:
        """An API client with ``username``'s bearer token (anonymous without a name)."""
        client = httpx.Client(base_url=self.url, timeout=60)
        if username is not None:
            token = self.sign_in(client, username).json()["token"]
            client.cookies.clear()
            client.headers["Authorization"] = f"Bearer {token}"
        return client

    def browser(self, username: str) -> tuple[httpx.Client, httpx.Response]:
        """A client that keeps the session cookie, as a browser does, and the sign-in answer."""
        client = httpx.Client(base_url=self.url, timeout=60)
        return client, self.sign_in(client, username)

    @staticmethod
    def sign_in(client: httpx.Client, username: str) -> httpx.Response:
        answer = client.post("/api/session", json={"username": username, "password": PASSWORD})
        answer.raise_for_status()
        return answer

    def case(self, client: httpx.Client, case_id: int | None = None) -> dict[str, Any]:
        answer = client.get(f"/api/cases/{case_id or self.case_id}")
        answer.raise_for_status()
        return answer.json()

    def deliver(self) -> None:
        """Run the outbox once: every pending message goes to the LIS simulator."""
        self.runtime.outbox.run_once()


@pytest.fixture(scope="module")
def base_pipeline() -> Pipeline:
    """Models loaded once for the module: loading the real ones takes a while."""
    return Pipeline.from_settings(Settings())


@pytest.fixture(scope="module")
def password_hash() -> str:
    """Hashed once: argon2 is slow on purpose (``lisplugin user add`` is tested below)."""
    return users.hash_password(PASSWORD)


@pytest.fixture
def station(
    tmp_path: Path, database_url: str, base_pipeline: Pipeline, password_hash: str
) -> Iterator[Station]:
    lis = LisSimulator(port=free_port()).start()
    settings = Settings(
        storage={"path": tmp_path / "var"},
        database={"url": database_url},
        hl7={"lis_host": "127.0.0.1", "lis_port": lis.port, "ack_timeout_seconds": 5},
    )
    detector = GroundTruthDetector()
    runtime = ReviewRuntime(settings, base_pipeline, detector)
    with runtime.db.session() as session:
        for name, role in (
            ("tech", Role.TECHNOLOGIST),
            ("path", Role.PATHOLOGIST),
            ("admin", Role.ADMIN),
        ):
            session.add(User(username=name, password_hash=password_hash, role=role))
    case_id = ingest(runtime, review_capture(tmp_path / "in", detector, 21, "ACC9001", "PAT9001"))
    try:
        with ServerThread(create_app(runtime), free_port()) as server:
            yield Station(runtime, server.url, case_id, lis, detector, tmp_path / "in")
    finally:
        lis.stop()
        runtime.db.dispose()


def signed_report(client: httpx.Client, case_id: int) -> dict[str, Any]:
    """The JSON report once the sign-out's reports are written (they follow the answer)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        answer = client.get(f"/api/cases/{case_id}/reports/json")
        if answer.status_code == 200 and answer.json()["verified_by"]:
            return answer.json()
        time.sleep(0.2)
    raise AssertionError(f"no signed report for case {case_id} within 30 s")


def release(client: httpx.Client, url: str, version: int) -> httpx.Response:
    """Sign out as a pathologist does: every open flag acknowledged (with a reason), and an
    override comment, since one synthetic field has fewer leukocytes than the minimum."""
    version = acknowledge_all(client, url, version)
    return client.post(
        f"{url}/signout", json={"version": version, "override": "one field: research sample"}
    )


def leukocytes(case: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in case["result"]["cells"] if c["kind"] == "WBC"]


def other_class(cell: dict[str, Any], *avoid: str) -> str:
    """A leukocyte class the cell does not have now."""
    return next(
        c for c in ("lymphocyte", "monocyte", "neutrophil") if c != cell["class"] and c not in avoid
    )


def expected_tally(cells: list[dict[str, Any]]) -> tuple[dict[str, float], int]:
    """The differential as the aggregation semantics define it, computed independently."""
    counted = [c for c in cells if c["kind"] == "WBC" and c["class"] not in ("artefact", "smudge")]
    denominator = sum(1 for c in counted if c["class"] not in ("erythroblast", "platelet"))
    classes = {c["class"] for c in counted}
    shares = {
        cls: round(100.0 * sum(1 for c in counted if c["class"] == cls) / denominator, 2)
        for cls in classes
    }
    return shares, denominator


# --- sign-in and sessions ------------------------------------------------------------------


@sqlite_only
def test_every_route_needs_sign_in_except_health_and_sign_in(station: Station) -> None:
    anonymous, admin = station.client(), station.client("admin")
    # Every operation the API describes (the OpenAPI description itself needs a session) ...
    described = admin.get("/openapi.json").json()["paths"]
    routes = {(m.upper(), p) for p, ops in described.items() for m in ops}
    # ... and what it does not: the description, the docs and the pages.
    routes |= {("GET", "/openapi.json"), ("GET", "/docs")}
    pages = {("GET", "/worklist"), ("GET", "/cases/{case_id}")}
    open_routes = {
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("POST", "/api/session"),
    }
    assert open_routes < routes
    values = {
        "case_id": station.case_id,
        "cell_id": 0,
        "index": 0,
        "number": 1,
        "code": "WBC_FEW",
        "study": "1.2",
    }
    for method, path in sorted(routes | pages):
        answer = anonymous.request(method, path.format(**values), follow_redirects=False)
        if (method, path) in open_routes:
            assert answer.status_code not in (401, 403), (method, path)
        elif (method, path) in pages:  # pages send the browser to sign in, and back
            assert answer.status_code == 303, (method, path)
            assert answer.headers["location"].startswith("/login?next=")
        else:
            assert answer.status_code == 401, (method, path, answer.status_code)
            assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert len(routes) >= 20
    assert admin.get("/api/cases").status_code == 200
    assert admin.get("/worklist").status_code == 200
    assert anonymous.get("/login").status_code == 200  # the sign-in page and its files
    assert anonymous.get("/static/review.css").status_code == 200


@sqlite_only
def test_wrong_password_is_refused_without_telling_which_part(station: Station) -> None:
    client = station.client()
    wrong = client.post("/api/session", json={"username": "path", "password": "nope-nope"})
    unknown = client.post("/api/session", json={"username": "nobody", "password": PASSWORD})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json()
    assert "lisplugin_session" not in client.cookies
    with station.runtime.db.session() as session:
        refused = session.scalars(
            select(AuditEvent.username).where(AuditEvent.action == "session.refused")
        ).all()
    assert sorted(refused) == ["nobody", "path"]


def test_expired_session_is_refused(station: Station) -> None:
    client = station.client("tech")
    assert client.get("/api/worklist").status_code == 200
    with station.runtime.db.session() as session:
        session.execute(
            update(UserSession).values(expires_at=datetime.now(UTC) - timedelta(minutes=1))
        )
    answer = client.get("/api/worklist")
    assert answer.status_code == 401
    assert "expired" in answer.json()["detail"]


@sqlite_only
def test_session_slides_and_ends_when_closed(station: Station) -> None:
    client = station.client("tech")
    first = client.get("/api/session").json()
    idle = timedelta(minutes=station.runtime.settings.http.session_idle_minutes)
    expires = datetime.fromisoformat(first["expires_at"])
    assert timedelta(0) < expires - datetime.now(UTC) <= idle
    assert client.delete("/api/session").status_code == 204
    assert client.get("/api/worklist").status_code == 401


@sqlite_only
def test_cookie_changes_need_the_csrf_token_bearer_ones_do_not(station: Station) -> None:
    browser, signed_in = station.browser("tech")
    csrf = signed_in.json()["csrf_token"]
    cookie = signed_in.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie

    case = station.case(browser)  # reading needs no CSRF token
    cell = leukocytes(case)[0]
    change = {"class": other_class(cell), "version": case["version"]}
    path = f"/api/cases/{station.case_id}/cells/{cell['id']}"
    assert browser.patch(path, json=change).status_code == 403
    assert browser.patch(path, json=change, headers={"X-CSRF-Token": "forged"}).status_code == 403
    assert (
        browser.post(f"/api/cases/{station.case_id}/comments", json={"text": "x"}).status_code
        == 403
    )
    assert browser.patch(path, json=change, headers={"X-CSRF-Token": csrf}).status_code == 200

    api = station.client("tech")  # bearer token: no cookie is sent, no CSRF token needed
    again = {"class": other_class(cell, change["class"]), "version": case["version"] + 1}
    assert api.patch(path, json=again).status_code == 200


@sqlite_only
def test_roles_technologist_cannot_sign_out_admin_cannot_change(station: Station) -> None:
    tech, admin = station.client("tech"), station.client("admin")
    case = station.case(tech)
    signout = tech.post(f"/api/cases/{station.case_id}/signout", json={"version": case["version"]})
    assert signout.status_code == 403
    assert "pathologist" in signout.json()["detail"]
    cell = leukocytes(case)[0]
    change = {"class": other_class(cell), "version": case["version"]}
    path = f"/api/cases/{station.case_id}/cells/{cell['id']}"
    assert admin.patch(path, json=change).status_code == 403
    assert admin.get(f"/api/cases/{station.case_id}/audit").status_code == 200
    assert station.case(admin)["version"] == case["version"]  # nothing changed


# --- optimistic locking --------------------------------------------------------------------


def test_concurrent_edits_conflict_instead_of_overwriting(station: Station) -> None:
    tech, path = station.client("tech"), station.client("path")
    seen = station.case(path)  # both load the same version
    first, second = leukocytes(seen)[:2]
    url = f"/api/cases/{station.case_id}/cells"
    done = tech.patch(
        f"{url}/{first['id']}", json={"class": other_class(first), "version": seen["version"]}
    )
    assert done.status_code == 200 and done.json()["version"] > seen["version"]

    stale = path.patch(
        f"{url}/{second['id']}", json={"class": other_class(second), "version": seen["version"]}
    )
    assert stale.status_code == 409
    assert f"version {seen['version']}" in stale.json()["detail"]
    late = path.post(f"/api/cases/{station.case_id}/signout", json={"version": seen["version"]})
    assert late.status_code == 409

    # Two changes on the same version at the same moment: one wins, one is told.
    current = station.case(path)
    third = leukocytes(current)[2]

    def change(client: httpx.Client) -> int:
        body = {"class": other_class(third), "version": current["version"]}
        return client.patch(f"{url}/{third['id']}", json=body).status_code

    with ThreadPoolExecutor(2) as pool:
        statuses = sorted(pool.map(change, [tech, path]))
    assert statuses == [200, 409]
    assert station.case(path)["version"] == current["version"] + 1


# --- reclassification ----------------------------------------------------------------------


@sqlite_only
def test_reclassify_recomputes_the_differential(station: Station) -> None:
    client = station.client("tech")
    case = station.case(client)
    # Cells in the differential's denominator (whatever the installed classifier called them).
    cells = [c for c in leukocytes(case) if c["class"] not in ("erythroblast", "platelet")]
    assert len(cells) >= 3
    before = case["result"]
    url = f"/api/cases/{station.case_id}/cells"

    target = other_class(cells[0])
    answer = client.patch(
        f"{url}/{cells[0]['id']}", json={"class": target, "version": case["version"]}
    )
    assert answer.status_code == 200, answer.text
    changed = answer.json()
    assert changed["cell"]["class"] == target
    assert changed["cell"]["original_class"] == cells[0]["class"]
    now = station.case(client)
    shares, denominator = expected_tally(now["result"]["cells"])
    assert changed["wbc_classified"] == denominator == before["wbc_classified"]
    assert {k: v for k, v in changed["differential"].items() if v} == shares
    assert now["result"]["differential"] == changed["differential"]

    # An artefact leaves the leukocyte count: the count, the denominator and every share move.
    answer = client.patch(
        f"{url}/{cells[1]['id']}", json={"class": "artefact", "version": changed["version"]}
    )
    artefact = answer.json()
    assert artefact["wbc_classified"] == denominator - 1
    assert artefact["counts"]["WBC"] == before["counts"]["WBC"] - 1
    assert artefact["excluded_counts"] == {"artefact": 1, "smudge": 0}
    shares, denominator = expected_tally(station.case(client)["result"]["cells"])
    assert {k: v for k, v in artefact["differential"].items() if v} == shares

    # An erythroblast is counted per 100 leukocytes, outside the denominator (with those the
    # installed classifier already called erythroblasts).
    erythroblasts = sum(1 for c in leukocytes(station.case(client)) if c["class"] == "erythroblast")
    answer = client.patch(
        f"{url}/{cells[2]['id']}", json={"class": "erythroblast", "version": artefact["version"]}
    )
    nrbc = answer.json()
    assert nrbc["wbc_classified"] == denominator - 1
    expected = round(100.0 * (erythroblasts + 1) / (denominator - 1), 2)
    assert nrbc["differential"]["erythroblast"] == expected
    assert any(f["code"] == "NRBC_PRESENT" for f in nrbc["flags"])  # the rules ran again

    bad = client.patch(f"{url}/{cells[0]['id']}", json={"class": "dragon", "version": 1})
    assert bad.status_code == 422
    rbc = next(c for c in case["result"]["cells"] if c["kind"] == "RBC")
    answer = client.patch(
        f"{url}/{rbc['id']}", json={"class": "lymphocyte", "version": nrbc["version"]}
    )
    assert answer.status_code == 422
    missing = client.patch(f"{url}/9999", json={"class": "lymphocyte", "version": nrbc["version"]})
    assert missing.status_code == 404


@sqlite_only
def test_late_capture_keeps_reviewer_decisions_until_re_analysed(station: Station) -> None:
    client = station.client("tech")
    case = station.case(client)
    cell = leukocytes(case)[0]
    answer = client.patch(
        f"/api/cases/{station.case_id}/cells/{cell['id']}",
        json={"class": other_class(cell), "version": case["version"]},
    )
    assert answer.status_code == 200, answer.text
    edited = station.case(client)

    # A second field of the same accession arrives after the reviewer's change.
    late = review_capture(station.folder, station.detector, 22, "ACC9001", "PAT9001")
    assert ingest(station.runtime, late) == station.case_id
    kept = station.case(client)
    assert kept["status"] == "review"
    assert kept["instances"] == 2
    assert kept["captures_after_analysis"] == 1
    assert kept["result"] == edited["result"]  # the reclassification is still there
    page = client.get(f"/cases/{station.case_id}")
    assert page.status_code == 200
    assert 'id="late-captures"' in page.text

    # Re-analysing on purpose takes the new field in (and starts the review afresh).
    answer = client.post(f"/api/cases/{station.case_id}/analyze")
    assert answer.status_code == 202, answer.text
    station.runtime.scheduler.run_once()
    redone = station.case(client)
    assert redone["captures_after_analysis"] == 0
    assert len(redone["result"]["fields"]) == 2
    assert not any("original_class" in c for c in redone["result"]["cells"])


# --- sign-out -------------------------------------------------------------------------------


def test_sign_out_sends_final_and_a_correction_sends_corrected(station: Station) -> None:
    tech, path = station.client("tech"), station.client("path")
    case = station.case(path)
    assert case["status"] == "review" and case["messages"][0]["result_status"] == "P"
    cell = leukocytes(case)[0]
    url = f"/api/cases/{station.case_id}"
    changed = tech.patch(
        f"{url}/cells/{cell['id']}", json={"class": other_class(cell), "version": case["version"]}
    ).json()

    done = release(path, url, changed["version"])
    assert done.status_code == 200, done.text
    assert done.json()["result_status"] == "F"
    station.deliver()
    final = [m for m in station.lis.received if "ACC9001" in m][-1]
    values = obx_values(final)
    assert {status for _, status in values.values()} == {"F"}
    for cls, share in changed["differential"].items():
        key = "erythroblast_per_100wbc" if cls == "erythroblast" else f"{cls}_pct"
        assert float(values[key][0]) == pytest.approx(round(share, 1)), key
    # The values the reviewer was shown after the change are exactly those the LIS got.
    assert {v["key"]: v["value"] for v in changed["values"]} == {
        key: float(value) for key, (value, _) in values.items()
    }
    assert "verified by path" in final
    assert "override by path: released with" in final  # the override comment as NTE
    signed = station.case(path)
    assert signed["status"] == "final"
    # The reports made at sign-out name the signer: SR Verifying Observer, JSON and PDF.
    report = signed_report(path, station.case_id)
    assert report["verified_by"]["username"] == "path"
    schema = json.loads((REPO / "interfaces/schemas/case-report.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(report)
    sr = pydicom.dcmread(io.BytesIO(path.get(f"{url}/reports/sr").content))
    assert (sr.VerificationFlag, sr.PreliminaryFlag) == ("VERIFIED", "FINAL")
    observer = sr.VerifyingObserverSequence[0]
    assert str(observer.VerifyingObserverName) == "path^"
    assert observer.VerifyingOrganization == station.runtime.settings.hl7.sending_facility
    assert observer.VerificationDateTime[:8] == report["verified_by"]["at"][:10].replace("-", "")
    assert path.get("/api/worklist").json() == []
    again = path.post(f"{url}/signout", json={"version": signed["version"]})
    assert again.status_code == 409  # nothing changed since: nothing to release

    # A correction reopens the case; signing out again sends C with the corrected values.
    corrected = tech.patch(
        f"{url}/cells/{cell['id']}", json={"class": "artefact", "version": signed["version"]}
    ).json()
    assert corrected["status"] == "review"
    assert [e["id"] for e in path.get("/api/worklist").json()] == [station.case_id]
    done = release(path, url, corrected["version"])
    assert done.json()["result_status"] == "C"
    station.deliver()
    correction = [m for m in station.lis.received if "ACC9001" in m][-1]
    values = obx_values(correction)
    assert {status for _, status in values.values()} == {"C"}
    assert float(values["wbc_classified"][0]) == corrected["wbc_classified"]
    statuses = [m["result_status"] for m in station.case(path)["messages"]]
    assert statuses == ["P", "F", "C"]


# --- audit ----------------------------------------------------------------------------------


def test_audit_trail_shows_every_change_and_cannot_be_rewritten(station: Station) -> None:
    tech, path = station.client("tech"), station.client("path")
    case = station.case(tech)
    cell = leukocytes(case)[0]
    url = f"/api/cases/{station.case_id}"
    target = other_class(cell)
    changed = tech.patch(
        f"{url}/cells/{cell['id']}", json={"class": target, "version": case["version"]}
    ).json()
    assert tech.post(f"{url}/comments", json={"text": "left shift?"}).status_code == 201
    signed = release(path, url, changed["version"]).json()

    trail = [e for e in tech.get(f"{url}/audit").json() if e["action"] != "flag.acknowledge"]
    assert [(e["action"], e["username"]) for e in trail] == [
        ("cell.reclassify", "tech"),
        ("comment.add", "tech"),
        ("case.signout", "path"),
    ]
    assert trail[0]["before"]["class"] == cell["class"]
    assert trail[0]["after"] == {"cell_id": cell["id"], "class": target, "status": "review"}
    assert trail[1]["after"]["text"] == "left shift?"
    assert trail[2]["after"]["result_status"] == "F"
    assert trail[2]["after"]["control_id"] == signed["control_id"]
    assert all(e["at"] for e in trail)
    assert [c["text"] for c in tech.get(f"{url}/comments").json()] == ["left shift?"]

    with station.runtime.db.engine.connect() as connection:
        for statement in ("UPDATE audit_events SET username = 'x'", "DELETE FROM audit_events"):
            with pytest.raises(DBAPIError, match="append-only"):
                connection.execute(text(statement))
            connection.rollback()
    assert len(tech.get(f"{url}/audit").json()) == 3 + len(changed["flags"]) - sum(
        f["severity"] == "info" for f in changed["flags"]
    )


# --- worklist and images -------------------------------------------------------------------


@sqlite_only
def test_worklist_is_stat_first_then_oldest(station: Station) -> None:
    runtime = station.runtime
    routine = review_capture(station.folder, station.detector, 22, "ACC9002", "PAT9002")
    later = ingest(runtime, routine)
    order = build_test_order(accession="ACC9003", patient_id="PAT9003", priority="S")
    apply_order(runtime.db, parse_order(order), order)
    stat = ingest(
        runtime, review_capture(station.folder, station.detector, 23, "ACC9003", "PAT9003")
    )
    entries = station.client("tech").get("/api/worklist").json()
    assert [e["id"] for e in entries] == [stat, station.case_id, later]
    assert [e["stat"] for e in entries] == [True, False, False]
    assert entries[1]["waiting_seconds"] >= entries[2]["waiting_seconds"] >= 0
    assert all(e["reasons"] and e["reasons"][0]["severity"] != "info" for e in entries)


@sqlite_only
def test_field_cell_and_saliency_images(station: Station) -> None:
    client = station.client("tech")
    case = station.case(client)
    url = f"/api/cases/{station.case_id}"
    field = case["result"]["fields"][0]
    image = Image.open(io.BytesIO(client.get(f"{url}/fields/0.png").content))
    assert image.size == (field["width"], field["height"])
    assert client.get(f"{url}/fields/5.png").status_code == 404

    # the case's leukocytes were classified against their median chromatin, kept with it
    assert len(field["stain_reference"]) == 3 and len(leukocytes(case)) >= 5
    cell = leukocytes(case)[0]
    crop = Image.open(io.BytesIO(client.get(f"{url}/cells/{cell['id']}.png").content))
    assert crop.size == (320, 320)  # the classifier's 160 px window, at twice the detail
    saliency = client.get(f"{url}/cells/{cell['id']}/saliency.png")
    assert saliency.status_code == 200
    assert Image.open(io.BytesIO(saliency.content)).size == (320, 320)
    top = max(cell["probabilities"].values())  # the class explained is the top class
    explained = saliency.headers["X-Saliency-Class"]
    assert cell["probabilities"][explained] == pytest.approx(top, abs=1e-4)
    assert float(saliency.headers["X-Saliency-Probability"]) == pytest.approx(top, abs=1e-3)
    rbc = next(c for c in case["result"]["cells"] if c["kind"] == "RBC")
    assert client.get(f"{url}/cells/{rbc['id']}/saliency.png").status_code == 422
    assert client.get(f"{url}/cells/9999.png").status_code == 404


@sqlite_only
def test_user_cli_adds_lists_and_disables(
    station: Station, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = station.runtime.settings
    monkeypatch.setenv("LISPLUGIN_DATABASE__URL", settings.database_url)
    monkeypatch.setenv("LISPLUGIN_STORAGE__PATH", str(settings.storage.path))
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert users.cli(["add", "nina", "--role", "pathologist"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert users.cli(["add", "olga", "--role", "technologist"]) == 1
    client = station.client("nina")
    assert client.get("/api/worklist").status_code == 200
    assert users.cli(["disable", "nina"]) == 0
    assert client.get("/api/worklist").status_code == 401
    assert users.cli(["list"]) == 0
    listing = capsys.readouterr().out
    assert "nina" in listing and "disabled" in listing and "olga" not in listing
    with station.runtime.db.session() as session:
        case = session.get(Case, station.case_id)
        assert case is not None and case.status == CaseStatus.REVIEW


def test_signed_out_cells_are_the_sites_training_set(station: Station) -> None:
    """`lisplugin adapt --from-reviews` reads every leukocyte of signed-out cases, with the class
    it was released with (the reviewer's where they changed it), cut as the classifier saw it."""
    from lisplugin.training.adapt import collect_reviews

    tech, path = station.client("tech"), station.client("path")
    case = station.case(path)
    cell = leukocytes(case)[0]
    url = f"/api/cases/{station.case_id}"
    assert collect_reviews(station.runtime.settings, print).crops == []  # nothing signed out
    new_class = other_class(cell)
    changed = tech.patch(
        f"{url}/cells/{cell['id']}", json={"class": new_class, "version": case["version"]}
    ).json()
    assert release(path, url, changed["version"]).status_code == 200
    cells = collect_reviews(station.runtime.settings, print)
    crops, labels = cells.crops, cells.labels
    released = [c for c in leukocytes(station.case(path)) if c["class"] in LEUKOCYTE_CLASSES]
    assert cells.skipped == 0 and len(crops) == len(labels) == len(released)
    # each crop with the stain reference it was classified against, as stored
    stored = case["result"]["fields"][0]["stain_reference"]
    assert len(cells.nuclei) == len(crops) and stored is not None
    assert all(np.array_equal(n, np.asarray(stored, np.float32)) for n in cells.nuclei)
    assert sorted(labels) == sorted(c["class"] for c in released)
    assert new_class in labels
    assert all(c.shape == (160, 160, 3) for c in crops)


@sqlite_only
def test_readyz_is_degraded_while_a_result_is_parked(station: Station) -> None:
    """Issue 10 finding 7: a result the LIS answered AE is not silent: /readyz says so."""
    from lisplugin.storage.orm import OutboxMessage, OutboxStatus

    anonymous = station.client()
    assert anonymous.get("/readyz").json()["degraded"] == {}
    with station.runtime.db.session() as session:
        session.add(
            OutboxMessage(
                case_id=station.case_id,
                channel="hl7",
                control_id="LP-PARKED",
                result_status="F",
                payload="MSH|...",
                status=OutboxStatus.REJECTED,
                ack_code="AE",
            )
        )
    assert anonymous.get("/readyz").json()["degraded"] == {"outbox_parked": 1}


@sqlite_only
def test_sign_in_is_locked_per_user_and_per_address(station: Station) -> None:
    """Issue 10 finding 9: 40 wrong passwords in 6 s went through. Now 5 failures lock the
    name (even the right password is refused, 429 with Retry-After), other names are served,
    and 20 failures from one address lock the address."""
    anonymous = station.client()

    def attempt(name: str, password: str) -> httpx.Response:
        return anonymous.post("/api/session", json={"username": name, "password": password})

    assert [attempt("tech", "wrong").status_code for _ in range(5)] == [401] * 5
    locked = attempt("tech", PASSWORD)
    assert locked.status_code == 429
    assert 0 < int(locked.headers["Retry-After"]) <= 15 * 60
    assert attempt("path", PASSWORD).status_code == 200  # another name: not locked
    for n in range(14):  # 5 + 14 + 1 = 20 failures from this address
        assert attempt(f"nobody{n}", "wrong").status_code == 401
    assert attempt("admin", "wrong").status_code == 401
    assert attempt("admin", PASSWORD).status_code == 429  # the address is locked now
    with station.runtime.db.session() as session:
        reasons = [
            e.after["reason"]
            for e in session.scalars(select(AuditEvent).where(AuditEvent.username == "tech"))
            if e.action == "session.refused"
        ]
    assert reasons[-1] == "locked"


@sqlite_only
@pytest.mark.parametrize(
    "target", ["/%09/evil.example", "/%0a/evil.example", "//evil.example", "/%5cevil.example"]
)
def test_login_next_never_leaves_the_site(station: Station, target: str) -> None:
    browser, _ = station.browser("tech")
    answer = browser.get(f"/login?next={target}", follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/worklist"


@sqlite_only
def test_api_answers_are_not_cached_sniffed_or_framed(station: Station) -> None:
    """Issue 10: security headers on PHI, not only on the pages."""
    admin = station.client("admin")
    for path in ("/api/cases", f"/api/cases/{station.case_id}", "/healthz"):
        headers = admin.get(path).headers
        assert headers["Cache-Control"] == "no-store", path
        assert headers["X-Content-Type-Options"] == "nosniff", path
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], path


# --- error answers: pages for browsers, JSON for the API ----------------------------------

#: What Chromium sends when it loads a page.
BROWSER_ACCEPT = (
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
    "image/apng,*/*;q=0.8"
)


@sqlite_only
def test_errors_are_pages_for_browsers_and_json_for_api_clients(station: Station) -> None:
    tech, anonymous = station.client("tech"), station.client()
    case = station.case(tech)
    url = f"/api/cases/{station.case_id}"
    cell = leukocytes(case)[0]
    stale = {"class": other_class(cell), "version": case["version"] - 1}
    wrong = {"class": "blast", "version": case["version"]}
    checks = [  # client, method, path, body, status, words the answer must carry
        (anonymous, "GET", "/api/cases", None, 401, "sign in"),
        (tech, "POST", f"{url}/signout", {"version": case["version"]}, 403, "pathologist"),
        (tech, "GET", "/cases/999999", None, 404, "no case 999999"),
        (tech, "GET", "/api/cases/999999", None, 404, "999999"),
        (tech, "GET", "/no/such/page", None, 404, "Not Found"),
        (tech, "DELETE", "/worklist", None, 405, "Method Not Allowed"),
        (tech, "PATCH", f"{url}/cells/{cell['id']}", stale, 409, "changed after you loaded"),
        (tech, "PATCH", f"{url}/cells/{cell['id']}", wrong, 422, "Input should be 'neutrophil'"),
        (tech, "GET", "/api/cases/not-a-number", None, 422, "case_id"),
    ]
    for client, method, path, body, status, words in checks:
        where = (method, path, status)
        page = client.request(method, path, json=body, headers={"Accept": BROWSER_ACCEPT})
        assert page.status_code == status, (*where, page.text[:300])
        assert page.headers["content-type"].startswith("text/html"), where
        assert f'<p class="error-status" id="error-status">{status}</p>' in page.text, where
        assert words in html.unescape(page.text), where
        assert page.headers["Content-Security-Policy"].startswith("default-src 'self'"), where
        assert page.headers["Cache-Control"] == "no-store", where
        assert ("Sign in" in page.text) == (status == 401), where
        api = client.request(method, path, json=body, headers={"Accept": "application/json"})
        assert api.status_code == status, where
        assert api.headers["content-type"] == "application/json", where
        assert words in json.dumps(api.json()["detail"]), where
        for name in ("WWW-Authenticate", "Allow"):  # kept on both
            assert page.headers.get(name) == api.headers.get(name), (where, name)
        # */* (fetch, curl, httpx): JSON from the API, a page from the pages
        either = client.request(method, path, json=body)
        expected = "application/json" if path.startswith("/api/") else "text/html"
        assert either.status_code == status, where
        assert either.headers["content-type"].startswith(expected), where
    assert station.case(tech)["version"] == case["version"]  # nothing changed


@sqlite_only
def test_an_internal_error_is_a_500_page_or_json_with_the_request_id(station: Station) -> None:
    """A real failure: the comments table is gone, as after a botched manual migration."""
    tech = station.client("tech")
    with station.runtime.db.session() as session:
        session.execute(text("DROP TABLE case_comments"))
    page = tech.get(
        f"/cases/{station.case_id}", headers={"Accept": BROWSER_ACCEPT, "X-Request-ID": "req-42"}
    )
    assert page.status_code == 500 and page.headers["content-type"].startswith("text/html")
    assert "Internal Server Error" in page.text and "req-42" in page.text
    assert "case_comments" not in page.text  # the exception's text stays in the log
    assert page.headers["X-Request-ID"] == "req-42"
    api = tech.get(f"/api/cases/{station.case_id}/comments", headers={"X-Request-ID": "req-43"})
    assert api.status_code == 500 and api.headers["Cache-Control"] == "no-store"
    assert api.json()["request_id"] == "req-43" and "case_comments" not in api.text
