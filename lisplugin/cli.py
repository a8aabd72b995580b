"""The ``lisplugin`` command. Sub-commands owned by a module get the rest of the command line."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: Sub-commands whose argument parsing lives in the module that implements them.
DELEGATED: dict[tuple[str, ...], str] = {
    ("train", "classifier"): "lisplugin.training.classifier",
    ("train", "detector"): "lisplugin.training.detector",
    ("evaluate", "detection"): "lisplugin.evaluation.detection",
    ("evaluate", "differential"): "lisplugin.evaluation.differential",
    ("bench",): "lisplugin.evaluation.bench",
}


def _delegate(argv: Sequence[str]) -> int | None:
    for words, module in sorted(DELEGATED.items(), key=lambda kv: -len(kv[0])):
        if tuple(argv[: len(words)]) == words:
            return int(importlib.import_module(module).cli(list(argv[len(words) :])) or 0)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    delegated = _delegate(argv)
    if delegated is not None:
        return delegated
    parser = argparse.ArgumentParser(prog="lisplugin", description=__doc__)
    parser.add_argument("command", help="serve, analyze, send, lis-sim, demo, train, evaluate, bench")
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
