"""The Storage SCP: microscopes and slide scanners push captures here with C-STORE.

Success is only answered after the application's store callback returned, i.e. after the
instance is durable; a sender that gets a failure keeps its copy and can retry. Status codes and
Error Comments are documented in interfaces/dicom-conformance.md (a test keeps them in step).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event
from pynetdicom.sop_class import ModalityWorklistInformationFind, Verification
from pynetdicom.transport import ThreadedAssociationServer

from lisplugin.config import DicomSettings
from lisplugin.dicom.decode import UnusableInstance, validate_identity
from lisplugin.dicom.mwl import WorklistSCP
from lisplugin.dicom.sop import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES

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
    ) -> None:
        self.settings = settings
        self._store = store
        self._refused = refused
        self._worklist = worklist
        self._server: ThreadedAssociationServer | None = None

    def start(self) -> ThreadedAssociationServer:
        """Listen in background threads; with port 0 the OS picks one (see ``port``)."""
        if self._server is not None:
            raise RuntimeError("StorageSCP already started")
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_pdu_size = self.settings.max_pdu
        # Only the supported contexts exist, so other SOP classes and syntaxes are rejected
        # during association negotiation instead of failing one C-STORE at a time.
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification, list(TRANSFER_SYNTAXES[:2]))
        ae.require_calling_aet = list(self.settings.allowed_calling_aets)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo)]
        if self._worklist is not None:  # Modality Worklist C-FIND on the same AE (dicom/mwl.py)
            ae.add_supported_context(ModalityWorklistInformationFind, list(TRANSFER_SYNTAXES[:2]))
            handlers.append((evt.EVT_C_FIND, self._worklist.handle))
        self._server = ae.start_server(
            (self.settings.host, self.settings.port), block=False, evt_handlers=handlers
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
        # The instance as received, with a Part 10 header in front: never re-encoded.
        raw = PREAMBLE + encode_file_meta(file_meta) + request.DataSet.getvalue()
        try:
            ds = event.dataset
            ds.file_meta = file_meta
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
            validate_identity(ds)
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
        log.info("C-STORE %s from %s stored", sop_uid, calling)
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
