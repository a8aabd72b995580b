"""Fuzzing of the three ways in (issue 10): DICOM and HL7 with atheris, the HTTP API with
schemathesis against the running daemon's ``/openapi.json``.

Each runs briefly here (``-m fuzz`` selects them); ``make fuzz`` runs them for longer
(``FUZZ_SECONDS``, ``FUZZ_EXAMPLES``). Inputs that once crashed a harness are kept in
``tests/fuzz_regressions`` and replayed on every run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import Daemon, free_port

REPO = Path(__file__).resolve().parent.parent
REGRESSIONS = Path(__file__).resolve().parent / "fuzz_regressions"
#: libFuzzer's budget per harness in the suite (``make fuzz`` sets more).
SECONDS = int(os.environ.get("FUZZ_SECONDS", "8"))
RUNS = int(os.environ.get("FUZZ_RUNS", "400"))
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "4"))

pytestmark = [pytest.mark.fuzz, pytest.mark.reliability]


@pytest.mark.parametrize("harness", ["dicom", "hl7"])
def test_atheris_finds_no_crash(harness: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "fuzz.run",
            harness,
            f"-runs={RUNS}",
            f"-max_total_time={SECONDS}",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=SECONDS + 300,
    )
    crashes = sorted(p.name for p in tmp_path.glob("crash-*"))
    assert run.returncode == 0 and not crashes, (crashes, run.stderr[-4000:])
    assert "Done" in run.stderr, run.stderr[-2000:]


def _replayed(prefix: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted(REGRESSIONS.glob(f"{prefix}-*"))]


def test_dicom_seeds_and_past_crashes_replay(tmp_path: Path) -> None:
    from fuzz.dicom_ingest import Target, seeds

    target = Target(tmp_path)
    for data in seeds() + _replayed("dicom"):
        target.one_input(data)
        target.one_input(data[: len(data) // 2])  # cut short, as a dropped association


def test_hl7_seeds_and_past_crashes_replay(tmp_path: Path) -> None:
    from fuzz.hl7_orders import Target, seeds

    target = Target(tmp_path)
    inputs = seeds() + _replayed("hl7")
    assert len(inputs) > len(seeds()), "the regression inputs are missing"
    for data in inputs:
        target.one_input(data)


def test_garbled_message_structure_is_refused_not_retried() -> None:
    """Found by atheris: a garbled MSH-9.3 left hl7apy's group unnamed and parse_order raised
    TypeError, which the listener answered AR 207 ("send it again later")."""
    from lisplugin.hl7.mllp import _decode
    from lisplugin.hl7.orders import OrderRejected, parse_order

    message = _decode((REGRESSIONS / "hl7-unnamed-group.hl7").read_bytes())
    with pytest.raises(OrderRejected) as refused:
        parse_order(message)
    assert refused.value.ack_code == "AE"


@pytest.fixture(scope="module")
def running_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    daemon = Daemon(tmp_path_factory.mktemp("api-fuzz") / "var", "", free_port())
    daemon.extra_env["LISPLUGIN_HTTP__SIGN_IN_FAILURES_PER_ADDRESS"] = "1000000"
    daemon.start()
    yield daemon
    daemon.stop()


def test_api_answers_no_server_error_to_generated_requests(running_daemon: Daemon) -> None:
    """schemathesis reads /openapi.json of the running daemon and sends requests generated
    from it, signed in as an admin: no answer may be a 5xx or break the API's own schema."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error

    headers = {"Authorization": f"Bearer {running_daemon.token}"}
    schema = schemathesis.openapi.from_url(
        f"{running_daemon.api}/openapi.json", headers=headers, timeout=30
    )
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.method.upper() == "DELETE" and operation.path == "/api/session":
            continue  # would sign the fuzzer out
        operations += 1

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: object) -> None:
            response = case.call(headers=headers, timeout=30)  # type: ignore[attr-defined]
            try:
                case.validate_response(  # type: ignore[attr-defined]
                    response, checks=[not_a_server_error]
                )
            except Exception as exc:
                failures.append(f"{case.method} {case.path}: {exc}"[:500])  # type: ignore[attr-defined]

        check()
    assert operations > 10
    assert not failures, "\n".join(failures[:10])


def test_pixel_data_without_samples_per_pixel_is_refused_with_a_reason() -> None:
    """Found by atheris: without Samples per Pixel the expected Pixel Data length could not be
    worked out and the modality was told "undecodable data set: 'Dataset' object has no
    attribute ..."; it is now refused as an incomplete pixel description."""
    from fuzz.dicom_ingest import LIMITS, decode_instance
    from lisplugin.dicom.decode import UnusableInstance, validate_header

    ds = decode_instance((REGRESSIONS / "dicom-no-samples-per-pixel.dcm").read_bytes())
    with pytest.raises(UnusableInstance, match="pixel description incomplete"):
        validate_header(ds, LIMITS)
