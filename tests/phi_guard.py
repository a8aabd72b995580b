"""No patient name in any log of the test suite (issue 10): a pytest plugin loaded by conftest.

The names are those the tests give their patients, read from the test sources (order helpers'
``family=``/``given=``, DICOM ``PatientName``, HL7 PID-5 in literal messages, ``name_family``
keys), so a new test's patient is covered without a list to keep up. Every log record of the
suite goes through a handler on the root logger, and the log files of daemon subprocesses that
helpers capture (``watch_log_file``) are read too; a test after which a name shows up in either
fails in its teardown, naming the name and the line.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
#: Shorter name parts ("J", "O") would match ordinary text; they are not looked for.
MIN_LENGTH = 3
_NAME_SOURCES = (
    re.compile(
        r"\b(?:family|given|patient_family_name|patient_given_name|name_family|name_given)"
        r"""["']?\s*[=:]\s*["']([^"'{}]+)["']"""
    ),
    re.compile(r"""PatientName\s*=\s*["']([^"'{}]+)["']"""),
    re.compile(r"PID\|[^|\n\"']*\|[^|\n\"']*\|[^|\n\"']*\|[^|\n\"']*\|([^|\n\"'{}]+)"),
)


def patient_names(sources: Iterable[Path] | None = None) -> frozenset[str]:
    """Every name part the tests give a patient, as found in the test sources."""
    names: set[str] = set()
    for path in sources if sources is not None else sorted(TESTS_DIR.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        for pattern in _NAME_SOURCES:
            for value in pattern.findall(text):
                names.update(part.strip() for part in value.split("^"))
    return frozenset(n for n in names if len(n) >= MIN_LENGTH and not n.isdigit())


class _Collector(logging.Handler):
    """Keeps every record's text (message and traceback) for the check after each test."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a broken format string is not this plugin's failure
            text = str(record.msg)
        if record.exc_info and record.exc_info[1] is not None:
            text += f" {record.exc_info[1]!r}"
        self.lines.append(f"{record.name}: {text}")


_collector = _Collector()
_log_files: list[Path] = []
_names: frozenset[str] = frozenset()


def watch_log_file(path: Path) -> None:
    """A subprocess writes its log here: read it after the test that started it."""
    _log_files.append(path)


def find_names(lines: Iterable[str], names: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(name, line) for every name found in the lines, plain or JSON-escaped (non-ASCII)."""
    patterns = []
    for name in sorted(names):
        forms = {name, json.dumps(name)[1:-1]}
        patterns.append(
            (name, re.compile("|".join(rf"(?<!\w){re.escape(form)}(?!\w)" for form in forms)))
        )
    for line in lines:
        for name, pattern in patterns:
            if pattern.search(line):
                yield name, line


def pytest_configure(config: pytest.Config) -> None:
    global _names
    _names = patient_names()
    root = logging.getLogger()
    root.addHandler(_collector)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)  # INFO records are the ones most likely to name a case


@pytest.fixture(autouse=True)
def _no_patient_names_in_logs() -> Iterator[None]:
    """Fails the test (in teardown) when a test patient's name was logged during it."""
    first_line, first_file = len(_collector.lines), len(_log_files)
    yield
    lines = _collector.lines[first_line:]
    del _collector.lines[first_line:]  # memory stays bounded over the suite
    for path in _log_files[first_file:]:
        if path.is_file():
            lines.extend(
                f"{path.name}: {line}"
                for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
            )
    del _log_files[first_file:]
    found = list(find_names(lines, _names))
    if found:
        name, line = found[0]
        pytest.fail(
            f"patient name {name!r} in the logs ({len(found)} lines), first: {line[:300]}",
            pytrace=False,
        )
