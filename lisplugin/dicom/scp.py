"""The Storage SCP: microscopes and slide scanners push captures here with C-STORE.

Success is only answered after the application's store callback returned, i.e. after the
instance is durable; a sender that gets a failure keeps its copy and can retry. Status codes and
Error Comments are documented in interfaces/dicom-conformance.md (a test keeps them in step).
"""

from __future__ import annotations

import logging
import socket
import threading
import zlib
from collections.abc import Callable
from io import BytesIO

from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dsutils import decode, encode_file_meta
from pynetdicom.events import Event
from pynetdicom.sop_class import ModalityWorklistInformationFind, Verification
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from lisplugin.config import DicomSettings, InstanceLimits
from lisplugin.dicom.decode import UnusableInstance, validate_header
from lisplugin.dicom.mwl import WorklistSCP
from lisplugin.dicom.reactor import WakingSocket, install, wake_on_data
from lisplugin.dicom.sop import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
from lisplugin.tls import server_context

log = logging.getLogger(__name__)

#: The application's durable store: keeps ``raw`` (a DICOM Part 10 file, data set bytes as
#: received) and records it before returning. Raising ``UnusableInstance`` refuses the instance;
#: anything else is a storage fault. The calling AE title is in both files' meta as (0002,0016)
#: Source Application Entity Title. Called from several association threads at once.
StoreCallback = Callable[[Dataset, bytes], None]
#: Keeps a refused instance with its reason (quarantine): ``(raw, reason, sop_uid, calling_aet)``.
RefusedCallback = Callable[[bytes, str, str, str], None]

SUCCESS = 0x0000
#: Transient: the store callback failed (disk, database); the sender should retry later.
OUT_OF_RESOURCES = 0xA700
#: The instance cannot be filed: identity UIDs missing/malformed or not those of the request.
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
#: Permanent: the data set or its pixel data cannot be decoded or are not supported.
CANNOT_UNDERSTAND = 0xC000

#: Every status a C-STORE response from this SCP can carry (checked against the docs).
STORE_STATUSES: dict[int, str] = {
    SUCCESS: "Success",
    OUT_OF_RESOURCES: "Refused: Out of Resources",
    DATASET_DOES_NOT_MATCH_SOP_CLASS: "Error: Data Set does not match SOP Class",
    CANNOT_UNDERSTAND: "Error: Cannot understand",
}

PREAMBLE = b"\x00" * 128 + b"DICM"
#: (0000,0902) Error Comment is LO: at most 64 characters, no backslash or control characters.
ERROR_COMMENT_MAX = 64


