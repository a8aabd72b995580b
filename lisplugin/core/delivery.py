"""What a receiver (LIS, PACS) answered to one outgoing message: the outbox's vocabulary,
shared by the senders at the edges (``hl7/``, ``reports/pacs.py``) and the outbox that decides
what to do next, so neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Delivery:
    """What a receiver answered: ``accepted`` means done; otherwise ``text`` says why not."""

    accepted: bool
    code: str
    text: str = ""
    #: Not accepted *now* (HL7 AR/CR): resent later, up to the worker's bound.
    retry: bool = False


class ReceiverUnavailable(Exception):
    """No answer (refused, timed out, connection lost): try again later."""
