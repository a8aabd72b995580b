"""``lisplugin evaluate differential`` on a small class-folder copy of PBC test images."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from lisplugin.core.types import LEUKOCYTE_CLASSES
from lisplugin.datasets.pbc import read_samples, select
from lisplugin.evaluation.differential import cli


@pytest.fixture
def small_pbc(shared_data: Path, tmp_path: Path) -> Path:
    """Two test images per class, plus a folder and rows that the evaluation must ignore."""
    root = tmp_path / "pbc"
    rows = []
    test = select(read_samples(shared_data / "pbc"), "test")
    for label in LEUKOCYTE_CLASSES:
        for i, sample in enumerate([s for s in test if s.label == label][:2]):
            (root / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(sample.path, root / label / sample.path.name)
            rows.append((f"{label}/{sample.path.name}", label, "test" if i == 0 else "val"))
    (root / "smudge").mkdir()
    shutil.copy(test[0].path, root / "smudge" / "x.jpg")
    rows.append(("smudge/x.jpg", "smudge", "test"))
    with (root / "split.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label", "split"), *rows])
    return root


def test_cli_scores_one_split(small_pbc: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["--data", str(small_pbc), "--split", "test", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == len(LEUKOCYTE_CLASSES)  # one per class; "smudge" is ignored
    for key in ("accuracy", "macro_f1", "ece", "per_class", "confusion"):
        assert key in result
    assert 0.0 <= result["ece"] <= 1.0 and result["accuracy"] >= 0.75
    assert set(result["per_class"]) == set(LEUKOCYTE_CLASSES)
    assert {"recall", "precision"} <= set(result["per_class"]["basophil"])
    matrix = result["confusion"]["matrix"]
    assert sum(map(sum, matrix)) == result["n"]
    assert sorted(result["confusion"]["labels"]) == sorted(LEUKOCYTE_CLASSES)


def test_cli_without_split_file_reads_all_class_folders(
    small_pbc: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (small_pbc / "split.csv").unlink()
    assert cli(["--data", str(small_pbc)]) == 0
    assert capsys.readouterr().out.startswith(f"n={2 * len(LEUKOCYTE_CLASSES)} accuracy=")
