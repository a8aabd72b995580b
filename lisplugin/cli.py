"""The ``lisplugin`` command: the daemon, one-off analysis, and the tools around them."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

#: Sub-commands whose argument parsing lives in the module that implements them.
DELEGATED: dict[tuple[str, ...], str] = {
    ("train", "classifier"): "lisplugin.training.classifier",
    ("train", "detector"): "lisplugin.training.detector",
    ("evaluate", "detection"): "lisplugin.evaluation.detection",
    ("evaluate", "differential"): "lisplugin.evaluation.differential",
    ("evaluate", "field-differential"): "lisplugin.evaluation.field_differential",
    ("bench",): "lisplugin.evaluation.bench",
    ("send",): "lisplugin.dicom.scu",
    ("lis-sim",): "lisplugin.hl7.lis_sim",
    ("demo",): "lisplugin.service.demo",
    ("user",): "lisplugin.service.users",
}


def _delegate(argv: Sequence[str]) -> int | None:
    for words, module in sorted(DELEGATED.items(), key=lambda kv: -len(kv[0])):
        if tuple(argv[: len(words)]) == words:
            return int(importlib.import_module(module).cli(list(argv[len(words) :])) or 0)
    return None


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from lisplugin.config import load_settings
    from lisplugin.http.app import create_app
    from lisplugin.service.runtime import Runtime

    settings = load_settings(args.config)
    # uvicorn re-raises SIGTERM once it has shut down; as SystemExit it still lets the
    # runtime finish the message in flight and record it, instead of dying mid-delivery.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    runtime = Runtime(settings)
    runtime.start()
    try:
        tls = settings.http.tls
        uvicorn.run(
            create_app(runtime),
            host=settings.http.host,
            port=settings.http.port,
            log_level="info",
            **(
                {
                    "ssl_certfile": str(tls.cert_file),
                    "ssl_keyfile": str(tls.key_file),
                    "ssl_ca_certs": str(tls.ca_file) if tls.ca_file else None,
                    "ssl_cert_reqs": 2 if tls.ca_file else 0,  # ssl.CERT_REQUIRED / CERT_NONE
                }
                if tls.enabled
                else {}
            ),
        )
    finally:
        runtime.stop()
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from lisplugin.config import load_settings
    from lisplugin.service.pipeline import Pipeline, read_fields

    settings = load_settings(args.config)
    fields = read_fields([Path(p) for p in args.paths])
    if not fields:
        print("no images or DICOM files found in the given paths", file=sys.stderr)
        return 2
    pipeline = Pipeline.from_settings(settings)
    result = pipeline.analyse(fields, patient={}, previous=None)
    report = pipeline.to_json(result)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"fields: {len(fields)}   cells: {report['counts']}")
    print(f"leukocytes classified: {report['wbc_classified']}")
    for name, percent in report["differential"].items():
        print(f"  {name:<14}{percent:6.1f} %")
    for flag in report["flags"]:
        print(f"  flag {flag['code']}: {flag['text']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lisplugin", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon (DICOM SCP, MLLP, HTTP API)")
    serve.add_argument("--config", type=Path, help="site settings YAML (default: built-in)")
    serve.set_defaults(func=_serve)

    analyze = commands.add_parser("analyze", help="analyse images or DICOM files, no daemon")
    analyze.add_argument("paths", nargs="+", help="image files, DICOM files or folders")
    analyze.add_argument("--json", action="store_true", help="print one JSON object")
    analyze.add_argument("--config", type=Path)
    analyze.set_defaults(func=_analyze)

    for name, help_text in (
        ("send", "wrap JPEG/PNG as VL Microscopic Image and C-STORE (DICOM files as they are)"),
        ("lis-sim", "a small LIS: ACKs and stores ORUs, can send a test order"),
        ("demo", "start daemon and LIS simulator, send a capture, show the ORU and the case"),
        ("train", "train a model: classifier | detector"),
        ("evaluate", "evaluate a model: detection | differential"),
        ("bench", "time the whole analysis per field on this machine"),
        ("user", "review-station accounts: add NAME --role ROLE | list | disable NAME"),
    ):
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # ONNX Runtime has its own thread pool; numpy's BLAS threads only fight it for the cores
    # (a small resize was seen to stall for tens of ms under load). Set before numpy loads.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    delegated = _delegate([a for a in argv if a not in ("-v", "--verbose")])
    if delegated is not None:
        return delegated
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
