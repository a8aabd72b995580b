"""Who is calling: sign-in, sessions, CSRF protection and roles, for the API and the pages.

A session is a random token; the database keeps only its SHA-256 (a stolen backup gives no
usable token) and the session's CSRF token. Browsers carry the token in an HttpOnly,
SameSite=Strict cookie; every state-changing request that arrives with the cookie must also
carry the CSRF token in the ``X-CSRF-Token`` header (synchronizer token: the pages get it
from the server, a foreign site cannot read it). API clients send ``Authorization: Bearer
<token>`` instead, which no browser adds by itself, so those requests need no CSRF token.
A session ends after ``http.session_idle_minutes`` without a request, or when it is closed.
Passwords are stored as argon2id hashes (:mod:`lisplugin.service.users`).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from limits import RateLimitItemPerSecond
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from lisplugin.config import HttpSettings
from lisplugin.http.deps import RuntimeDep
from lisplugin.service.outbox import as_utc
from lisplugin.service.users import hash_password, verify_password
from lisplugin.storage.orm_review import AuditEvent, Role, User, UserSession

COOKIE = "lisplugin_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: Sliding expiry is written at most this often, not on every request.
_TOUCH_INTERVAL = timedelta(minutes=1)


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the user does not exist, so timing does not reveal user names."""
    return hash_password(secrets.token_urlsafe(16))


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """The signed-in user of one request and their session."""

    username: str
    role: Role
    session_id: int
    csrf_token: str
    expires_at: datetime


def authenticate(session: Session, username: str, password: str) -> User | None:
    """The active user with this name and password; None (and an audit event) otherwise."""
    user = session.scalar(select(User).where(User.username == username))
    valid = verify_password(user.password_hash if user else _dummy_hash(), password)
    if user is None or not valid or not user.active:
        session.add(
            AuditEvent(
                username=username[:64],
                action="session.refused",
                after={"reason": "disabled" if user and valid else "wrong username or password"},
            )
        )
        return None
    return user


class SignInThrottle:
    """Failed sign-ins counted per user name and per client address over a moving window;
    past the limit the name (or address) is locked until the window has moved on, checked
    before any password is hashed. Counts live in this process (one daemon per database)."""

    def __init__(self, settings: HttpSettings) -> None:
        window = max(1, int(settings.sign_in_lockout_minutes * 60))
        self._per_user = RateLimitItemPerSecond(settings.sign_in_failures_per_user, window)
        self._per_address = RateLimitItemPerSecond(settings.sign_in_failures_per_address, window)
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    def _keys(self, username: str, address: str) -> list[tuple[RateLimitItemPerSecond, str, str]]:
        return [
            (self._per_user, "user", username.casefold()),
            (self._per_address, "address", address),
        ]

    def locked_for(self, username: str, address: str) -> float:
        """Seconds until a locked name or address may try again; 0 when not locked."""
        now = datetime.now(UTC).timestamp()
        waits = [
            self._limiter.get_window_stats(item, kind, key).reset_time - now
            for item, kind, key in self._keys(username, address)
            if not self._limiter.test(item, kind, key)
        ]
        return max([0.0, *waits])

    def failed(self, username: str, address: str) -> None:
        for item, kind, key in self._keys(username, address):
            self._limiter.hit(item, kind, key)

    def succeeded(self, username: str) -> None:
        """A correct password resets the name's count (not the address's)."""
        self._limiter.clear(self._per_user, "user", username.casefold())


def sign_in_throttle(request: Request, runtime: RuntimeDep) -> SignInThrottle:
    """The app's throttle, made on first use from the runtime's settings."""
    state = request.app.state
    if getattr(state, "sign_in_throttle", None) is None:
        state.sign_in_throttle = SignInThrottle(runtime.settings.http)
    return state.sign_in_throttle


ThrottleDep = Annotated[SignInThrottle, Depends(sign_in_throttle)]


def refuse_locked(session: Session, username: str) -> None:
    """Audit a sign-in refused because the name or address is locked."""
    session.add(
        AuditEvent(username=username[:64], action="session.refused", after={"reason": "locked"})
    )


def open_session(session: Session, user: User, idle: timedelta) -> tuple[str, UserSession]:
    """A new session for ``user``; returns the token (shown once, never stored) and the row."""
    now = datetime.now(UTC)
    session.execute(delete(UserSession).where(UserSession.expires_at < now))
    token = secrets.token_urlsafe(32)
    row = UserSession(
        token_hash=token_hash(token),
        user_id=user.id,
        csrf_token=secrets.token_urlsafe(32),
        expires_at=now + idle,
    )
    session.add(row)
    session.add(AuditEvent(username=user.username, action="session.open"))
    session.flush()
    return token, row


def _presented_token(request: Request) -> tuple[str | None, bool]:
    """The session token and whether it came in the cookie (False: bearer header)."""
    authorization = request.headers.get("Authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip(), False
    return request.cookies.get(COOKIE), True


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail=detail, headers={"WWW-Authenticate": "Bearer"})


def signed_in_user(request: Request, runtime: RuntimeDep) -> Principal:
    """The caller's principal, or 401 (no valid session) / 403 (CSRF token missing or wrong).

    Runs in its own short transaction, committed before the route runs, so that the route's
    own writes never wait on it.
    """
    token, via_cookie = _presented_token(request)
    if not token:
        raise _unauthorized("sign in first (POST /api/session)")
    now = datetime.now(UTC)
    idle = timedelta(minutes=runtime.settings.http.session_idle_minutes)
    with runtime.db.session() as session:
        row = session.scalar(select(UserSession).where(UserSession.token_hash == token_hash(token)))
        if row is None:
            raise _unauthorized("not signed in or signed out; sign in again")
        if as_utc(row.expires_at) <= now:  # the row goes at the next sign-in's clean-up
            raise _unauthorized("session expired; sign in again")
        if not row.user.active:
            raise _unauthorized("account disabled")
        if via_cookie and request.method not in SAFE_METHODS:
            sent = request.headers.get(CSRF_HEADER, "")
            if not hmac.compare_digest(sent.encode(), row.csrf_token.encode()):
                raise HTTPException(403, detail=f"missing or wrong {CSRF_HEADER} header")
        if as_utc(row.expires_at) - now < idle - _TOUCH_INTERVAL:
            row.expires_at = now + idle
        return Principal(
            username=row.user.username,
            role=row.user.role,
            session_id=row.id,
            csrf_token=row.csrf_token,
            expires_at=as_utc(row.expires_at),
        )


PrincipalDep = Annotated[Principal, Depends(signed_in_user)]


def optional_user(request: Request, runtime: RuntimeDep) -> Principal | None:
    """For pages: the principal, or None when the browser should be sent to sign in."""
    try:
        return signed_in_user(request, runtime)
    except HTTPException as exc:
        if exc.status_code == 401:
            return None
        raise


def require_roles(*roles: Role) -> Callable[[Principal], Principal]:
    """A dependency that lets only ``roles`` through (403 for the others)."""

    def check(principal: PrincipalDep) -> Principal:
        if principal.role not in roles:
            needed = " or ".join(r.value for r in roles)
            raise HTTPException(
                403, detail=f"{principal.username} is {principal.role.value}; needs {needed}"
            )
        return principal

    return check


#: Clinical changes (reclassify, comment): the reviewers, not IT.
Reviewer = Annotated[Principal, Depends(require_roles(Role.TECHNOLOGIST, Role.PATHOLOGIST))]
#: Releasing a final or corrected result.
Pathologist = Annotated[Principal, Depends(require_roles(Role.PATHOLOGIST))]
