"""Which sections to look at: outliers along the stack, from the alignment's own evidence.

Two independent signs of a bad section: its registrations disagree with what the rest of the
stack says (`pose_graph.PoseSolution.section_disagreement`: a wrong tissue, a failed pair), and
its similarity to its neighbour dips below the local trend (the registration metric, or NCC as
aligned). Pure functions on per-section numbers.
"""

from __future__ import annotations

import numpy as np

DISAGREEMENT_PX = 1.0
"""A section whose pairs disagree with the solved poses by more than this (median RMS over the
tissue, thumbnail px) and more than `SPREAD` robust standard deviations of the stack is flagged."""
SPREAD = 4.0


def dips(values: np.ndarray, spread: float = 4.0, drop: float = 0.15, window: int = 7) -> np.ndarray:
    """Undefined values, and dips below the local trend (running median of `window` values) by
    more than `drop` of it and `spread` median absolute residuals. Similarity falls smoothly
    towards the ends of a brain; a bad section makes a dip."""
    values = np.asarray(values, dtype=float)
    finite = np.isfinite(values)
    flagged = ~finite
    if finite.sum() < window:
        return flagged
    index = np.flatnonzero(finite)
    kept = values[finite]
    half = window // 2
    trend = np.array([np.median(kept[max(0, i - half):i + half + 1]) for i in range(kept.size)])
    residual = kept - trend
    mad = np.median(np.abs(residual)) or 1e-9
    low = (residual < -spread * 1.4826 * mad) & (residual < -drop * np.abs(trend))
    flagged[index[low]] = True
    return flagged


def high_outliers(values: np.ndarray, limit: float = DISAGREEMENT_PX, spread: float = SPREAD) -> np.ndarray:
    """Values above `limit` and `spread` robust standard deviations above the median (NaN: never)."""
    values = np.asarray(values, dtype=float)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, bool)
    median = np.median(values[finite])
    sigma = 1.4826 * np.median(np.abs(values[finite] - median))
    with np.errstate(invalid="ignore"):
        return finite & (values > limit) & (values > median + spread * max(sigma, 0.05))


MISFIT_NCC = 0.05
"""A section is flagged when its two neighbours, registered across it (k-2), match each other
better than either matches it by more than this NCC (see `misfit`)."""


def misfit(before: np.ndarray, after: np.ndarray, across: np.ndarray) -> np.ndarray:
    """Per section i: NCC(i-1, i+1) - max(NCC(i-1, i), NCC(i, i+1)), as registered (NaN where a
    pair is missing). Anatomy changes along the stack, so a section normally matches each
    neighbour better than they match each other (< 0; -0.41 .. -0.02 on the sample). Wrong tissue
    whose registrations still agree with each other (nothing for the pose solve to outvote)
    matches both neighbours worse than they match across it (+0.16 for a mirrored section from
    elsewhere in the sample). Needs both neighbours: the first and last sections get NaN."""
    before, after, across = (np.asarray(v, dtype=float) for v in (before, after, across))
    return across - np.maximum(before, after)


def flag_sections(names: list[str], disagreement: np.ndarray, similarity: np.ndarray | None = None,
                  misfits: np.ndarray | None = None) -> dict[str, str]:
    """name -> why it should be looked at. `similarity` (higher is better, NaN where there is no
    pair) is per section against its previous neighbour, e.g. minus the registration metric;
    `misfits` per section from `misfit`."""
    flags: dict[str, list[str]] = {}
    for i in np.flatnonzero(high_outliers(disagreement)):
        flags.setdefault(names[i], []).append(
            f"its registrations disagree with the rest of the stack by {disagreement[i]:.1f} px")
    if misfits is not None:
        misfits = np.asarray(misfits, dtype=float)
        with np.errstate(invalid="ignore"):
            for i in np.flatnonzero(np.isfinite(misfits) & (misfits > MISFIT_NCC)):
                flags.setdefault(names[i], []).append(
                    f"its neighbours match each other better (NCC +{misfits[i]:.2f}) than either matches it")
    if similarity is not None:
        similarity = np.asarray(similarity, dtype=float)
        defined = np.isfinite(similarity)
        low = np.zeros(similarity.shape, bool)
        low[defined] = dips(similarity[defined])
        for i in np.flatnonzero(low):
            flags.setdefault(names[i], []).append("it matches its neighbour much worse than the stack around it")
    return {name: "; ".join(reasons) for name, reasons in flags.items()}


MIRROR_PRIOR = 0.8
"""What naming one section mirrored costs in `mirrored_sections` (NCC summed over pairs): a
section is named when its pairs fit better mirrored by more than about half of this in all
(each pair's evidence counts once for and once against). Measured: 0.6-1.0 name exactly the
mirrored sections on the hard sample (7 and 9; 0.2-0.4 also name 22, a pole with a piece
missing) and on the standard sample with section 10 mirrored (0.2-1.2)."""


def mirrored_sections(count: int, pairs: list[tuple[int, int, float]], prior: float = MIRROR_PRIOR) -> list[int]:
    """Sections (indices) mounted mirrored, from pairs (fixed, moving, evidence = mirrored NCC -
    NCC as mounted): the labelling in which a pair fits better mirrored exactly when one of its
    two sections is mirrored, found by dynamic programming along the stack (k-1 and k-2 pairs).
    Counting each section's own pairs fails when two mirrored sections are two apart: their k-2
    pair fits as mounted (hard sample: section 7 had 2 of 4 pairs looking mirrored)."""
    incoming: dict[int, list[tuple[int, float]]] = {}
    for fixed, moving, evidence in pairs:
        if fixed > moving:
            fixed, moving = moving, fixed
        if moving - fixed not in (1, 2):
            raise ValueError(f"pair {fixed}->{moving}: only k-1 and k-2 pairs are labelled")
        incoming.setdefault(moving, []).append((fixed, float(evidence)))

    def own(k, labels):
        """Cost of section k's label and its pairs to k-1, k-2 given labels {index: 0/1}."""
        total = prior * labels[k]
        for fixed, evidence in incoming.get(k, []):
            total += -evidence if labels[fixed] != labels[k] else evidence
        return total

    if count == 0:
        return []
    if count == 1:
        return []
    # state: (label of k-1, label of k)
    cost = {(a, b): own(0, {0: a}) + own(1, {0: a, 1: b}) for a in (0, 1) for b in (0, 1)}
    back: list[dict] = [{}, {}]
    for k in range(2, count):
        new, came = {}, {}
        for b in (0, 1):
            for c in (0, 1):
                options = [(cost[(a, b)] + own(k, {k - 2: a, k - 1: b, k: c}), a) for a in (0, 1)]
                new[(b, c)], came[(b, c)] = min(options)
        cost = new
        back.append(came)
    labels = [0] * count
    labels[count - 2], labels[count - 1] = min(cost, key=cost.get)
    for k in range(count - 1, 1, -1):
        labels[k - 2] = back[k][(labels[k - 1], labels[k])]
    return [i for i in range(count) if labels[i]]
