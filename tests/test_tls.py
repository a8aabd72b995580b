"""TLS on the DICOM and MLLP edges (issue 10, finding 5), with mutual TLS, over real sockets.

Certificates come from a throw-away CA (tests/tls_factory.py, openssl).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicom_factory import SCP_AET, Recorder, instance, smear
from pynetdicom import AE
from test_hl7_mllp import ORDER, Application, BackgroundLoop, oru
from tls_factory import Pki, make_pki

from lisplugin.config import DicomSettings, Hl7Settings, Settings, TlsSettings
from lisplugin.dicom.scp import StorageSCP
from lisplugin.hl7.lis_sim import LisSimulator
from lisplugin.hl7.mllp import LisUnreachable, MllpOrderListener, MllpServer, send_message
from lisplugin.service.runtime import hl7_sender
from lisplugin.storage.orm import OutboxMessage
from lisplugin.tls import client_context, server_context

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def listener_tls(pki: Pki, mutual: bool = True) -> TlsSettings:
    return TlsSettings(
        enabled=True,
        cert_file=pki.server_cert,
        key_file=pki.server_key,
        ca_file=pki.ca if mutual else None,
    )


def client_tls(pki: Pki, with_certificate: bool = True) -> TlsSettings:
    return TlsSettings(
        enabled=True,
        ca_file=pki.ca,
        cert_file=pki.client_cert if with_certificate else None,
        key_file=pki.client_key if with_certificate else None,
    )


@pytest.fixture
def dicom_tls(pki: Pki) -> Iterator[tuple[StorageSCP, Recorder]]:
    recorder = Recorder()
    settings = DicomSettings(ae_title=SCP_AET, host="127.0.0.1", port=0, tls=listener_tls(pki))
    scp = StorageSCP(settings, recorder)
    scp.start()
    yield scp, recorder
    scp.stop()


def _associate(port: int, tls: TlsSettings | None) -> object:
    ae = AE(ae_title="MICROSCOPE1")
    ae.acse_timeout = ae.network_timeout = 5
    ds = instance(smear())
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    context = client_context(tls) if tls else None
    return ae.associate(
        "127.0.0.1", port, ae_title=SCP_AET, tls_args=(context, "127.0.0.1") if context else None
    )


def test_dicom_tls_with_client_certificate_stores(dicom_tls, pki: Pki) -> None:  # type: ignore[no-untyped-def]
    scp, recorder = dicom_tls
    assoc = _associate(scp.port, client_tls(pki))
    assert assoc.is_established  # type: ignore[attr-defined]
    try:
        assert assoc.send_c_store(instance(smear())).Status == 0  # type: ignore[attr-defined]
    finally:
        assoc.release()  # type: ignore[attr-defined]
    assert len(recorder.stored) == 1


@pytest.mark.parametrize("client", ["plain", "no-client-certificate"])
def test_dicom_tls_refuses_plain_and_anonymous_peers(dicom_tls, pki: Pki, client: str) -> None:  # type: ignore[no-untyped-def]
    scp, recorder = dicom_tls
    tls = None if client == "plain" else client_tls(pki, with_certificate=False)
    assoc = _associate(scp.port, tls)
    assert not assoc.is_established  # type: ignore[attr-defined]
    assert recorder.stored == []


@pytest.fixture
def mllp_tls(pki: Pki) -> Iterator[tuple[MllpOrderListener, Application]]:
    application = Application()
    server = MllpOrderListener(
        "127.0.0.1", 0, application.on_order, ssl_context=server_context(listener_tls(pki))
    )
    loop = BackgroundLoop()
    loop.run(server.start())
    yield server, application
    loop.run(server.stop())
    loop.close()


def test_mllp_over_tls_takes_orders(mllp_tls, pki: Pki) -> None:  # type: ignore[no-untyped-def]
    server, application = mllp_tls
    ack = send_message("127.0.0.1", server.port, ORDER, 10, client_context(client_tls(pki)))
    assert ack.code == "AA"
    assert len(application.orders) == 1


def test_mllp_over_tls_refuses_plain_and_anonymous_peers(mllp_tls, pki: Pki) -> None:  # type: ignore[no-untyped-def]
    server, application = mllp_tls
    anonymous = client_context(client_tls(pki, with_certificate=False))
    with pytest.raises(LisUnreachable):
        send_message("127.0.0.1", server.port, ORDER, 5, anonymous)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as plain:
        try:
            plain.sendall(b"\x0b" + ORDER.encode() + b"\x1c\r")
            answer = plain.recv(65536)
        except ConnectionResetError:
            answer = b""
    assert b"MSA|AA" not in answer
    assert application.orders == []


def test_results_go_to_the_lis_over_tls(pki: Pki, tmp_path: Path) -> None:
    """The outbox's sender with hl7.lis_tls: the LIS simulator's answers behind a TLS server."""
    lis = LisSimulator()  # its MLLP handler, served here with TLS
    server = MllpServer("127.0.0.1", 0, lis.answer, ssl_context=server_context(listener_tls(pki)))
    loop = BackgroundLoop()
    loop.run(server.start())
    try:
        settings = Settings(
            hl7=Hl7Settings(lis_port=server.port, lis_tls=client_tls(pki), ack_timeout_seconds=5)
        )
        message = OutboxMessage(channel="hl7", control_id="LP1-1", payload=oru("LP1-1"))
        delivery = hl7_sender(settings)(message)
        assert (delivery.accepted, delivery.code) == (True, "AA")
        assert len(lis.received) == 1
    finally:
        loop.run(server.stop())
        loop.close()


@pytest.mark.slow
def test_daemon_serves_https(pki: Pki, tmp_path: Path) -> None:
    """`lisplugin serve` with http.tls: HTTPS with the site's certificate; plain HTTP fails."""
    import subprocess
    import sys
    import time

    import httpx
    from daemon import Daemon, free_port

    daemon = Daemon(tmp_path / "var", f"sqlite:///{tmp_path / 'd.db'}", free_port())
    env = daemon.env() | {
        "LISPLUGIN_HTTP__TLS__ENABLED": "true",
        "LISPLUGIN_HTTP__TLS__CERT_FILE": str(pki.server_cert),
        "LISPLUGIN_HTTP__TLS__KEY_FILE": str(pki.server_key),
    }
    daemon.storage.mkdir(parents=True)
    with (tmp_path / "serve.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "lisplugin", "serve"], env=env, stdout=log, stderr=log
        )
    try:
        deadline, status = time.monotonic() + 120, None
        while status is None and time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            try:
                status = httpx.get(
                    f"https://127.0.0.1:{daemon.http_port}/healthz",
                    verify=ssl.create_default_context(cafile=str(pki.ca)),
                ).status_code
            except httpx.HTTPError:
                time.sleep(0.5)
        assert status == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{daemon.http_port}/healthz", timeout=5)
    finally:
        process.terminate()
        process.wait(timeout=30)
