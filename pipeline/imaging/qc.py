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


def mirrored_sections(count: int, pairs: list[tuple[int, int, bool]]) -> list[int]:
    """Sections (indices) more than half of whose pairs (fixed, moving, looks_mirrored) fit better
    mirrored. A section mounted face down makes every one of its pairs look mirrored; a neighbour
    shares only its pair with it (on the sample: a mirrored section 4 of 4, one false pair elsewhere)."""
    mirrored, total = np.zeros(count, int), np.zeros(count, int)
    for fixed, moving, looks in pairs:
        for i in (fixed, moving):
            total[i] += 1
            mirrored[i] += int(looks)
    return [i for i in range(count) if total[i] and 2 * mirrored[i] > total[i]]
