"""MLLP transport on python-hl7's asyncio streams: the order listener and the result sender.

Inbound: ``MllpServer`` answers every MLLP block with what its handler returns, one block at a
time per server (handlers run in a worker thread, so blocking database work does not stall
other connections). ``MllpOrderListener`` is that server with the order handler: it parses,
hands the order to the application and answers AA, or AE/AR with an ERR segment. Nothing a peer
sends stops the listener.

Outbound: ``send_message`` opens a connection, sends one message, waits for its ACK and closes;
the durable outbox above it owns retries (``next_retry_delay``) and keeps the control id.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hl7.mllp import InvalidBlockError, open_hl7_connection, start_hl7_server
from hl7.mllp.streams import HL7StreamReader, HL7StreamWriter

from lisplugin.hl7.ack import ErrorCode, MessageRejected, ReceivedHeader, build_ack
from lisplugin.hl7.analyser import RESULT_MESSAGES, AnalyserCounts, parse_analyser_result
from lisplugin.hl7.orders import Order, parse_order
from lisplugin.hl7.oru import parse_ack

log = logging.getLogger(__name__)

#: Largest MLLP block accepted (bytes); a larger one is answered with AR.
MAX_BLOCK = 4 * 1024 * 1024
#: Seconds a connection may stay silent (or hold an unfinished message) before it is closed.
READ_TIMEOUT = 60.0
#: Connections served at once; more are closed as soon as they are accepted.
MAX_CONNECTIONS = 64

Handler = Callable[[str], str]
OrderCallback = Callable[[Order, str], None]
ResultCallback = Callable[[AnalyserCounts, str], None]


class LisUnreachable(ConnectionError):
    """No usable ACK: connection refused or lost, timeout, or an answer that is no ACK of ours."""


@dataclass(frozen=True)
class AckResult:
    code: str  # MSA-1: AA, AE, AR (or CA, CE, CR)
    control_id: str  # MSA-2: the control id of the message acknowledged
    text: str  # ERR-8, ERR-3.2 or MSA-3; empty for a plain AA

    @property
    def accepted(self) -> bool:
        return self.code in ("AA", "CA")


class MllpServer:
    """An MLLP server answering each received message with ``handler(message)``."""

    def __init__(
        self,
        host: str,
        port: int,
        handler: Handler,
        *,
        max_message_bytes: int = MAX_BLOCK,
        read_timeout: float = READ_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        allowed_peers: Sequence[str] = (),
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self._port = port
        self._handler = handler
        self.ssl_context = ssl_context  # MLLP over TLS when set
        #: Addresses or networks (``10.1.2.0/24``) that may connect; empty allows any.
        self.allowed_peers = [ipaddress.ip_network(p, strict=False) for p in allowed_peers]
        self.max_message_bytes = max_message_bytes
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self._refusing = False  # logged once per run of refused connections, not per refusal
        self._server: asyncio.Server | None = None
        self._clients: set[HL7StreamWriter] = set()
        self._one_at_a_time = asyncio.Lock()

    @property
    def port(self) -> int:
        """The port listened on (the one the OS chose when started with port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("MLLP server is not listening")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await start_hl7_server(
            self._serve,
            self.host,
            self._port,
            limit=self.max_message_bytes,
            ssl=self.ssl_context,
            ssl_handshake_timeout=self.read_timeout if self.ssl_context else None,
        )
        log.info("MLLP listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        async with self._one_at_a_time:  # the message in hand is answered first
            for writer in list(self._clients):
                writer.close()
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> MllpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def answer_oversized(self) -> str:
        """The answer to a message over ``max_message_bytes`` (its header is not kept)."""
        return self._handler("")

    def _allowed(self, peer: object) -> bool:
        if not self.allowed_peers:
            return True
        try:
            address = ipaddress.ip_address(peer[0])  # type: ignore[index]
        except (TypeError, IndexError, ValueError):
            return False
        return any(address in network for network in self.allowed_peers)

    async def _serve(self, reader: HL7StreamReader, writer: HL7StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if not self._allowed(peer):
            log.warning("MLLP connection from %s refused: not in hl7.allowed_peers", peer)
            writer.close()
            return
        if len(self._clients) >= self.max_connections:
            if not self._refusing:
                log.warning("MLLP: %d connections open, refusing more", len(self._clients))
            self._refusing = True
            writer.close()
            return
        self._refusing = False
        self._clients.add(writer)
        try:
            while True:
                try:
                    async with asyncio.timeout(self.read_timeout):
                        block = await reader.readblock()
                except TimeoutError:
                    pending = len(getattr(reader, "_buffer", b""))
                    log.warning(
                        "MLLP %s silent for %g s, closed%s",
                        peer,
                        self.read_timeout,
                        f"; unfinished message of {pending} bytes dropped" if pending else "",
                    )
                    return
                except asyncio.IncompleteReadError as exc:
                    if exc.partial.strip():
                        log.warning(
                            "MLLP %s closed inside a message; %d bytes dropped",
                            peer,
                            len(exc.partial),
                        )
                    return
                except InvalidBlockError as exc:
                    log.warning("MLLP %s sent a malformed block: %s", peer, exc)
                    block = b""  # answered like any unreadable message: AR
                except ValueError:  # over the stream limit: the rest cannot be re-synchronised
                    log.warning(
                        "MLLP %s sent a message over %d bytes; answered AR and closed",
                        peer,
                        self.max_message_bytes,
                    )
                    async with self._one_at_a_time:
                        answer = await asyncio.to_thread(self.answer_oversized)
                    writer.writeblock(answer.encode("utf-8"))
                    await writer.drain()
                    return
                async with self._one_at_a_time:
                    answer = await asyncio.to_thread(self._handler, _decode(block))
                    writer.writeblock(answer.encode("utf-8"))
                await writer.drain()
        except ConnectionError as exc:
            log.info("MLLP %s: %s", peer, exc)
        except Exception:
            log.exception("MLLP %s: connection dropped", peer)
        finally:
            self._clients.discard(writer)
            writer.close()


class BackgroundServer:
    """Runs an ``MllpServer`` on its own event loop in a daemon thread (``start``/``stop``).

    The daemon and the LIS simulator are threaded programs; this keeps asyncio inside.
    """

    def __init__(self, server: MllpServer, name: str) -> None:
        self.server = server
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._loop is not None and self._loop.is_running()

    def start(self) -> None:
        """Listen; returns once listening, or raises why it cannot (e.g. the port is taken)."""
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._run, args=(ready, failure), name=self.name, daemon=True
        )
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]

    def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self.server.start())
        except OSError as exc:
            failure.append(exc)
            loop.close()
            ready.set()
            return
        self._loop = loop
        ready.set()
        loop.run_forever()
        loop.run_until_complete(self.server.stop())
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop = self._thread = None


