"""``lisplugin models list|promote|rollback``: which models the daemon analyses with.

An adapted or retrained models folder is used only after an admin promotes it. Promotion
scores the candidate and the model in use on the same cells and refuses a candidate that is
worse: on the site's held-back cells (``held-back.npz`` written by ``lisplugin adapt``; no
drop allowed) and on a reference set of labelled crops (``--reference`` or the one the
adaptation used; at most ``--reference-tolerance`` lower, default 1 point). The admin signs in
with their review-station account (password on standard input); promotion and rollback are in
the audit trail. The daemon picks the promoted folder up at its next case, without a restart.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from lisplugin.config import Settings, load_settings
from lisplugin.evaluation.differential import score_crops
from lisplugin.inference.store import HELD_BACK_FILE, ModelStore, ModelStoreError, stain_list
from lisplugin.storage.db import Database
from lisplugin.storage.orm_review import AuditEvent, Role, User


class Refused(RuntimeError):
    """The candidate is worse than the model in use, or cannot be checked."""


def _classifier(models: Path, settings: Settings) -> Any:
    from lisplugin.service.models import lab_classifier

    return lab_classifier(models, settings.analysis)


def gate(
    candidate: Path,
    current: Path,
    settings: Settings,
    reference: Path | None,
    skip_reference: bool,
    reference_tolerance: float,
) -> dict[str, Any]:
    """Score candidate and model in use on the same cells; raise :class:`Refused` if worse."""
    from lisplugin.inference.registry import ModelCardError, load_card

    try:  # both cards must load and match their ONNX files
        load_card(candidate, settings.analysis.detector)
        new = _classifier(candidate, settings)
    except ModelCardError as exc:
        raise Refused(f"candidate is not a usable models folder: {exc}") from None
    old = _classifier(current, settings)
    checks: dict[str, Any] = {"current": old.version, "candidate": new.version}
    held = candidate / HELD_BACK_FILE
    if held.is_file():
        data = np.load(held)
        crops, labels = data["crops"], data["labels"].astype(str)
        stains = stain_list(data.get("nuclei"), len(labels))
        checks["held_back"] = {
            "n": len(labels),
            "current": score_crops(old, list(crops), list(labels), stains)["accuracy"],
            "candidate": score_crops(new, list(crops), list(labels), stains)["accuracy"],
        }
        if checks["held_back"]["candidate"] < checks["held_back"]["current"]:
            raise Refused(
                f"worse on the site's {len(labels)} held-back cells: "
                f"{checks['held_back']['candidate']} < {checks['held_back']['current']} "
                f"(model in use {old.version})"
            )
    if reference is None:
        named = (load_card(candidate, settings.analysis.classifier).get("adaptation") or {}).get(
            "reference_dir"
        )
        reference = Path(named) if named and Path(named).is_dir() else None
    if reference is not None:
        from lisplugin.evaluation.differential import evaluate_folder

        split = "test" if (reference / "split.csv").is_file() else None

        def on_reference(models: Path) -> float:
            result = evaluate_folder(reference, models, None, split, settings.analysis.classifier)
            return round(result["accuracy"], 4)

        checks["reference"] = {
            "dir": str(reference),
            "split": split,
            "current": on_reference(current),
            "candidate": on_reference(candidate),
            "tolerance": reference_tolerance,
        }
        ref = checks["reference"]
        if ref["candidate"] < ref["current"] - reference_tolerance:
            raise Refused(
                f"worse on the reference set {reference}: {ref['candidate']} < "
                f"{ref['current']} - {reference_tolerance}"
            )
    elif not skip_reference:
        raise Refused("no reference set to check against: give --reference DIR (or "
                      "--skip-reference, which the audit trail records)")  # fmt: skip
    if "held_back" not in checks and "reference" not in checks:
        raise Refused("nothing to check the candidate on: no held-back cells, no reference set")
    checks["skipped_reference"] = reference is None
    return checks


def _admin(db: Database, username: str, password: str) -> str:
    from lisplugin.service.users import verify_password

    with db.session() as session:
        user = session.scalar(select(User).where(User.username == username))
        if user is None or not user.active or not verify_password(user.password_hash, password):
            raise PermissionError("unknown user, disabled account or wrong password")
        if user.role != Role.ADMIN:
            raise PermissionError(f"{username} is {user.role.value}; promoting models is for admin")
    return username


def _password() -> str:
    if sys.stdin.isatty():
        return getpass.getpass("password: ")
    return sys.stdin.readline().rstrip("\r\n")


def _audit(db: Database, username: str, action: str, before: Any, after: Any) -> None:
    with db.session() as session:
        session.add(AuditEvent(username=username, action=action, before=before, after=after))


def cli(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lisplugin models",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="site settings YAML (default: built-in)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("list", help="the models in use and the promotion history")
    promote = commands.add_parser("promote", help="use a new models folder (admin)")
    promote.add_argument("folder", type=Path, help="models folder (from adapt or train)")
    promote.add_argument("--user", required=True, help="admin account; password on stdin")
    promote.add_argument("--reference", type=Path, help="class folders of reference crops")
    promote.add_argument(
        "--reference-tolerance",
        type=float,
        default=0.01,
        help="largest accepted accuracy drop on the reference set (default 0.01)",
    )
    promote.add_argument("--skip-reference", action="store_true", help="no reference check")
    rollback = commands.add_parser("rollback", help="use the previous models again (admin)")
    rollback.add_argument("--user", required=True, help="admin account; password on stdin")
    args = parser.parse_args(argv)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    settings = load_settings(args.config)
    store = ModelStore.of(settings)
    if args.command == "list":
        print(json.dumps({"active": str(store.active()), "history": store.history()}, indent=2))
        return 0
    settings.storage.path.mkdir(parents=True, exist_ok=True)
    db = Database(settings.database_url)
    try:
        db.migrate()
        try:
            user = _admin(db, args.user, _password())
        except PermissionError as exc:
            print(f"lisplugin models: {exc}", file=sys.stderr)
            return 3
        current = store.active()
        if args.command == "rollback":
            try:
                restored = store.rollback(user)
            except ModelStoreError as exc:
                print(f"lisplugin models: {exc}", file=sys.stderr)
                return 1
            _audit(db, user, "models.rollback", {"folder": str(current)},
                   {"folder": str(restored)})  # fmt: skip
            print(f"models in use: {restored}")
            return 0
        try:
            checks = gate(
                args.folder, current, settings, args.reference, args.skip_reference,
                args.reference_tolerance,
            )  # fmt: skip
        except Refused as exc:
            _audit(db, user, "models.promote.refused", {"folder": str(current)},
                   {"candidate": str(args.folder), "reason": str(exc)})  # fmt: skip
            print(f"lisplugin models: refused: {exc}", file=sys.stderr)
            return 1
        target = store.promote(args.folder, checks["candidate"], user, checks)
        _audit(db, user, "models.promote", {"folder": str(current)},
               {"folder": str(target), "checks": checks})  # fmt: skip
        print(json.dumps({"promoted": str(target), "checks": checks}, indent=2))
        return 0
    finally:
        db.dispose()
