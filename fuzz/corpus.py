"""What both atheris harnesses do around their target: seed the corpus folders, then fuzz."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def fuzz(argv: list[str], one_input: Callable[[bytes], None], seeds: list[bytes]) -> None:
    """Write ``seeds`` into each corpus folder named in ``argv`` (once), then run atheris."""
    import atheris

    for directory in [a for a in argv[1:] if not a.startswith("-")]:
        for n, seed in enumerate(seeds):
            path = Path(directory) / f"seed-{n}"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(seed)
    atheris.Setup(argv, one_input)
    atheris.Fuzz()
