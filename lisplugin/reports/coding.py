"""Codes and identity shared by the DICOM report objects (SR, annotations, encapsulated PDF).

Result quantities are coded with the site's LOINC map (``config/loinc.yaml``), so the SR and the
ORU name every number the same way. Map entries with HL7 system ``L`` (local) become codes of
lisplugin's private coding scheme, as DICOM requires local schemes to start with "99".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from lisplugin import __version__
from lisplugin.core.rules import result_key
from lisplugin.core.types import LEUKOCYTE_CLASSES, UNIDENTIFIED

#: Private coding scheme (PS3.16 8.2: designators of local schemes begin with "99").
PRIVATE_SCHEME = "99LISPLUGIN"
MANUFACTURER = "lisplugin"
#: The private scheme's entry in Coding Scheme Identification Sequence (0008,0110) of every
#: object that uses it.
PRIVATE_SCHEME_ITEM = CodingSchemeIdentificationItem(
    designator=PRIVATE_SCHEME,
    name="lisplugin local codes",
    responsible_organization=MANUFACTURER,
)

#: Annotation Property Category of every cell (CID 7150).
CELL_CATEGORY: Code = codes.cid7150.AnatomicalStructure
#: Annotation Property Type of each cell label. SNOMED CT where a concept matches the class
#: exactly; the PBC classes that SNOMED CT has no single concept for (neutrophils: segmented
#: and band; immature granulocytes: promyelocytes to metamyelocytes; erythroblasts in blood)
#: and "unidentified" get private codes rather than a near miss.
CELL_TYPES: dict[str, Code] = {
    "RBC": Code("41898006", "SCT", "Erythrocyte"),
    "PLT": Code("16378004", "SCT", "Platelet"),
    "lymphocyte": Code("56972008", "SCT", "Lymphocyte"),
    "monocyte": Code("55918008", "SCT", "Monocyte"),
    "eosinophil": Code("14793004", "SCT", "Eosinophil, segmented"),
    "basophil": Code("30061004", "SCT", "Basophil, segmented"),
    "neutrophil": Code("LPL-NEUTROPHIL", PRIVATE_SCHEME, "Neutrophil, segmented or band"),
    "ig": Code("LPL-IG", PRIVATE_SCHEME, "Immature granulocyte"),
    "erythroblast": Code("LPL-ERYTHROBLAST", PRIVATE_SCHEME, "Nucleated red blood cell"),
    "platelet": Code("LPL-PLT-CLUMP", PRIVATE_SCHEME, "Platelet or platelet clump"),
    "unidentified": Code("LPL-WBC-UNIDENTIFIED", PRIVATE_SCHEME, "Unidentified leukocyte"),
}
#: Report order of cell labels: red cells, platelets, then the leukocyte classes.
CELL_ORDER: tuple[str, ...] = ("RBC", "PLT", *LEUKOCYTE_CLASSES, UNIDENTIFIED)

#: Code Meaning of the UCUM units the LOINC map uses.
_UNIT_MEANINGS = {
    "%": "percent",
    "1": "no units",
    "{cells}": "cells",
    "/100{WBCs}": "per 100 leukocytes",
}

#: Field image-quality measures (lisplugin's own definitions, hence private codes).
FOCUS = Code("LPL-FOCUS", PRIVATE_SCHEME, "Focus (variance of Laplacian)")
EXPOSURE = Code("LPL-EXPOSURE", PRIVATE_SCHEME, "Exposure (mean grey level)")
CLIPPED = Code("LPL-CLIPPED", PRIVATE_SCHEME, "Clipped pixel fraction")
REVIEW_STATUS = Code("LPL-REVIEW", PRIVATE_SCHEME, "Technologist review")
REVIEW_REQUIRED = Code("LPL-REVIEW-REQ", PRIVATE_SCHEME, "Review required")
REVIEW_NOT_REQUIRED = Code("LPL-REVIEW-NOTREQ", PRIVATE_SCHEME, "No review required")
#: TID 1501 free-text qualitative evaluation (row "Qualitative Evaluations", TEXT).
QUALITATIVE_TEXT = Code("C00034375", "UMLS", "Qualitative Evaluations")
DETECTION_SCORE = Code("LPL-DET-SCORE", PRIVATE_SCHEME, "Detection score")
CLASS_PROBABILITY: Code = codes.DCM.Probability


def ordered_labels(labels: Mapping[str, Any]) -> list[str]:
    """Cell labels in report order, unknown ones last (alphabetically)."""
    known = [label for label in CELL_ORDER if label in labels]
    return known + sorted(set(labels) - set(known))


def concept(code: Code) -> CodedConcept:
    return CodedConcept(code.value, code.scheme_designator, code.meaning)


def unit(ucum: str) -> CodedConcept:
    """A UCUM unit as a coded concept."""
    return CodedConcept(ucum, "UCUM", _UNIT_MEANINGS.get(ucum, ucum))


def cell_type(label: str) -> Code:
    """The Annotation Property Type of a cell label; unknown labels get a private code."""
    return CELL_TYPES.get(label) or Code(f"LPL-{label.upper()}"[:64], PRIVATE_SCHEME, label)


@dataclass(frozen=True)
class ResultCode:
    """How one result quantity is named and in which units it is reported."""

    concept: CodedConcept
    units: str


def map_concept(entry: Mapping[str, Any]) -> CodedConcept:
    """An entry of the LOINC map (code, display, HL7 system LN or L) as a DICOM code."""
    scheme = "LN" if entry["system"] == "LN" else PRIVATE_SCHEME
    return CodedConcept(str(entry["code"]), scheme, str(entry["display"])[:64])


def result_code(loinc_map: Mapping[str, Any], key: str) -> ResultCode | None:
    """The coded name of result ``key`` from the LOINC map; None when the map lacks it."""
    entry = (loinc_map.get("results") or {}).get(key)
    return None if entry is None else ResultCode(map_concept(entry), str(entry["units"]))


def named_result(loinc_map: Mapping[str, Any], key: str, meaning: str, units: str) -> ResultCode:
    """Result ``key`` as the LOINC map codes it, else as a private code (a site may drop keys)."""
    return result_code(loinc_map, key) or ResultCode(
        CodedConcept(f"LPL-{key.upper()}"[:64], PRIVATE_SCHEME, meaning[:64]), units
    )


def differential_code(loinc_map: Mapping[str, Any], label: str) -> ResultCode:
    """The coded name of a class's share of the leukocytes, keyed as in the ORU."""
    return named_result(loinc_map, result_key(label), f"{label} per 100 leukocytes", "%")


