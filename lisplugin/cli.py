"""The ``lisplugin`` command: the daemon, one-off analysis, and the tools around them."""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Sub-commands whose argument parsing lives in the module that implements them.
DELEGATED: dict[tuple[str, ...], str] = {
    ("train", "classifier"): "lisplugin.training.classifier",
    ("train", "detector"): "lisplugin.training.detector",
    ("train", "quantize"): "lisplugin.training.quantize",
    ("train", "norms"): "lisplugin.training.norms",
    ("evaluate", "detection"): "lisplugin.evaluation.detection",
    ("evaluate", "differential"): "lisplugin.evaluation.differential",
    ("evaluate", "field-differential"): "lisplugin.evaluation.field_differential",
    ("evaluate", "cells"): "lisplugin.evaluation.cells",
    ("evaluate", "card-figures"): "lisplugin.evaluation.card_figures",
    ("bench",): "lisplugin.evaluation.bench",
    ("send",): "lisplugin.dicom.scu",
    ("lis-sim",): "lisplugin.hl7.lis_sim",
    ("demo",): "lisplugin.demo",
    ("user",): "lisplugin.service.users",
    ("adapt",): "lisplugin.training.adapt",
    ("models",): "lisplugin.service.model_admin",
    ("purge",): "lisplugin.service.lifecycle:purge_cli",
    ("backup",): "lisplugin.service.lifecycle:backup_cli",
    ("db",): "lisplugin.service.lifecycle:db_cli",
    ("soak",): "lisplugin.evaluation.soak",
}


#: One line per delegated command for ``--help`` (their modules load torch or models: not imported
#: just to describe them). A delegated command missing here is still listed, without a line.
SUMMARIES: dict[tuple[str, ...], str] = {
    ("train",): "train a model (needs the train extra and the public data)",
    ("train", "classifier"): "train the leukocyte classifier on PBC",
    ("train", "detector"): "train the cell detector on BCCD / TXL-PBC",
    ("train", "quantize"): "a models folder's graphs in 8-bit integers (calibrated, faster)",
    ("train", "norms"): "the classifier's feature statistics, for normalising them per specimen",
    ("evaluate",): "measure a model on a labelled folder",
    ("evaluate", "detection"): "detector mAP and recall on an annotated folder",
    ("evaluate", "differential"): "classifier accuracy and calibration on labelled crops",
    ("evaluate", "field-differential"): "the whole path on BCCD fields with labelled leukocytes",
    ("evaluate", "cells"): "the whole daemon path on a lab's labelled leukocytes",
    ("evaluate", "card-figures"): "re-score the models of a folder and redraw their cards' figures",
    ("bench",): "time the whole analysis per field on this machine",
    ("send",): "wrap JPEG/PNG as VL Microscopic Image and C-STORE (DICOM files as they are)",
    ("lis-sim",): "a small LIS: ACKs and stores ORUs, can send a test order",
    ("demo",): "start daemon and LIS simulator, send a capture, show the ORU and the case",
    ("user",): "review-station accounts: add NAME --role ROLE | list | disable NAME",
    ("adapt",): "fit the classifier to this lab from its labelled or reviewed cells",
    ("models",): "models in use: list | promote FOLDER | rollback (admin)",
    ("purge",): "remove what the retention settings no longer keep (--dry-run: only say)",
    ("backup",): "back up the database and storage.path into a folder",
    ("db",): "database schema: upgrade | current",
    ("soak",): "captures against daemons killed with SIGKILL and an LIS outage: lost/dup/order",
}


def _show_defaults() -> None:
    """Every ``--help`` of this process shows defaults, the delegated modules' parsers too.

    Those parsers are built in the modules that implement the commands (and change with them);
    patching the formatter here once covers every one, options without help text included.
    """
    base = argparse.HelpFormatter
    if getattr(base, "_lisplugin_defaults", False):
        return
    format_action = base._format_action

    def _format_action(self: argparse.HelpFormatter, action: argparse.Action) -> str:
        if action.help is None and action.option_strings and action.default is not None:
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return format_action(self, action)

    base._format_action = _format_action  # type: ignore[method-assign]
    base._get_help_string = argparse.ArgumentDefaultsHelpFormatter._get_help_string  # type: ignore[method-assign]
    base._lisplugin_defaults = True  # type: ignore[attr-defined]


def _delegate(argv: Sequence[str]) -> int | None:
    for words, module in sorted(DELEGATED.items(), key=lambda kv: -len(kv[0])):
        if tuple(argv[: len(words)]) == words:
            module_name, _, function = module.partition(":")
            entry = getattr(importlib.import_module(module_name), function or "cli")
            return int(entry(list(argv[len(words) :])) or 0)
    return None


def _configure_logging(config: Path | None, verbose: bool = False) -> None:
    """Logging as the settings say (``logging.format``/``level``, env vars included)."""
    from lisplugin.config import load_settings
    from lisplugin.logging_setup import configure_logging

    try:
        settings = load_settings(config).logging
    except Exception:  # a broken settings file is reported by the command itself
        configure_logging()
        return
    configure_logging(settings.format, "DEBUG" if verbose else settings.level)


