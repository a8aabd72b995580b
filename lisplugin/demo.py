"""``lisplugin demo``: the whole path on one machine, in a minute.

Starts the LIS simulator and the daemon (embedded defaults, free ports), sends an order over
MLLP and a capture over DICOM (the user's image, or a synthetic smear field), then shows the
ORU^R01 the LIS received and the case as the HTTP API reports it.
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import uvicorn
from sqlalchemy import select

from lisplugin.config import load_settings
from lisplugin.dicom.scu import send
from lisplugin.hl7.lis_sim import LisSimulator, build_test_order
from lisplugin.hl7.mllp import send_message
from lisplugin.http.app import create_app
from lisplugin.service.runtime import Runtime
from lisplugin.service.users import add_user, hash_password
from lisplugin.storage.orm_review import Role, User
from lisplugin.synthetic import save_synthetic


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


DEMO_USER = "demo"


def demo_account(runtime: Runtime) -> str:
    """A pathologist account for the demo, with a new random password each run."""
    password = secrets.token_urlsafe(12)
    with runtime.db.session() as session:
        user = session.scalar(select(User).where(User.username == DEMO_USER))
        if user is None:
            add_user(session, DEMO_USER, password, Role.PATHOLOGIST, by="demo")
        else:
            user.password_hash = hash_password(password)
    return password


def _heading(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)))


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lisplugin demo", description=__doc__)
    parser.add_argument("--image", type=Path, help="your own smear image (JPEG/PNG)")
    parser.add_argument("--config", type=Path, help="site settings YAML")
    parser.add_argument("--storage", type=Path, default=Path("var/demo"))
    parser.add_argument("--serve", action="store_true", help="keep running after the demo")
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--log", action="store_true", help="show the daemon's log too")
    args = parser.parse_args(argv)
    if not args.log:
        logging.getLogger().setLevel(logging.WARNING)

    settings = load_settings(args.config)
    settings.storage.path = args.storage
    settings.dicom.host = settings.hl7.listen_host = settings.http.host = "127.0.0.1"
    settings.dicom.port, settings.hl7.listen_port, settings.http.port = (
        _free_port(),
        _free_port(),
        _free_port(),
    )
    settings.cases.stable_seconds = 2.0
    args.storage.mkdir(parents=True, exist_ok=True)

    lis = LisSimulator(store=args.storage / "lis-inbox").start()
    settings.hl7.lis_host, settings.hl7.lis_port = "127.0.0.1", lis.port
    runtime = Runtime(settings)
    runtime.start()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(runtime), host="127.0.0.1", port=settings.http.port, log_level="warning"
        )
    )
    threading.Thread(target=server.run, daemon=True).start()
    api = f"http://127.0.0.1:{settings.http.port}"
    try:
        _heading("lisplugin demo")
        print(f"DICOM SCP  {settings.dicom.ae_title}@127.0.0.1:{settings.dicom.port}")
        print(
            f"MLLP in    127.0.0.1:{settings.hl7.listen_port}   LIS simulator 127.0.0.1:{lis.port}"
        )
        print(f"HTTP API   {api}/docs")
        accession = datetime.now(UTC).strftime("D%y%m%d%H%M%S")  # DICOM SH: 16 characters

        _heading(f"1. the LIS orders a smear review (accession {accession})")
        order = build_test_order(
            accession=accession,
            patient_id="DEMO001",
            family="Doe",
            given="Jane",
            birth_date="19800101",
            sex="F",
        )
        ack = send_message("127.0.0.1", settings.hl7.listen_port, order, timeout=10)
        print(order.replace("\r", "\n"))
        print(f"-> ACK {ack.code} {ack.text}")

        image = args.image
        if image is None:
            image = args.storage / "synthetic-field.jpg"
            save_synthetic(image, seed=7)
        _heading(f"2. the microscope sends a capture ({image})")
        for result in send(
            [image],
            "127.0.0.1",
            settings.dicom.port,
            settings.dicom.ae_title,
            accession=accession,
            patient_id="DEMO001",
        ):
            print(f"C-STORE {result.path.name}: status 0x{result.status or 0:04X} {result.comment}")

        _heading("3. lisplugin analyses the case once it is stable and reports to the LIS")
        if not lis.wait_for(1, timeout=args.timeout):
            print("no result reached the LIS simulator in time")
            return 1
        print(lis.received[-1].replace("\r", "\n"))

        _heading("4. the case in the HTTP API")
        password = demo_account(runtime)
        with httpx.Client(base_url=api, timeout=10) as client:
            token = client.post(
                "/api/session", json={"username": DEMO_USER, "password": password}
            ).json()["token"]
            client.headers["Authorization"] = f"Bearer {token}"
            case_id = client.get("/api/cases").json()[0]["id"]
            case = client.get(f"/api/cases/{case_id}").json()
        result = case["result"] or {}
        print(
            json.dumps(
                {
                    "id": case["id"],
                    "status": case["status"],
                    "accession": case["accession_number"],
                    "counts": result.get("counts"),
                    "differential": result.get("differential"),
                    "wbc_classified": result.get("wbc_classified"),
                    "flags": result.get("flags"),
                    "messages": case["messages"],
                },
                indent=2,
            )
        )
        print(f"\nFull case: GET {api}/api/cases/{case_id} (Authorization: Bearer <token>)")
        print(f"Review station: {api}/login  user {DEMO_USER!r}, password {password!r}")
        if args.serve:
            print("Serving; Ctrl-C to stop.")
            while True:
                time.sleep(3600)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        server.should_exit = True
        runtime.stop()
        lis.stop()
