"""Installed as hospital IT installs it: the built wheel in a fresh venv outside the checkout.

The venv borrows the dependencies of the development venv through a ``.pth`` file (offline and
fast); lisplugin itself, its models and its default configuration come from the wheel only.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.daemon import Daemon, free_port

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "deploy" / "lisplugin.service"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a fresh venv with the built wheel installed (no access to the checkout)."""
    root = tmp_path_factory.mktemp("install")
    wheels = root / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(REPO),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("lisplugin-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # The dependencies only: the development venv's site-packages, after the new venv's own.
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    return python


def test_wheel_installs_and_serves_outside_the_checkout(
    installed: Path, tmp_path: Path, lis_port: int
) -> None:
    where = subprocess.run(
        [
            str(installed),
            "-c",
            "import lisplugin.config as c; print(c.__file__);"
            "print(c.DEFAULT_MODELS_DIR); print(c.DEFAULT_CONFIG_DIR)",
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert all(not path.startswith(str(REPO)) for path in where), where
    assert Path(where[1], "cell-detector.onnx").is_file()
    assert Path(where[2], "rules.yaml").is_file()

    daemon = Daemon(tmp_path / "var", "", lis_port, python=str(installed), cwd=tmp_path)
    try:
        daemon.start(timeout=120)
        assert daemon.get("/api/cases") == []
    finally:
        daemon.stop()


def test_init_lays_out_config_and_models(installed: Path, tmp_path: Path) -> None:
    target = tmp_path / "etc"
    subprocess.run(
        [str(installed), "-m", "lisplugin", "init", str(target)],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert {p.name for p in target.glob("*.yaml")} >= {"site.yaml", "rules.yaml", "loinc.yaml"}
    assert (target / "models" / "leukocyte-classifier.md").is_file()
    settings = subprocess.run(
        [
            str(installed),
            "-c",
            "from lisplugin.config import load_settings as l; "
            f"s = l({str(target / 'site.yaml')!r}); print(s.config_dir, s.analysis.models_dir)",
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert settings == [str(target.resolve()), str((target / "models").resolve())]
    again = subprocess.run(
        [str(installed), "-m", "lisplugin", "init", str(target)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 2 and "exists" in again.stderr


@pytest.fixture
def lis_port() -> int:
    return free_port()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze absent")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    text = UNIT.read_text()
    for line in (
        "User=lisplugin",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "Type=notify",
        "WatchdogSec=",
        "MemoryMax=",
        "LimitNOFILE=",
        "TasksMax=",
    ):
        assert line in text, line
    # verify needs the ExecStart binary to exist: point it at one that does.
    units = []
    for source in (
        UNIT,
        UNIT.with_name("lisplugin-purge.service"),
        UNIT.with_name("lisplugin-purge.timer"),
    ):
        unit = tmp_path / source.name
        unit.write_text(
            source.read_text().replace(
                "/opt/lisplugin/.venv/bin/lisplugin", shutil.which("true") or ""
            )
        )
        units.append(str(unit))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *units],
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = [line for line in result.stderr.splitlines() if "lisplugin" in line]
    assert result.returncode == 0 and not problems, result.stderr
