"""Site adaptation and the model gate: ``lisplugin adapt``, ``models promote|rollback`` and
``evaluate cells``, on real images, real ONNX files and a real daemon."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from daemon import Daemon, free_port
from pydicom.uid import generate_uid
from report_factory import smear_capture

from lisplugin.core.crops import white_balanced, white_point
from lisplugin.dicom.scu import send
from lisplugin.hl7.lis_sim import LisSimulator
from lisplugin.inference.registry import load_card
from lisplugin.inference.store import ModelStore, ModelStoreError
from lisplugin.training.adapt import held_back_split

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"


def lisplugin(
    *args: str, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lisplugin", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def class_folders(target: Path, source: Path, per_class: int) -> Path:
    """A lab's class folders: the first ``per_class`` images of each class of ``source``."""
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        images = sorted(folder.iterdir())[:per_class]
        (target / folder.name).mkdir(parents=True, exist_ok=True)
        for image in images:
            (target / folder.name / image.name).symlink_to(image)
    return target


@pytest.fixture(scope="module")
def lab(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another lab's leukocytes (Zheng et al.'s crops) as class folders, 4 of each of 3 classes."""
    import csv

    names = {"1": "neutrophil", "2": "lymphocyte", "4": "eosinophil"}
    root = tmp_path_factory.mktemp("lab")
    seen: dict[str, int] = {}
    labels = shared_data / "wbc-seg" / "Class Labels of Dataset 1.csv"
    with labels.open(encoding="utf-8-sig") as fh:
        for row in csv.DictReader(fh):
            label = names.get(row["class label"].strip())
            if label is None or seen.get(label, 0) >= 4:
                continue
            seen[label] = seen.get(label, 0) + 1
            (root / label).mkdir(exist_ok=True)
            image = shared_data / "wbc-seg" / "Dataset 1" / f"{int(row['image ID']):03d}.bmp"
            (root / label / image.name).symlink_to(image)
    (root / "smudge").mkdir()  # not a class: ignored
    return root


def test_held_back_split_is_stratified_and_seeded() -> None:
    labels = ["a"] * 8 + ["b"] * 4 + ["c"]
    train, held = held_back_split(labels, 0.25, seed=3)
    assert sorted([*train, *held]) == list(range(13))
    assert [labels[i] for i in held].count("a") == 2
    assert [labels[i] for i in held].count("b") == 1
    assert "c" not in [labels[i] for i in held]  # a single cell is never held back
    assert (held == held_back_split(labels, 0.25, seed=3)[1]).all()


def test_white_balance_maps_the_glass_to_neutral() -> None:
    rng = np.random.default_rng(0)
    image = np.full((64, 64, 3), (250, 240, 150), np.uint8)  # yellow lamp
    image[20:40, 20:40] = (120, 60, 150)  # a stained cell
    image = np.clip(image + rng.normal(0, 2, image.shape), 0, 255).astype(np.uint8)
    balanced = white_balanced(image)
    glass = white_point(balanced)
    assert np.abs(glass - 235).max() <= 3
    assert balanced[30, 30, 2] > balanced[30, 30, 0]  # the cell keeps its own colour


@pytest.fixture(scope="module")
def adapted(lab: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("adapted") / "models"
    done = lisplugin(
        "adapt", "--data", str(lab), "--out", str(out), "--models", str(MODELS),
        "--steps", "6", "--threads", "1", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads(done.stdout)


@pytest.mark.data
def test_adapt_writes_a_models_folder_with_lineage_and_figures(adapted: tuple[Path, dict]) -> None:
    out, report = adapted
    assert report["cells"] == 12 and report["per_class"] == {
        "eosinophil": 4, "lymphocyte": 4, "neutrophil": 4
    }  # fmt: skip
    assert report["held_back"] == 3 and report["trained_on"] == 9
    assert 0.0 <= report["before"]["accuracy"] <= 1.0
    assert 0.0 <= report["after"]["accuracy"] <= 1.0
    card = (out / "leukocyte-classifier.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["version"].startswith(report["base"]["version"] + "+site.")
    base = load_card(MODELS, "leukocyte-classifier")  # an integer model is adapted into one
    assert front.get("precision") == base.get("precision")
    assert load_card(out, "leukocyte-classifier").sha256 == front["sha256"]
    assert front["adaptation"]["before"]["accuracy"] == report["before"]["accuracy"]
    assert "## Lineage" in card and report["base"]["sha256"][:16] in card
    assert (out / "cell-detector.onnx").is_file() and (out / "held-back.npz").is_file()
    held = np.load(out / "held-back.npz")
    assert held["crops"].shape == (3, 160, 160, 3)


@pytest.mark.data
def test_evaluate_cells_with_an_adapted_models_folder(
    adapted: tuple[Path, dict], lab: Path
) -> None:
    out, report = adapted
    done = lisplugin("evaluate", "cells", "--data", str(lab), "--models", str(out), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["model_versions"]["classifier"] == report["version"]


@pytest.mark.data
def test_evaluate_cells_scores_a_labs_folders(lab: Path) -> None:
    done = lisplugin("evaluate", "cells", "--data", str(lab), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["n"] == 12
    assert set(report["per_class"]) == {"neutrophil", "lymphocyte", "eosinophil"}
    assert 0 <= report["found"] <= 12
    assert sum(map(sum, report["confusion"]["matrix"])) == 12
    right = sum(report["confusion"]["matrix"][i][report["confusion"]["columns"].index(c)]
                for i, c in enumerate(report["confusion"]["rows"]))  # fmt: skip
    assert report["accuracy"] == pytest.approx(right / 12, abs=1e-4)
    for row in report["per_class"].values():
        assert set(row) >= {"recall", "precision", "n"}


@pytest.mark.data
def test_a_labs_folders_as_labs_name_them_and_a_file_that_cannot_be_read(
    lab: Path, tmp_path: Path
) -> None:
    """Class folders in any case, in the plural and with sub-folders are read; a file that is
    not an image costs its own cell (counted missed, named with the reason), not the run, and
    the other cells score exactly as in the plain layout."""
    from lisplugin.evaluation.cells import evaluate_cells

    mixed = tmp_path / "mixed"
    for name, target in (("Neutrophil", "neutrophil"), ("lymphocytes/day 1", "lymphocyte")):
        (mixed / name).mkdir(parents=True)
        for image in sorted((lab / target).iterdir()):
            (mixed / name / image.name).symlink_to(image.resolve())
    (mixed / "eosinophil").symlink_to((lab / "eosinophil").resolve())
    broken_folder = mixed / "EOSINOPHILS"
    broken_folder.mkdir()
    (broken_folder / "broken.jpg").write_text("not an image")
    (mixed / "smudge cells").mkdir()
    plain, report = evaluate_cells(lab), evaluate_cells(mixed)
    assert report["n"] == 13 and report["unreadable"] == 1
    assert list(report["unreadable_files"]) == [str(broken_folder / "broken.jpg")]
    assert report["ignored_folders"] == ["smudge cells"]
    rows = report["confusion"]["rows"]
    none = report["confusion"]["columns"].index("none")
    for row, counts in zip(rows, report["confusion"]["matrix"], strict=True):
        expected = list(plain["confusion"]["matrix"][plain["confusion"]["rows"].index(row)])
        expected[none] += row == "eosinophil"
        assert counts == expected, row


@pytest.mark.data
def test_a_labs_crops_without_red_cells_share_the_folders_scale(lab: Path) -> None:
    """Zheng et al.'s crops show no red cells: one scale for the folder, not one per crop."""
    from lisplugin.evaluation.cells import evaluate_cells

    shared = evaluate_cells(lab)
    alone = evaluate_cells(lab, per_image_scale=True)
    assert shared["shared_scale"] is not None
    assert 0.5 < shared["shared_scale"] < 1.2  # their median leukocyte is 50-120 px wide
    assert alone["shared_scale"] is None
    assert shared["n"] == alone["n"] == 12