class StorageSCP:
    """C-STORE (the supported microscopy and secondary-capture classes) and C-ECHO SCP."""

    def __init__(
        self,
        settings: DicomSettings,
        store: StoreCallback,
        refused: RefusedCallback | None = None,
        worklist: WorklistSCP | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.settings = settings
        self._store = store
        self._refused = refused
        self._worklist = worklist
        #: Bind with SO_REUSEPORT: several processes listen on one port and the kernel spreads
        #: the connections among them (``dicom.ingest_processes``; Linux).
        self.reuse_port = reuse_port
        self._server: ThreadedAssociationServer | None = None

    def start(self) -> ThreadedAssociationServer:
        """Listen in background threads; with port 0 the OS picks one (see ``port``)."""
        if self._server is not None:
            raise RuntimeError("StorageSCP already started")
        settings = self.settings
        install()  # reactors woken by their messages, not 1 ms polls (``dicom.reactor``)
        ae = AE(ae_title=settings.ae_title)
        ae.maximum_pdu_size = settings.max_pdu
        ae.maximum_associations = settings.max_associations
        ae.acse_timeout = settings.acse_timeout
        ae.dimse_timeout = settings.dimse_timeout
        ae.network_timeout = settings.network_timeout
        # Only the supported contexts exist, so other SOP classes and syntaxes are rejected
        # during association negotiation instead of failing one C-STORE at a time.
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification, list(TRANSFER_SYNTAXES[:2]))
        ae.require_calling_aet = list(self.settings.allowed_calling_aets)
        # An association addressed to another AE title was meant for another node.
        ae.require_called_aet = True
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo)]
        if self._worklist is not None:  # Modality Worklist C-FIND on the same AE (dicom/mwl.py)
            ae.add_supported_context(ModalityWorklistInformationFind, list(TRANSFER_SYNTAXES[:2]))
            handlers.append((evt.EVT_C_FIND, self._worklist.handle))
        server_class = _SharedPortServer if self.reuse_port else ThreadedAssociationServer
        self._server = ae.make_server(
            (self.settings.host, self.settings.port),
            evt_handlers=handlers,
            ssl_context=server_context(settings.tls),
            server_class=server_class,
            request_handler=_BoundedRequestHandler,
        )
        ae._servers.append(self._server)  # as start_server does: shutdown() removes it
        thread = threading.Thread(
            target=self._server.serve_forever, name=f"dicom-acceptor-{self.port}", daemon=True
        )
        thread.start()
        self._server.peers = _PeerCounter(settings.max_associations_per_peer)  # type: ignore[attr-defined]
        self._server.read_limits = (  # type: ignore[attr-defined]
            _pdu_read_limit(settings.max_pdu),
            settings.limits.max_instance_bytes + _PDU_SLACK,
        )
        log.info(
            "DICOM SCP %s listening on %s:%d",
            self.settings.ae_title,
            self.settings.host,
            self.port,
        )
        return self._server

    @property
    def port(self) -> int:
        """The port actually bound (differs from the settings when those say 0)."""
        if self._server is None:
            raise RuntimeError("StorageSCP not started")
        return int(self._server.server_address[1])

    def stop(self) -> None:
        """Stop listening; returns once running associations have ended (at most the timeouts)."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_echo(self, event: Event) -> int:
        return SUCCESS

    def _on_store(self, event: Event) -> Dataset:
        request = event.request
        calling = event.assoc.requestor.ae_title
        sop_uid = str(request.AffectedSOPInstanceUID or "")
        file_meta = event.file_meta
        file_meta.SourceApplicationEntityTitle = calling
        received = request.DataSet.getvalue()
        sock = event.assoc.dul.socket
        if isinstance(sock, _BoundedSocket):
            sock.received = 0  # the next instance gets the whole budget again
        # The instance as received, with a Part 10 header in front: never re-encoded.
        raw = PREAMBLE + encode_file_meta(file_meta) + received
        try:
            ds = _decode_bounded(event, received, self.settings.limits)
            ds.file_meta = file_meta
        except UnusableInstance as exc:  # over a limit: refused with that reason
            return self._refuse(exc, raw, calling, sop_uid)
        except Exception as exc:  # a data set pydicom cannot parse
            return self._refuse(
                UnusableInstance(f"undecodable data set: {exc}"), raw, calling, sop_uid
            )
        return _status(*self.receive(ds, raw, calling, str(request.AffectedSOPClassUID), sop_uid))

    def receive(
        self, ds: Dataset, raw: bytes, calling: str, sop_class_uid: str, sop_uid: str
    ) -> tuple[int, str]:
        """Check, store (or quarantine) one instance: (status, Error Comment).

        The one ingest path of C-STORE and of STOW-RS (``lisplugin.http.dicomweb``), which
        passes the instance's own class and UID as the "request" values.
        """
        try:
            sop_class = str(ds.get("SOPClassUID", "") or "")
            if sop_class != sop_class_uid:
                raise UnusableInstance("SOP Class UID differs from request", identity=True)
            validate_header(ds, self.settings.limits)
            if str(ds.SOPInstanceUID).strip() != sop_uid:
                raise UnusableInstance("SOP Instance UID differs from request", identity=True)
        except UnusableInstance as exc:
            return self._refused_status(exc, raw, calling, sop_uid)
        except Exception as exc:  # a data set pydicom cannot parse
            return self._refused_status(
                UnusableInstance(f"undecodable data set: {exc}"), raw, calling, sop_uid
            )
        try:
            self._store(ds, raw)
        except UnusableInstance as exc:
            return self._refused_status(exc, raw, calling, sop_uid)
        except Exception as exc:
            log.exception("C-STORE %s from %s: storing failed", sop_uid, calling)
            return OUT_OF_RESOURCES, f"storage failed: {type(exc).__name__}"
        log.debug("C-STORE %s from %s stored", sop_uid, calling)  # ingest logs the case
        return SUCCESS, ""

    def _refuse(self, exc: UnusableInstance, raw: bytes, calling: str, sop_uid: str) -> Dataset:
        return _status(*self._refused_status(exc, raw, calling, sop_uid))

    def _refused_status(
        self, exc: UnusableInstance, raw: bytes, calling: str, sop_uid: str
    ) -> tuple[int, str]:
        """A failure status with the reason; the instance itself is kept in quarantine."""
        code = DATASET_DOES_NOT_MATCH_SOP_CLASS if exc.identity else CANNOT_UNDERSTAND
        log.warning("C-STORE %s from %s refused (0x%04X): %s", sop_uid, calling, code, exc.reason)
        if self._refused is not None:
            try:
                self._refused(raw, exc.reason, sop_uid, calling)
            except Exception:
                log.exception("could not quarantine %s", sop_uid)
                return OUT_OF_RESOURCES, "quarantine failed"
        return code, exc.reason


def _decode_bounded(event: Event, received: bytes, limits: InstanceLimits) -> Dataset:
    """The received data set parsed, inflating a deflated one only up to the limits.

    pynetdicom's ``event.dataset`` inflates without a bound (a few MB can become GBs).
    """
    syntax = event.context.transfer_syntax
    if len(received) > limits.max_instance_bytes:
        raise UnusableInstance(f"instance exceeds {limits.max_instance_bytes} bytes")
    if syntax.is_deflated:
        received = _inflate(received, limits)
    ds = decode(BytesIO(received), syntax.is_implicit_VR, syntax.is_little_endian)
    pixel_bytes = len(ds["PixelData"].value or b"") if "PixelData" in ds else 0
    if len(received) - pixel_bytes > limits.max_header_bytes:
        raise UnusableInstance(f"attributes besides pixel data exceed {limits.max_header_bytes}B")
    return ds


def _inflate(deflated: bytes, limits: InstanceLimits) -> bytes:
    """Raw-deflate data inflated, refused once past the inflation ratio or the size limit."""
    bound = min(limits.max_instance_bytes, int(len(deflated) * limits.max_inflation_ratio))
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(deflated, bound + 1)
    except zlib.error as exc:
        raise UnusableInstance(f"deflated data set corrupt: {exc}") from exc
    if len(inflated) > bound:
        raise UnusableInstance(f"deflated data set inflates beyond {bound} bytes")
    return inflated


#: Room for PDU and PDV headers and the command set above the data set budget.
_PDU_SLACK = 64 * 1024


def _pdu_read_limit(max_pdu: int) -> int:
    """The largest PDU body read from a peer; an association request fits in 64 KiB."""
    return max(max_pdu, 0) + _PDU_SLACK if max_pdu else 2**32


class _BoundedSocket(WakingSocket):
    """Refuses a PDU over the limit, and a data set that grows past its budget, while they
    arrive: the OSError makes pynetdicom treat the connection as closed and abort it."""

    max_read: int
    budget: int
    received: int

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > self.max_read:
            log.warning("association aborted: PDU of %d bytes over %d", nr_bytes, self.max_read)
            raise OSError(f"PDU of {nr_bytes} bytes exceeds {self.max_read}")
        data = super().recv(nr_bytes)
        self.received += len(data)
        if self.received > self.budget:
            log.warning("association aborted: data set over %d bytes", self.budget)
            raise OSError(f"data set exceeds {self.budget} bytes")
        return data


class _SharedPortServer(ThreadedAssociationServer):
    """An association server whose port other processes may listen on too (SO_REUSEPORT)."""

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class _PeerCounter:
    """Connections per peer address, so that one host cannot take every association slot."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}
        self._refusing: set[str] = set()
        self._lock = threading.Lock()

    def enter(self, peer: str) -> bool:
        with self._lock:
            if self._open.get(peer, 0) >= self.limit:
                if peer not in self._refusing:  # logged once per run of refusals
                    log.warning(
                        "DICOM: %s has %d connections open, refusing more", peer, self.limit
                    )
                self._refusing.add(peer)
                return False
            self._refusing.discard(peer)
            self._open[peer] = self._open.get(peer, 0) + 1
            return True

    def leave(self, peer: str) -> None:
        with self._lock:
            self._open[peer] -= 1
            if not self._open[peer]:
                del self._open[peer]


