"""``lisplugin user add|list|disable``: the review station's accounts, managed by IT.

Passwords are read from standard input (one line; prompted twice without echo on a terminal),
never from the command line, where other users of the machine could see them. Works on the
daemon's database while it runs; every change is in the audit trail as ``cli:<login>``.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from lisplugin.config import load_settings
from lisplugin.storage.db import Database
from lisplugin.storage.orm_review import AuditEvent, Role, User, UserSession

MIN_PASSWORD = 8

#: argon2id with argon2-cffi's defaults (RFC 9106 low-memory profile).
_hasher = PasswordHasher()


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def _who() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no login name (e.g. a container without a passwd entry)
        return f"cli:uid{os.getuid()}"


def _read_password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            raise SystemExit("the passwords differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def add_user(session: Session, username: str, password: str, role: Role, by: str) -> User:
    """A new active account (``ValueError`` when the name is taken or the password short)."""
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"a password has at least {MIN_PASSWORD} characters")
    if session.scalar(select(User).where(User.username == username)):
        raise ValueError(f"user {username} exists")
    user = User(username=username, password_hash=hash_password(password), role=role)
    session.add(user)
    session.add(
        AuditEvent(username=by, action="user.add", after={"username": username, "role": role})
    )
    return user


def _add(db: Database, args: argparse.Namespace) -> int:
    password = _read_password()
    try:
        with db.session() as session:
            add_user(session, args.name, password, args.role, _who())
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"user {args.name} added ({args.role.value})")
    return 0


def _list(db: Database, args: argparse.Namespace) -> int:
    with db.session() as session:
        for user in session.scalars(select(User).order_by(User.username)):
            state = "active" if user.active else "disabled"
            print(f"{user.username:<24}{user.role.value:<14}{state}")
    return 0


def _disable(db: Database, args: argparse.Namespace) -> int:
    with db.session() as session:
        user = session.scalar(select(User).where(User.username == args.name))
        if user is None:
            print(f"no user {args.name}", file=sys.stderr)
            return 1
        session.add(
            AuditEvent(
                username=_who(),
                action="user.disable",
                before={"username": args.name, "active": user.active},
                after={"username": args.name, "active": False},
            )
        )
        user.active = False
        session.execute(delete(UserSession).where(UserSession.user_id == user.id))
    print(f"user {args.name} disabled; their sessions are closed")
    return 0


def cli(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="lisplugin user", description=__doc__)
    parser.add_argument("--config", type=Path, help="site settings YAML (default: built-in)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = commands.add_parser("add", help="add a user; the password is read from stdin")
    add.add_argument("name")
    add.add_argument("--role", type=Role, choices=list(Role), required=True)
    add.set_defaults(func=_add)
    commands.add_parser("list", help="list the users").set_defaults(func=_list)
    disable = commands.add_parser("disable", help="disable a user and close their sessions")
    disable.add_argument("name")
    disable.set_defaults(func=_disable)
    args = parser.parse_args(argv)
    logging.getLogger("alembic").setLevel(logging.WARNING)

    settings = load_settings(args.config)
    settings.storage.path.mkdir(parents=True, exist_ok=True)
    db = Database(settings.database_url)
    try:
        db.migrate()
        return int(args.func(db, args))
    finally:
        db.dispose()