def test_model_store_promote_and_rollback(tmp_path: Path) -> None:
    candidate = tmp_path / "candidate"
    shutil.copytree(MODELS, candidate)
    store = ModelStore(tmp_path / "store", MODELS)
    assert store.active() == MODELS
    with pytest.raises(ModelStoreError):
        store.rollback("admin")
    promoted = store.promote(candidate, "v2", "admin", {"held_back": None})
    assert store.active() == promoted and (promoted / "leukocyte-classifier.onnx").is_file()
    assert store.rollback("admin") == MODELS
    assert [h["action"] for h in store.history()] == ["promote", "rollback"]


def _with_version(source: Path, target: Path, version: str) -> Path:
    """A copy of a models folder whose classifier card names another version."""
    shutil.copytree(source, target)
    card = target / "leukocyte-classifier.md"
    text = card.read_text()
    front = yaml.safe_load(text.split("---")[1])
    card.write_text(text.replace(f"version: {front['version']}", f"version: {version}", 1))
    return target


@pytest.fixture
def lis() -> LisSimulator:
    simulator = LisSimulator(port=free_port()).start()
    yield simulator
    simulator.stop()


@pytest.mark.slow
def test_promote_gate_refuses_worse_and_the_daemon_uses_the_promoted_model(
    tmp_path: Path, lis: LisSimulator, shared_data: Path
) -> None:
    """A worse candidate is refused (audited); an admin's promotion reaches the running daemon
    at its next case, and the result names the model version; a rollback restores the old one."""
    daemon = Daemon(tmp_path / "var", f"sqlite:///{tmp_path / 'var' / 'db.sqlite'}", lis.port)
    daemon.start()
    try:
        env = daemon.env()

        def admin(command: str, *args: str) -> subprocess.CompletedProcess:
            """``lisplugin models COMMAND`` as the daemon's admin (password on stdin)."""
            return lisplugin("models", command, *args, "--user", daemon.username, env=env,
                             stdin=daemon.password + "\n")  # fmt: skip

        # A worse candidate: a classifier trained for one epoch on 16 images.
        worse = tmp_path / "worse"
        trained = lisplugin(
            "train", "classifier", "--data", str(shared_data / "pbc"), "--out", str(worse),
            "--limit", "16", "--epochs", "1", "--input-size", "32", "--batch-size", "8",
        )  # fmt: skip
        assert trained.returncode == 0, trained.stderr[-2000:]
        shutil.copy2(MODELS / "cell-detector.md", worse)
        shutil.copy2(MODELS / "cell-detector.onnx", worse)
        reference = class_folders(tmp_path / "reference", shared_data / "pbc", 6)
        refused = admin("promote", str(worse), "--reference", str(reference))
        assert refused.returncode == 1, refused.stderr
        assert "refused: worse on the reference set" in refused.stderr
        # Not an admin: refused before any scoring.
        daemon.add_user("tech", "technologist", "tech-password-1")
        denied = lisplugin("models", "promote", str(worse), "--user", "tech", "--skip-reference",
                           env=env, stdin="tech-password-1\n")  # fmt: skip
        assert denied.returncode == 3 and "for admin" in denied.stderr
        wrong = lisplugin("models", "rollback", "--user", daemon.username, env=env, stdin="x\n")
        assert wrong.returncode == 3

        better = _with_version(MODELS, tmp_path / "site-model", "2099.01.01-site")
        promoted = admin("promote", str(better), "--reference", str(reference))
        assert promoted.returncode == 0, promoted.stderr
        checks = json.loads(promoted.stdout)["checks"]
        assert checks["reference"]["candidate"] == checks["reference"]["current"]

        def analysed_version(accession: str, seed: int) -> str:
            capture = smear_capture(tmp_path / "in", seed, generate_uid(), accession=accession)
            assert all(r.ok for r in send([capture], "127.0.0.1", daemon.dicom_port, "LISPLUGIN"))
            case = daemon.wait_for_case(accession, {"review", "verified"})
            return case["result"]["model_versions"]["classifier"]

        assert analysed_version("ACC-PROMOTED", 1) == "2099.01.01-site"
        rolled = admin("rollback")
        assert rolled.returncode == 0, rolled.stderr
        shipped = yaml.safe_load((MODELS / "leukocyte-classifier.md").read_text().split("---")[1])
        assert analysed_version("ACC-ROLLED-BACK", 2) == shipped["version"]
        import sqlite3

        with sqlite3.connect(tmp_path / "var" / "db.sqlite") as db:
            actions = [r[0] for r in db.execute("SELECT action FROM audit_events ORDER BY id")]
        assert [a for a in actions if a.startswith("models.")] == [
            "models.promote.refused", "models.promote", "models.rollback"
        ]  # fmt: skip
        listed = json.loads(lisplugin("models", "list", env=env).stdout)
        assert [h["action"] for h in listed["history"]] == ["promote", "rollback"]
    finally:
        daemon.stop()
