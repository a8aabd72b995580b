"""The suite-wide guard against patient names in logs (tests/phi_guard.py) can fail."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from phi_guard import TESTS_DIR, find_names, patient_names

pytestmark = pytest.mark.reliability

INNER_CONFTEST = "from phi_guard import _no_patient_names_in_logs, pytest_configure  # noqa\n"
INNER_TESTS = """
import logging
from pathlib import Path

from phi_guard import watch_log_file


def test_logs_a_name() -> None:
    logging.getLogger("lisplugin.service.cases").info("case 7 of %s analysed", "Zyxwvut")


def test_daemon_log_names_a_patient(tmp_path: Path) -> None:
    log = tmp_path / "daemon-1.log"
    log.write_text('{"event": "order for M\\\\u00fcller accepted"}\\n')
    watch_log_file(log)


def test_logs_no_name() -> None:
    logging.getLogger("lisplugin.service.cases").info("case 8 analysed")
"""


def test_names_come_from_the_test_sources(tmp_path: Path) -> None:
    source = tmp_path / "test_x.py"
    source.write_text(
        'build_test_order(accession="A", patient_id="P", family="Plantedname", given="Al")\n'
        'ds.PatientName = "Famname^Givname"\n'
        'order = "PID|1||P9^^^HOSP^MR||Pidfamily^Pidgiven||19700101|F"\n'
    )
    assert patient_names([source]) == {
        "Plantedname",
        "Famname",
        "Givname",
        "Pidfamily",
        "Pidgiven",
    }
    assert {"Doe", "Jane", "Zyxwvut", "Müller"} <= patient_names()


def test_names_found_plain_and_json_escaped() -> None:
    lines = ["order of Doe accepted", '{"event": "M\\u00fcller"}', "Doesn't name anyone"]
    assert [name for name, _ in find_names(lines, {"Doe", "Müller"})] == ["Doe", "Müller"]


def test_a_planted_name_fails_the_test_that_logged_it(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(INNER_CONFTEST)
    (tmp_path / "test_planted.py").write_text(INNER_TESTS)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(TESTS_DIR)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "3 passed, 2 errors" in run.stdout, run.stdout  # errors in teardown
    assert "patient name 'Zyxwvut' in the logs" in run.stdout
    assert "patient name 'Müller' in the logs" in run.stdout
