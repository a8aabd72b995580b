"""How common each leukocyte class is where the classifier is used, against where it learned.

A classifier's probabilities carry the class mix of its training draws: half of them came from
PBC's curated crops, where immature granulocytes, erythroblasts and platelets are a third of the
cells; in a lab's specimens they are a few percent. At a lab whose stain the network has never
seen, its doubt between a lymphocyte and an erythroblast is then settled by PBC's mix. Bayes'
rule moves each probability from the training mix to the lab's (Saerens et al., Neural
Computation 2002): ``p_lab(c | x) ~ p_train(c | x) * prevalence(c) / training_prior(c)``.

The prevalence is a lab's expectation, not something learned from its cells one specimen at a
time (an EM estimate per batch was measured and not kept: see the classifier's card).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

#: Share of immature granulocytes, erythroblasts and platelets taken for leukocytes among the
#: leukocytes of peripheral-blood smears sent for review (adults: IG 0-0.5 %, no erythroblasts,
#: a little more in specimens that are reviewed). These three classes come only from PBC's
#: curated set, where they are a third of the cells: their share of the training draws is an
#: artefact of that curation. The five common classes are left out, so they keep the training
#: mix: curated sets and specimens differ in them both ways (eosinophils are 1-6 % of normal
#: blood, a quarter of BCCD's fields and a fifth of PBC's crops), and moving them to normal
#: blood's mix cost eosinophils at two of three sites left out (the classifier's card).
REFERENCE_PREVALENCE: dict[str, float] = {"ig": 0.02, "erythroblast": 0.01, "platelet": 0.01}

#: No class is ever taken as impossible: a share under this counts as this.
FLOOR = 1e-4


class PrevalenceError(ValueError):
    """A class mix that cannot be used (unknown classes, negative or no shares)."""


def shares(mix: Mapping[str, float], classes: Sequence[str]) -> np.ndarray:
    """``mix`` as shares of ``classes`` (in their order), summing to 1; absent classes floored."""
    unknown = sorted(set(mix) - set(classes))
    if unknown:
        raise PrevalenceError(f"classes {unknown} are not the model's ({list(classes)})")
    values = np.array([float(mix.get(c, 0.0)) for c in classes], dtype=np.float64)
    if not np.isfinite(values).all() or (values < 0).any() or values.sum() <= 0:
        raise PrevalenceError(f"shares must be non-negative and not all zero: {dict(mix)}")
    values = np.maximum(values / values.sum(), FLOOR)
    return values / values.sum()


def lab_mix(
    prevalence: Mapping[str, float], training_prior: Mapping[str, float], classes: Sequence[str]
) -> np.ndarray:
    """A lab's whole class mix from the shares it states: the classes it leaves out keep their
    training proportions among themselves, in what the stated ones leave (nothing, if those
    add up to 1 or more: then the rest count as rare)."""
    shares(prevalence, classes)  # refuses unknown classes and unusable values
    total = sum(float(v) for v in prevalence.values())
    rest = {c: float(training_prior.get(c, 0.0)) for c in classes if c not in prevalence}
    left = sum(rest.values())
    if total >= 1 or not left:
        return shares(prevalence, classes)
    whole = {c: float(prevalence.get(c, 0.0)) for c in classes}
    whole.update({c: (1 - total) * v / left for c, v in rest.items()})
    return shares(whole, classes)


def prior_shift(
    classes: Sequence[str],
    training_prior: Mapping[str, float] | None,
    prevalence: Mapping[str, float] | None,
) -> np.ndarray | None:
    """What to add to each class's log-probability: ``log(prevalence / training_prior)``.

    A class the model never trained on gets nothing added: its probability says nothing about
    the cell, and moving it by the ratio to a floor would let noise win. ``None`` (nothing to
    add) when either mix is unknown.
    """
    if not training_prior or not prevalence:
        return None
    lab = lab_mix(prevalence, training_prior, classes)
    shift = np.log(lab) - np.log(shares(training_prior, classes))
    trained = np.array([float(training_prior.get(c, 0.0)) > 0 for c in classes])
    return np.where(trained, shift, 0.0)


def calibrated(
    logits: np.ndarray, temperature: float = 1.0, shift: np.ndarray | None = None
) -> np.ndarray:
    """Probabilities of ``logits / temperature``, each class's log moved by ``shift``
    (:func:`prior_shift`); each row sums to 1."""
    z = logits.astype(np.float64) / temperature
    if shift is not None:
        z = z + shift
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def label_mix(
    labels: Sequence[int] | np.ndarray, classes: Sequence[str], weights: np.ndarray | None = None
) -> dict[str, float]:
    """Each class's share of a training set's draws (``weights``: each crop's draw weight)."""
    y = np.asarray(labels, dtype=np.int64)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
    total = float(w.sum()) or 1.0
    return {c: round(float(w[y == i].sum()) / total, 4) for i, c in enumerate(classes)}