def _uvicorn_tls(tls: Any) -> dict[str, Any]:
    """uvicorn's certificate arguments for ``http.tls`` (mutual TLS when a CA is given)."""
    if not tls.enabled:
        return {}
    return {
        "ssl_certfile": str(tls.cert_file),
        "ssl_keyfile": str(tls.key_file),
        "ssl_ca_certs": str(tls.ca_file) if tls.ca_file else None,
        "ssl_cert_reqs": 2 if tls.ca_file else 0,  # ssl.CERT_REQUIRED / CERT_NONE
    }


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _serve(args: argparse.Namespace) -> int:
    import threading
    import time

    import uvicorn

    from lisplugin.config import load_settings
    from lisplugin.http.app import create_app
    from lisplugin.service.notify import Watchdog, notify
    from lisplugin.service.runtime import Runtime
    from lisplugin.storage.db import DatabaseInUse, SchemaOutdated, serve_exclusively

    settings = load_settings(args.config)
    _configure_logging(args.config, args.verbose)
    try:
        lock = serve_exclusively(settings.database_url)  # noqa: F841 - held until exit
    except DatabaseInUse as exc:
        print(f"lisplugin serve: {exc}", file=sys.stderr)
        return 2
    # uvicorn re-raises SIGTERM once it has shut down; as SystemExit it still lets the
    # runtime finish the message in flight and record it, instead of dying mid-delivery.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        runtime = Runtime(settings)
    except SchemaOutdated as exc:  # database.migrate_on_start is off and nobody upgraded
        print(f"lisplugin serve: {exc}", file=sys.stderr)
        return 2
    runtime.start()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(runtime),
            host=settings.http.host,
            port=settings.http.port,
            log_config=None,  # uvicorn's loggers go through lisplugin's logging set-up
            access_log=False,  # the app logs each request itself, with its request id
            **_uvicorn_tls(settings.http.tls),
        )
    )
    watchdog = Watchdog(runtime.alive)

    def ready_when_serving() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.1)
        if server.started:
            notify("READY=1")
            watchdog.start()

    threading.Thread(target=ready_when_serving, name="lisplugin-ready", daemon=True).start()
    try:
        server.run()
    finally:
        watchdog.stop()
        runtime.stop()
    return 0


def _settings_reference() -> str:
    from lisplugin.settings_doc import render

    return render()


def _init(args: argparse.Namespace) -> int:
    """Copy the shipped default config and models to DIR for the site to edit."""
    import shutil

    from lisplugin.config import DEFAULT_CONFIG_DIR, DEFAULT_MODELS_DIR

    target: Path = args.dir
    clashes = [target / p.name for p in DEFAULT_CONFIG_DIR.glob("*.yaml")] + [target / "models"]
    existing = [str(p) for p in clashes if p.exists()]
    if existing and not args.force:
        print(f"{', '.join(existing)} exists; --force overwrites", file=sys.stderr)
        return 2
    target.mkdir(parents=True, exist_ok=True)
    for path in DEFAULT_CONFIG_DIR.glob("*.yaml"):
        shutil.copy2(path, target / path.name)
    shutil.copytree(DEFAULT_MODELS_DIR, target / "models", dirs_exist_ok=True)
    # The copied site.yaml points at the copies, so the lab's edits there take effect.
    site = target / "site.yaml"
    text = site.read_text(encoding="utf-8")
    text = text.replace('config_dir: ""', f'config_dir: "{target.resolve()}"', 1)
    text = text.replace('models_dir: ""', f'models_dir: "{(target / "models").resolve()}"', 1)
    site.write_text(text, encoding="utf-8")
    print(f"laid out {target}: lisplugin serve --config {site}")
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

    init = commands.add_parser(
        "init", help="copy the shipped default config and models into DIR (e.g. /etc/lisplugin)"
    )
    init.add_argument("dir", type=Path, metavar="DIR")
    init.add_argument("--force", action="store_true", help="overwrite files already there")
    init.set_defaults(func=_init)

    reference = commands.add_parser(
        "settings-reference", help="print the settings reference (deploy/settings.md)"
    )
    reference.set_defaults(func=lambda _args: print(_settings_reference(), end=""))

    analyze = commands.add_parser("analyze", help="analyse images or DICOM files, no daemon")
    analyze.add_argument("paths", nargs="+", help="image files, DICOM files or folders")
    analyze.add_argument("--json", action="store_true", help="print one JSON object")
    analyze.add_argument("--config", type=Path)
    analyze.set_defaults(func=_analyze)

    _add_delegated(commands)
    return parser


def _add_delegated(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Delegated commands, listed for ``--help``; their own parsers take their arguments.

    A group (``train``, ``evaluate``) gets its sub-commands as choices, so ``lisplugin train
    --help`` lists them; a leaf is added without help, its module answers ``--help`` itself.
    """
    groups: dict[str, list[str]] = {}
    for words in DELEGATED:
        groups.setdefault(words[0], []).extend(words[1:2])
    for name, leaves in groups.items():
        summary = SUMMARIES.get((name,))
        if not leaves:
            commands.add_parser(name, help=summary, add_help=False)
            continue
        group = commands.add_parser(name, help=summary, description=summary)
        sub = group.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")
        for leaf in leaves:
            sub.add_parser(leaf, help=SUMMARIES.get((name, leaf)), add_help=False)


def main(argv: Sequence[str] | None = None) -> int:
    # ONNX Runtime has its own thread pool; numpy's BLAS threads only fight it for the cores
    # (a small resize was seen to stall for tens of ms under load). Set before numpy loads.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    _show_defaults()
    verbose = "-v" in argv or "--verbose" in argv
    _configure_logging(None, verbose)
    delegated = _delegate([a for a in argv if a not in ("-v", "--verbose")])
    if delegated is not None:
        return delegated
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
