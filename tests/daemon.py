"""`lisplugin serve` as a real subprocess on free loopback ports, for end-to-end tests.

Before its first start the daemon's database gets an account (``lisplugin user add``, as IT
would make one); after every start the fixture signs in and reads the API with that bearer
token.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from phi_guard import watch_log_file

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now and never handed out before in this test run: two calls in a row may
    otherwise get the same port back from the kernel (a DICOM and an MLLP listener collided)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@dataclass
class Daemon:
    storage: Path
    database_url: str
    lis_port: int
    extra_env: dict[str, str] = field(default_factory=dict)
    dicom_port: int = field(default_factory=free_port)
    hl7_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    username: str = "e2e"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    token: str | None = None
    #: The interpreter that runs ``lisplugin`` and its working directory (an installed copy).
    python: str = sys.executable
    cwd: Path | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.storage / f"daemon-{self.starts}.log"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "LISPLUGIN_DICOM__HOST": "127.0.0.1",
                "LISPLUGIN_DICOM__PORT": str(self.dicom_port),
                "LISPLUGIN_HL7__LISTEN_HOST": "127.0.0.1",
                "LISPLUGIN_HL7__LISTEN_PORT": str(self.hl7_port),
                "LISPLUGIN_HL7__LIS_HOST": "127.0.0.1",
                "LISPLUGIN_HL7__LIS_PORT": str(self.lis_port),
                "LISPLUGIN_HL7__ACK_TIMEOUT_SECONDS": "3",
                "LISPLUGIN_HL7__RETRY_INITIAL_SECONDS": "0.5",
                "LISPLUGIN_HL7__RETRY_MAX_SECONDS": "2",
                "LISPLUGIN_HTTP__PORT": str(self.http_port),
                "LISPLUGIN_STORAGE__PATH": str(self.storage),
                "LISPLUGIN_DATABASE__URL": self.database_url,
                "LISPLUGIN_CASES__STABLE_SECONDS": "2",
            }
        )
        env.update(self.extra_env)
        return env

    def add_user(self, name: str, role: str, password: str) -> None:
        """``lisplugin user add`` against the daemon's database (password on stdin)."""
        subprocess.run(
            [self.python, "-m", "lisplugin", "user", "add", name, "--role", role],
            input=password + "\n",
            env=self.env(),
            cwd=self.cwd,
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def sign_in(self, name: str, password: str) -> str:
        """A bearer token for ``name`` (``POST /api/session``)."""
        response = httpx.post(
            f"{self.api}/api/session", json={"username": name, "password": password}, timeout=10
        )
        response.raise_for_status()
        return str(response.json()["token"])

    def start(self, timeout: float = 90.0) -> Daemon:
        self.storage.mkdir(parents=True, exist_ok=True)
        if self.starts == 0:
            self.add_user(self.username, "admin", self.password)
        self.starts += 1
        watch_log_file(self.log_path)
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [self.python, "-m", "lisplugin", "serve"],
            env=self.env(),
            cwd=self.cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.api}/readyz", timeout=2).status_code == 200:
                    self.token = self.sign_in(self.username, self.password)
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"daemon not ready: {self.log_path.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """An abrupt end (power cut, OOM kill): nothing gets to clean up."""
        self.stop(signal.SIGKILL)

    def get(self, path: str) -> Any:
        response = httpx.get(
            f"{self.api}{path}", headers={"Authorization": f"Bearer {self.token}"}, timeout=10
        )
        response.raise_for_status()
        return response.json()

    def wait_for_case(self, accession: str, statuses: set[str], timeout: float = 120) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for case in self.get("/api/cases"):
                if case["accession_number"] == accession and case["status"] in statuses:
                    return self.get(f"/api/cases/{case['id']}")
            time.sleep(0.5)
        raise TimeoutError(f"case {accession} did not reach {statuses}")
