"""``lisplugin train norms``: the training sites' feature statistics of a classifier, shipped
beside its graph so that the daemon can normalise its features on each specimen's leukocytes
(``lisplugin.inference.specimen_norms``).

Each convolution's output is measured on the validation crops of the sites the model trained
on (cut and coloured as in training), each site weighted by its share of the training draws
(PBC half when other sites train too, the rest evenly), and written to
``leukocyte-classifier.norms.npz``; the card's front matter gets ``specimen_norms`` (the file,
its SHA-256, ``alpha``: the weight of the specimen's own statistics, and the number of
leukocytes a specimen needs, ``min_cells``, and uses at most, ``max_cells``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lisplugin.inference.registry import load_card, read_front_matter, replace_front_matter
from lisplugin.inference.specimen_norms import NormsSettings, measure_source, save_source

CARD = "leukocyte-classifier"
NORMS_FILE = f"{CARD}.norms.npz"


def site_weights(sites: Sequence[str], pbc_share: float = 0.5) -> dict[str, float]:
    """Each site's share of the training draws (``lisplugin train classifier --site-share``)."""
    if len(sites) == 1:
        return {sites[0]: 1.0}
    others = [s for s in sites if s != "pbc"]
    if "pbc" not in sites:
        return {s: 1.0 / len(others) for s in others}
    return {"pbc": pbc_share, **{s: (1.0 - pbc_share) / len(others) for s in others}}


def write_norms(
    models: Path,
    data: Path,
    sites: Sequence[str] | None = None,
    alpha: float = 1.0,
    min_cells: int = 20,
    max_cells: int = 64,
    limit: int | None = None,
    log: Any = print,
    layers: int | None = 3,
    spread: str = "pooled",
) -> dict[str, Any]:
    """Measure and write the statistics of ``models``' classifier; returns ``specimen_norms``."""
    from lisplugin.datasets.sites import load_site
    from lisplugin.inference.classifier import OnnxLeukocyteClassifier
    from lisplugin.training.classifier import _shipped_detector

    card = load_card(models, CARD)
    classifier = OnnxLeukocyteClassifier(card)
    chosen = list(sites or card.get("sites") or ["pbc"])
    detector = _shipped_detector() if "wbc-seg" in chosen else None
    batches = []
    for site, weight in site_weights(chosen).items():
        crops, _ = load_site(
            site,
            data,
            classifier.classes,
            classifier.input_size,
            classifier.centre,
            classifier.colour,
            detector,
            limit,
            log,
            splits=("val",),
        )["val"]
        batches.append((classifier.normalised(crops), weight))
        log(f"{site}: {len(crops)} validation crops, weight {weight:.3f}")
    source = measure_source(card.onnx_path, batches, within=spread == "within")
    sha = save_source(models / NORMS_FILE, source)
    described = {
        "file": NORMS_FILE,
        "sha256": sha,
        "alpha": alpha,
        "min_cells": min_cells,
        "max_cells": max_cells,
        "layers": layers,
    }
    _set_front_matter(models / f"{CARD}.md", described, chosen, spread)
    return described


def _set_front_matter(
    card_path: Path, described: dict[str, Any], sites: Sequence[str], spread: str = "pooled"
) -> None:
    """Put ``specimen_norms`` into the card's front matter (the body is left as it is)."""
    meta = read_front_matter(card_path)
    meta["specimen_norms"] = {**described, "sites": list(sites), "split": "val", "spread": spread}
    replace_front_matter(card_path, meta)


def cli(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="lisplugin train norms", description=__doc__)
    parser.add_argument("--models", type=Path, required=True, help="folder with the classifier")
    parser.add_argument("--data", type=Path, required=True, help="../shared/data")
    parser.add_argument(
        "--sites", nargs="+", help="the sites the model trained on (default: the card's)"
    )
    parser.add_argument(
        "--alpha", type=float, default=1.0, help="weight of the specimen's own statistics"
    )
    parser.add_argument("--min-cells", type=int, default=20)
    parser.add_argument("--max-cells", type=int, default=64)
    parser.add_argument(
        "--layers",
        type=int,
        default=3,
        help="normalise only the first N convolutions (3: the stem and the first block, where "
        "stain and camera live; deeper layers carry the class); 0 or less: all",
    )
    parser.add_argument(
        "--spread",
        choices=("pooled", "within"),
        default="pooled",
        help="the training spread a specimen's features are scaled to: of all sites' crops "
        "pooled, or the mean spread inside one site (a specimen is one lab's)",
    )
    parser.add_argument("--limit", type=int, help="at most N crops per site (tests)")
    args = parser.parse_args(argv)
    try:  # the bounds a card is loaded with
        NormsSettings(NORMS_FILE, "", args.alpha, args.min_cells, args.max_cells).validate()
    except ValueError as exc:
        parser.error(str(exc))
    started = time.monotonic()
    described = write_norms(
        args.models,
        args.data,
        args.sites,
        args.alpha,
        args.min_cells,
        args.max_cells,
        args.limit,
        layers=args.layers if args.layers > 0 else None,
        spread=args.spread,
    )
    print(f"{described['file']} written ({time.monotonic() - started:.0f} s)")
    return 0