class MllpOrderListener(MllpServer):
    """Receives ORM^O01 / OML^O21 orders, and with ``on_result`` the analyser's ORU^R01 /
    OUL^R22 / OUL^R21 counts, and acknowledges each.

    ``on_order(order, message)`` gets the parsed order and the message text;
    ``on_result(counts, message)`` the analyser's counts. They run in a worker thread, one
    call at a time, and may raise ``MessageRejected`` (e.g. ``OrderRejected``) to answer AE/AR
    with that error; any other exception answers AR 207 so the LIS sends the message again
    later. The same message can arrive twice (the LIS resends when an ACK is lost), so both
    must be idempotent.
    """

    def __init__(
        self,
        host: str,
        port: int,
        on_order: OrderCallback,
        *,
        on_result: ResultCallback | None = None,
        application: str = "LISPLUGIN",
        facility: str = "",
        max_message_bytes: int = MAX_BLOCK,
        read_timeout: float = READ_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        allowed_peers: Sequence[str] = (),
        allowed_senders: Sequence[str] = (),
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(
            host,
            port,
            self._answer,
            max_message_bytes=max_message_bytes,
            read_timeout=read_timeout,
            max_connections=max_connections,
            allowed_peers=allowed_peers,
            ssl_context=ssl_context,
        )
        #: ``APP`` or ``APP^FACILITY`` (MSH-3, MSH-4) that may send orders; empty allows any.
        self.allowed_senders = {s.upper() for s in allowed_senders}
        self._on_order = on_order
        self._on_result = on_result
        self._application = application
        self._facility = facility

    def answer_oversized(self) -> str:
        error = MessageRejected(
            ErrorCode.APPLICATION_INTERNAL_ERROR,
            f"message larger than {self.max_message_bytes} bytes",
            ack_code="AR",
        )
        return build_ack("", error, application=self._application, facility=self._facility)

    def _sender_refused(self, message: str) -> MessageRejected | None:
        if not self.allowed_senders:
            return None
        header = ReceivedHeader(message)
        application, facility = header.application.upper(), header.facility.upper()
        if (
            application in self.allowed_senders
            or f"{application}^{facility}" in self.allowed_senders
        ):
            return None
        log.warning("order from %s^%s refused: not in hl7.allowed_senders", application, facility)
        return MessageRejected(
            ErrorCode.TABLE_VALUE_NOT_FOUND,
            "sending application/facility not allowed to send orders",
            "MSH^1^3",
            ack_code="AR",
        )

    def _answer(self, message: str) -> str:
        if refused := self._sender_refused(message):
            return build_ack(
                message, refused, application=self._application, facility=self._facility
            )
        header = ReceivedHeader(message)
        result = self._on_result is not None and header.field(9).upper() in RESULT_MESSAGES
        kind = "analyser result" if result else "order"
        try:
            if result:
                assert self._on_result is not None
                counts = parse_analyser_result(message)
                self._on_result(counts, message)
                done = f"analyser result {counts.control_id} accepted"
            else:
                order = parse_order(message)
                self._on_order(order, message)
                done = (
                    f"order {order.control_id} accepted: {order.order_control} "
                    f"{order.accession_number}"
                )
        except MessageRejected as exc:
            error = exc
        except Exception as exc:
            # The exception's text may quote the message (names, birth dates): the kind only,
            # the traceback at DEBUG level.
            log.error(
                "%s %s could not be processed: %s",
                kind,
                header.control_id or "(no control id)",
                type(exc).__name__,
            )
            log.debug("traceback", exc_info=True)
            error = MessageRejected(
                ErrorCode.APPLICATION_INTERNAL_ERROR,
                f"the {kind} could not be stored; send it again later",
            )
        else:
            log.info("%s", done)
            return build_ack(message, application=self._application, facility=self._facility)
        log.warning("%s answered %s", kind, error)
        return build_ack(message, error, application=self._application, facility=self._facility)


async def send_message_async(
    host: str, port: int, message: str, timeout: float, ssl_context: ssl.SSLContext | None = None
) -> AckResult:
    """Send one message over MLLP and return its ACK; ``LisUnreachable`` without one.

    ``timeout`` bounds the whole exchange (connect, send, ACK). The ACK must acknowledge this
    message (MSA-2 = its MSH-10).
    """
    control_id = ReceivedHeader(message).control_id
    writer: HL7StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await open_hl7_connection(host, port, limit=MAX_BLOCK, ssl=ssl_context)
            writer.writeblock(message.encode("utf-8"))
            await writer.drain()
            block = await reader.readblock()
    except TimeoutError as exc:
        raise LisUnreachable(f"no ACK from {host}:{port} within {timeout:g} s") from exc
    except asyncio.IncompleteReadError as exc:
        raise LisUnreachable(f"{host}:{port} closed the connection before the ACK") from exc
    except (OSError, InvalidBlockError, ValueError) as exc:
        raise LisUnreachable(f"MLLP exchange with {host}:{port} failed: {exc}") from exc
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    try:
        code, acknowledged, text = parse_ack(_decode(block))
    except ValueError as exc:
        raise LisUnreachable(f"{host}:{port} answered without a valid ACK: {exc}") from exc
    if acknowledged != control_id:
        raise LisUnreachable(f"{host}:{port} acknowledged {acknowledged!r}, not {control_id!r}")
    return AckResult(code=code, control_id=acknowledged, text=text)


def send_message(
    host: str, port: int, message: str, timeout: float, ssl_context: ssl.SSLContext | None = None
) -> AckResult:
    """``send_message_async`` for threads without an event loop (the outbox worker)."""
    return asyncio.run(send_message_async(host, port, message, timeout, ssl_context))


def next_retry_delay(attempt: int, initial: float, maximum: float) -> float:
    """Seconds to wait after the ``attempt``-th failed send (1 = first): doubling, capped."""
    if attempt < 1:
        raise ValueError(f"attempt must be 1 or more, not {attempt}")
    return float(min(maximum, initial * 2.0 ** min(attempt - 1, 64)))


def _decode(block: bytes) -> str:
    """UTF-8 as MSH-18 announces for our peers; Latin-1 for senders that still use it."""
    try:
        return block.decode("utf-8")
    except UnicodeDecodeError:
        return block.decode("latin-1")