@dataclass(frozen=True)
class Verification:
    """Who signed the result out, for whom, and when (DICOM Verifying Observer)."""

    observer: str  # the reviewer's user name
    organization: str  # the laboratory (HL7 sending facility)
    at: datetime

    @property
    def person_name(self) -> str:
        """The observer as a DICOM PN; a single name is a family name (``name^``)."""
        return self.observer if "^" in self.observer else f"{self.observer}^"


@dataclass(frozen=True)
class Producer:
    """The device that makes report objects: this installation and the models it ran."""

    station: str  # the DICOM AE title of the installation
    model_versions: Mapping[str, str] = field(default_factory=dict)
    software_version: str = __version__

    @property
    def uid(self) -> str:
        """A UID that stays the same for one installation (device observer UID)."""
        return str(generate_uid(prefix=None, entropy_srcs=[MANUFACTURER, self.station]))

    @property
    def model_name(self) -> str:
        """lisplugin and its models in one line: ``lisplugin 0.1.0 (detector 1.2; ...)``."""
        models = "; ".join(f"{name} {version}" for name, version in self.model_versions.items())
        name = f"lisplugin {self.software_version}"
        return f"{name} ({models})" if models else name

    @property
    def software_versions(self) -> list[str]:
        """Software Versions (0018,1020): lisplugin first, then each model."""
        models = [f"{name} {version}"[:64] for name, version in self.model_versions.items()]
        return [f"lisplugin {self.software_version}", *models]