class _BoundedRequestHandler(RequestHandler):
    """pynetdicom's handler with its association socket bounded by the server's limits, and
    at most ``max_associations_per_peer`` connections from one address."""

    _assoc: Association | None = None

    def handle(self) -> None:
        peers: _PeerCounter = self.server.peers  # type: ignore[attr-defined]
        peer = str(self.client_address[0])
        if not peers.enter(peer):
            self.request.close()
            return
        try:
            super().handle()  # starts the association's own thread
            if self._assoc is not None:
                self._assoc.join()  # the peer's slot is held while the association lives
        finally:
            peers.leave(peer)
            if self._assoc is not None and isinstance(self._assoc.dul.socket, WakingSocket):
                self._assoc.dul.socket.close_wake()

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        self._assoc = assoc
        sock = assoc.dul.socket
        # Same object, narrower class: re-creating the socket would signal the
        # connection to the state machine twice.
        sock.__class__ = _BoundedSocket
        sock.max_read, sock.budget = self.server.read_limits  # type: ignore[attr-defined]
        sock.received = 0
        wake_on_data(assoc)
        return assoc


def _status(code: int, comment: str = "") -> Dataset:
    """A C-STORE status data set; a non-empty comment goes into (0000,0902) Error Comment."""
    status = Dataset()
    status.Status = code
    if comment:
        status.ErrorComment = error_comment(comment)
    return status


def error_comment(text: str) -> str:
    """Make text a valid LO value: printable ASCII, no backslash, at most 64 characters."""
    cleaned = "".join(c if " " <= c <= "~" and c != "\\" else " " for c in text)
    return " ".join(cleaned.split())[:ERROR_COMMENT_MAX]
