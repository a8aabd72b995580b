"""Cases with leukocytes to review, whatever models are installed.

The review tests need leukocytes on the slide. The small test models find hardly any cells
and the real ones find a number that depends on the model, so the cells of these cases come
from the synthetic generator's own ground truth: ``GroundTruthDetector`` answers with the
boxes the generator drew (a perfect detector), and everything else is the daemon's real path:
a lossless VL Microscopic Image stored by the real ingest, analysed by the real scheduler
with the real ONNX classifier, rules and reference ranges, reported through the real outbox.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import hl7
import httpx
import numpy as np
import pydicom
import uvicorn
import yaml
from daemon import free_port as free_port  # re-exported: one port allocator for the suite
from PIL import Image

from lisplugin.config import DEFAULT_CONFIG_DIR, Settings
from lisplugin.core.types import Detection, FieldDetections
from lisplugin.dicom.scu import wrap_image_as_vl_microscopic
from lisplugin.service.pipeline import Pipeline
from lisplugin.service.runtime import Runtime
from lisplugin.synthetic import synthetic_field

PASSWORD = "correct horse battery"
#: Leukocytes drawn in each review field: enough to reclassify several of them.
WBC_TYPES = ("neutrophil", "lymphocyte", "monocyte", "neutrophil", "eosinophil")


class GroundTruthDetector:
    """The boxes the synthetic generator drew, for the fields it drew (others: no cells)."""

    version = "ground-truth"

    def __init__(self) -> None:
        self._truth: dict[bytes, list[Detection]] = {}

    @staticmethod
    def _key(image: np.ndarray) -> bytes:
        return hashlib.sha256(np.ascontiguousarray(image).tobytes()).digest()

    def learn(self, image: np.ndarray, truth: Sequence[tuple[str, tuple]]) -> None:
        self._truth[self._key(image)] = [
            Detection(kind, 0.99, tuple(float(v) for v in box))  # type: ignore[arg-type]
            for kind, box in truth
        ]

    def detect(self, image: np.ndarray, pixel_spacing_um: float | None = None) -> FieldDetections:
        return FieldDetections(tuple(self._truth.get(self._key(image), [])))


class ReviewRuntime(Runtime):
    """The daemon's runtime with the ground-truth detector in its pipeline."""

    def __init__(self, settings: Settings, base: Pipeline, detector: GroundTruthDetector) -> None:
        self._review_pipeline = replace(base, settings=settings, detector=detector)
        super().__init__(settings)

    def pipeline(self) -> Pipeline:
        return self._review_pipeline


def review_capture(
    folder: Path,
    detector: GroundTruthDetector,
    seed: int,
    accession: str,
    patient_id: str,
    study_uid: str | None = None,
) -> Path:
    """A synthetic field with several leukocytes as a lossless DICOM file; the detector knows it."""
    folder.mkdir(parents=True, exist_ok=True)
    image, truth = synthetic_field(seed, wbc_types=list(WBC_TYPES))
    png = folder / f"review-{seed}.png"
    Image.fromarray(image).save(png)
    ds = wrap_image_as_vl_microscopic(
        png, patient_id=patient_id, accession=accession, study_uid=study_uid, instance_number=seed
    )
    path = folder / f"review-{seed}.dcm"
    ds.save_as(path, enforce_file_format=True)
    detector.learn(image, truth)
    return path


def ingest(runtime: Runtime, path: Path) -> int:
    """Store a capture as the SCP does and analyse its case now; returns the case id."""
    case = runtime.store.store(pydicom.dcmread(path), path.read_bytes())
    runtime.scheduler.queue_stable(now=case.last_instance_at.replace(year=9999))
    runtime.scheduler.run_once()
    return case.id


class ServerThread:
    """uvicorn serving an app on a loopback port in a background thread."""

    def __init__(self, app: object, port: int) -> None:
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")  # type: ignore[arg-type]
        )
        self.url = f"http://127.0.0.1:{port}"
        self._thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        for _ in range(200):
            if self.server.started:
                break
            threading.Event().wait(0.05)
        httpx.get(f"{self.url}/healthz", timeout=5).raise_for_status()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)


def obx_values(message: str) -> dict[str, tuple[str, str]]:
    """Result key (config/loinc.yaml) -> (OBX-5 value, OBX-11 status)."""
    codes = {
        entry["code"]: key
        for key, entry in yaml.safe_load((DEFAULT_CONFIG_DIR / "loinc.yaml").read_text())[
            "results"
        ].items()
    }
    parsed = hl7.parse(message.replace("\n", "\r"))
    return {codes[str(obx[3][0][0])]: (str(obx[5]), str(obx[11])) for obx in parsed.segments("OBX")}


def acknowledge_all(client: httpx.Client, url: str, version: int) -> int:
    """Acknowledge every open review flag of the case at ``url`` (with a reason, which some
    rules ask for), as a reviewer does before sign-out; returns the case's new version."""
    for flag in client.get(url).json()["result"]["flags"]:
        if flag["severity"] != "info":
            answer = client.post(
                f"{url}/flags/{flag['code']}/acknowledge",
                json={"version": version, "reason": "checked on the smear"},
            )
            assert answer.status_code == 200, answer.text
            version = answer.json()["version"]
    return version
