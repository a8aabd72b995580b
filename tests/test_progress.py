"""Progress bars of the long commands: on a terminal only, forced on by LISPLUGIN_PROGRESS=1.

A bar in a systemd journal or a CI log is a stream of carriage returns and escape codes, so
the commands must print none when standard error is not a terminal; the same commands must
still draw one for a person at a terminal.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lisplugin.core.types import LEUKOCYTE_CLASSES

#: What a tqdm bar leaves in a stream: carriage returns, ANSI escapes, "|###|" and rates.
BAR_MARKS = re.compile(r"\r|\x1b\[|\d+%\||it/s|img/s|s/it")


def _crop_folder(root: Path, per_class: int = 2) -> Path:
    """A class-folder set of random 160 px crops (what `evaluate differential` reads)."""
    rng = np.random.default_rng(0)
    for name in LEUKOCYTE_CLASSES[:3]:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def _run(args: list[str], env_value: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LISPLUGIN_PROGRESS"}
    if env_value is not None:
        env["LISPLUGIN_PROGRESS"] = env_value
    return subprocess.run(
        [sys.executable, "-m", "lisplugin", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )


def test_evaluate_prints_no_bar_into_a_pipe_and_one_when_forced(tmp_path: Path) -> None:
    data = _crop_folder(tmp_path / "crops")
    quiet = _run(["evaluate", "differential", "--data", str(data)], None)
    assert quiet.stdout.startswith("n=6 accuracy=")
    assert not BAR_MARKS.search(quiet.stderr), quiet.stderr
    forced = _run(["evaluate", "differential", "--data", str(data)], "1")
    assert forced.stdout == quiet.stdout  # the bar goes to stderr only
    # The bar is drawn (tqdm may clear its last state on close on a fast machine).
    assert BAR_MARKS.search(forced.stderr) and "crops:" in forced.stderr and "/6" in forced.stderr


def test_bench_prints_no_bar_into_a_pipe() -> None:
    result = _run(["bench", "--fields", "2", "--json"], None)
    assert '"fields": 2' in result.stdout
    assert not BAR_MARKS.search(result.stderr), result.stderr


def test_bar_renders_on_a_terminal_without_being_forced() -> None:
    """The default (no LISPLUGIN_PROGRESS): a pseudo-terminal as stderr gets the bar."""
    script = (
        "from lisplugin.progress import progress\n"
        "print(sum(progress(range(2000), desc='work', mininterval=0)))"
    )
    env = {k: v for k, v in os.environ.items() if k != "LISPLUGIN_PROGRESS"}
    leader, follower = pty.openpty()
    # a new pseudo-terminal is 0 columns wide, and tqdm fits its bar into that: give it 80
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=follower, env=env
        )
        os.close(follower)
        seen = b""
        while True:
            ready, _, _ = select.select([leader], [], [], 60)
            if not ready:
                break
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        out, _ = process.communicate(timeout=60)
    finally:
        os.close(leader)
    assert out.decode().strip() == str(sum(range(2000)))
    assert b"work" in seen and b"2000/2000" in seen


def test_forced_and_off_override_the_terminal_check(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from lisplugin.progress import bar, progress

    for value, expected in (("1", True), ("0", False)):
        monkeypatch.setenv("LISPLUGIN_PROGRESS", value)
        stream = io.StringIO()
        listed = progress(range(5), desc="listed", file=stream, mininterval=0)
        assert list(listed) == list(range(5))
        with bar(7, desc="stepped", file=stream, mininterval=0) as steps:
            steps.update(7)
        text = stream.getvalue()
        assert ("listed" in text and "5/5" in text and "7/7" in text) is expected, text
        assert (text == "") is not expected


def test_training_shows_epochs_and_batches(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    torch = pytest.importorskip("torch", reason="training needs the train extra (torch)")
    from lisplugin.training import classifier as training

    monkeypatch.setenv("LISPLUGIN_PROGRESS", "1")
    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(16) % len(LEUKOCYTE_CLASSES)
    model = training.LeukocyteNet(len(LEUKOCYTE_CLASSES))
    mean, std = [0.5] * 3, [0.25] * 3
    training.train(
        model, images, labels, images[:4], labels[:4], mean, std, epochs=2, batch_size=8,
        log=lambda _: None,
    )  # fmt: skip
    err = capsys.readouterr().err
    assert "epochs" in err and "epoch 2/2" in err and "2/2" in err and "batch" in err
