"""The outbox's "dicom" channel: C-STORE a stored report object to the PACS.

An outbox message's payload is the path of a Part 10 file; it is sent as it is, in its own
transfer syntax (Explicit VR Little Endian for everything lisplugin makes), with the implicit
syntax offered as a fallback. The PACS's answer decides what the outbox does next:

- Success, or a storage warning (B000, B006, B007: stored, possibly coerced): delivered;
- a failure status (A7xx out of resources, A9xx/Cxxx cannot understand, 0122 SOP class not
  supported...): rejected, kept with its code and Error Comment for someone to look at;
- no association (refused, aborted, unreachable) or no response: ``ReceiverUnavailable``,
  tried again later.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from lisplugin.config import PacsSettings
from lisplugin.core.delivery import Delivery, ReceiverUnavailable
from lisplugin.storage.orm import OutboxMessage

#: Statuses with which the PACS has stored the object (PS3.4 Table B.2-1).
STORED_WARNINGS = frozenset({0xB000, 0xB006, 0xB007})
#: Refused: SOP Class not supported (PS3.4 Annex B), for a context the PACS did not accept.
SOP_CLASS_NOT_SUPPORTED = "0122"
TIMEOUT_SECONDS = 30.0


def pacs_sender(settings: PacsSettings, calling_aet: str) -> Callable[[OutboxMessage], Delivery]:
    """A Sender that stores each message's file on the PACS named by ``settings``."""

    def send(message: OutboxMessage) -> Delivery:
        path = Path(message.payload)
        try:
            meta = read_file_meta_info(path)
        except (OSError, InvalidDicomError) as exc:
            # Nothing the PACS can change: keep it as rejected for someone to look at.
            return Delivery(False, "", f"cannot read {path}: {exc}")
        sop_class = UID(meta.MediaStorageSOPClassUID)
        syntaxes = list(
            dict.fromkeys(
                [UID(meta.TransferSyntaxUID), ExplicitVRLittleEndian, ImplicitVRLittleEndian]
            )
        )
        ae = AE(ae_title=calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_SECONDS
        ae.add_requested_context(sop_class, syntaxes)
        where = f"{settings.ae_title} at {settings.host}:{settings.port}"
        assoc = ae.associate(settings.host, settings.port, ae_title=settings.ae_title)
        if not assoc.is_established:
            if any(cx.abstract_syntax == sop_class for cx in assoc.rejected_contexts):
                # The PACS answered but takes no such objects (pynetdicom then aborts).
                return Delivery(
                    False, SOP_CLASS_NOT_SUPPORTED, f"{where} does not accept {sop_class.name}"
                )
            reason = "rejected the association" if assoc.is_rejected else "did not answer"
            if assoc.is_aborted:
                reason = "aborted the association"
            raise ReceiverUnavailable(f"{where} {reason}")
        try:
            accepted = {cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
            # The file's own bytes when its syntax was accepted, else re-encoded by pynetdicom
            # (every syntax offered is uncompressed, so nothing is lost).
            payload = path if meta.TransferSyntaxUID in accepted else dcmread(path)
            status = assoc.send_c_store(payload)
        except (OSError, RuntimeError) as exc:
            raise ReceiverUnavailable(f"{where}: {exc}") from exc
        finally:
            if assoc.is_established:
                assoc.release()
        if "Status" not in status:
            raise ReceiverUnavailable(f"{where} sent no C-STORE response")
        code = int(status.Status)
        comment = str(status.get("ErrorComment", "") or "")
        return Delivery(code == 0 or code in STORED_WARNINGS, f"{code:04X}", comment)

    return send
