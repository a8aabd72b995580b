"""TLS contexts from ``TlsSettings``, for the DICOM, MLLP and HTTP edges (Python's ssl module).

A listener presents ``cert_file``/``key_file``; with ``ca_file`` it also requires a client
certificate signed by that CA (mutual TLS). A client verifies the server against ``ca_file``
(the system's trust store when empty) and presents its own certificate when one is set.
TLS 1.2 is the minimum, as the DICOM BCP 195 profiles require.
"""

from __future__ import annotations

import ssl

from lisplugin.config import TlsSettings


def server_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """The listener's context, or None when TLS is off."""
    if not tls.enabled:
        return None
    if tls.cert_file is None or tls.key_file is None:
        raise ValueError("TLS enabled without cert_file and key_file")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.ca_file is not None:
        context.load_verify_locations(tls.ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """The connecting side's context, or None when TLS is off."""
    if not tls.enabled:
        return None
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert_file is not None and tls.key_file is not None:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context
