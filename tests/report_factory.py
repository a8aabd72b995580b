"""Synthetic captures and the specimen result of a case, for the report tests (no model run).

The result is made by the real ``specimen_to_json`` from hand-placed cells, so outlines, field
sources and rounding are exactly what the daemon stores.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import numpy as np
from dicom_factory import dciodvfy, instance, save, smear
from PIL import Image
from pydicom import dcmread
from pydicom.uid import MultiFrameTrueColorSecondaryCaptureImageStorage

from lisplugin.core.report import specimen_to_json
from lisplugin.core.types import Cell, FieldQuality, FieldResult, Flag, SpecimenResult
from lisplugin.dicom.scu import wrap_image_as_vl_microscopic
from lisplugin.synthetic import save_synthetic

ROWS, COLUMNS = 240, 320
PATIENT_ID, ACCESSION = "P0042", "ACC0042"
#: 0.2 um pixels, as DICOM Pixel Spacing in mm.
SPACING_MM = 0.0002
MODELS = {"cell-detector": "1.3.0", "leukocyte-classifier": "2.0.1"}
#: (kind, label, box) of the cells placed in every field; labels repeat to fill groups.
CELLS: list[tuple[str, str, tuple[float, float, float, float]]] = [
    ("RBC", "RBC", (10, 12, 48, 50)),
    ("RBC", "RBC", (60, 20, 96, 58)),
    ("RBC", "RBC", (200, 150, 238, 186)),
    ("PLT", "PLT", (150, 30, 160, 41)),
    ("WBC", "neutrophil", (100, 100, 160, 158)),
    ("WBC", "lymphocyte", (220, 40, 262, 82)),
    ("WBC", "unidentified", (30, 160, 84, 214)),
]


def vl_capture(folder: Path, name: str = "field", *, seed: int = 0, study_uid: str = "") -> Path:
    """A VL Microscopic Image of a synthetic smear with Pixel Spacing, as a microscope sends."""
    png = folder / f"{name}.png"
    Image.fromarray(smear(ROWS, COLUMNS, seed=seed)).save(png)
    ds = wrap_image_as_vl_microscopic(
        png, patient_id=PATIENT_ID, accession=ACCESSION, study_uid=study_uid or None
    )
    ds.PatientName = "Doe^Jane"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.PixelSpacing = [SPACING_MM, SPACING_MM]
    return save(ds, folder / f"{name}.dcm")


def smear_capture(
    folder: Path,
    seed: int,
    study_uid: str,
    *,
    accession: str = ACCESSION,
    patient_id: str = PATIENT_ID,
) -> Path:
    """A realistic synthetic smear field (cells the models find) as a VL Microscopic Image,
    as a microscope would send it."""
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = folder / f"smear-{seed}.jpg"
    save_synthetic(jpeg, seed=seed)
    ds = wrap_image_as_vl_microscopic(
        jpeg,
        patient_id=patient_id,
        accession=accession,
        study_uid=study_uid,
        instance_number=seed,
    )
    return save(ds, folder / f"smear-{seed}.dcm")


def multiframe_capture(folder: Path, frames: int = 2) -> Path:
    """A Multi-frame True Color Secondary Capture (no spacing): one field per frame."""
    pixels = np.stack([smear(ROWS, COLUMNS, seed=s) for s in range(frames)])
    ds = instance(pixels, sop_class=MultiFrameTrueColorSecondaryCaptureImageStorage)
    ds.PatientID, ds.AccessionNumber = PATIENT_ID, ACCESSION
    return save(ds, folder / "multiframe.dcm")


def _mask(box: tuple[float, float, float, float]) -> np.ndarray:
    """A disc filling the box: a cell mask as the detector gives it."""
    x0, y0, x1, y1 = box
    h, w = round(y1 - y0), round(x1 - x0)
    y, x = np.mgrid[0:h, 0:w]
    return (x - w / 2 + 0.5) ** 2 / (w / 2) ** 2 + (y - h / 2 + 0.5) ** 2 / (h / 2) ** 2 <= 1


def _field_sources(path: Path) -> list[str]:
    ds = dcmread(path, stop_before_pixels=True)
    uid = str(ds.SOPInstanceUID)
    if "NumberOfFrames" not in ds:
        return [uid]
    return [f"{uid}#frame={n}" for n in range(1, int(ds.NumberOfFrames) + 1)]


def result_for(paths: list[Path], *, flags: bool = True) -> dict[str, Any]:
    """The stored result JSON of a case whose fields are every frame of ``paths``."""
    sources = [source for path in paths for source in _field_sources(path)]
    fields = []
    for index, source in enumerate(sources):
        cells = tuple(
            Cell(
                field_index=index,
                kind=kind,  # type: ignore[arg-type]
                label=label,
                score=0.9 - 0.01 * i,
                box=box,
                mask=_mask(box) if i % 2 == 0 else None,  # both outline sources
                probabilities={label: 0.8, "monocyte": 0.2} if kind == "WBC" else None,
            )
            for i, (kind, label, box) in enumerate(CELLS)
        )
        passed = index != 1
        fields.append(
            FieldResult(
                index=index,
                source=source,
                width=COLUMNS,
                height=ROWS,
                quality=FieldQuality(
                    focus=123.456,
                    exposure=0.61,
                    clipped_fraction=0.01 if passed else 0.3,
                    passed=passed,
                    reasons=() if passed else ("clipped fraction 0.30 above 0.20",),
                ),
                cells=cells,
                regressed_counts={"RBC": 3.2, "WBC": 2.8, "PLT": 1.1},
            )
        )
    n = len(fields)
    result = SpecimenResult(
        counts={"RBC": 3 * n, "WBC": 3 * n, "PLT": n},
        differential={
            "neutrophil": 50.0,
            "lymphocyte": 50.0,
            "monocyte": 0.0,
            "eosinophil": 0.0,
            "basophil": 0.0,
            "ig": 0.0,
            "erythroblast": 0.0,
            "platelet": 0.0,
        },
        class_counts={"neutrophil": n, "lymphocyte": n, "unidentified": n},
        wbc_classified=2 * n,
        flags=(
            Flag("min_wbc", f"only {2 * n} leukocytes classified, 100 required"),
            Flag("unidentified", f"{n} leukocytes unidentified", "review"),
        )
        if flags
        else (),
        fields=tuple(fields),
        model_versions=dict(MODELS),
    )
    return specimen_to_json(result)


def dciodvfy_errors(path: Path) -> list[str]:
    """The Error lines dciodvfy reports for ``path`` (the caller skips when it is missing)."""
    binary = dciodvfy()
    assert binary is not None
    run = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
