"""One pose per section from many pairwise registrations: robust least squares instead of a chain.

Chaining neighbour-to-neighbour transforms adds up every pair's error along the stack, and one
failed pair moves every section beyond it. Here each section is registered to more than one
neighbour (k-1 and k-2), and the poses that best agree with all pairwise results are solved
for, with iteratively reweighted least squares (Cauchy weights): a pair that disagrees with
the others is outvoted and reported instead of being followed.

Optionally (`anchors`) each section also carries a weak absolute cue, its tissue centroid and
principal axis in its own canvas: the aligned stack should not wander (clean already centred
every section), so a section's aligned centroid is pulled towards the reference's and its axis
towards the reference's axis (only when `prior_angle_deg` is given), with standard deviations
wider than a pair's error. This removes the slow trend that pairwise errors accumulate
into; its limit is that a brain whose sections' centroids or axes really move a lot along the
stack is pulled slightly towards a straight stack (the cue is itself robustly weighted, so a
torn section's shifted centroid is outvoted by its pairs).

The running mean of a few neighbouring sections' aligned centroids is held much tighter
(`TREND_WINDOW`, `TREND_SHIFT_PX`): one centroid is a noisy cue, their mean is not, and it is the
slow trend that pairwise errors add up to.

Before the solve, `choose_hypotheses` picks, of each pair's refined hypotheses (several coarse
starts, metric masks), the combination consistent around the stack's triangles: a pair half a
turn off can score better alone, but cannot agree with its neighbours' pairs.

Manual transforms are hard constraints: sections joined by one are solved as one rigid body.

Poses follow `pipeline.imaging.transforms`: `pose[i]` maps reference-canvas points to section
i's canvas, ``aligned_i(p) = cleaned_i(pose[i] p)``; a pair (fixed j, moving i, T) measures
``pose[i] = T pose[j]``. All angles in radians, lengths in pixels of the registered images.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import SlidepipeError
from pipeline.imaging.qc import high_outliers
from pipeline.imaging.transforms import rigid_matrix

PAIR_SIGMA_PX = 0.3
"""Nominal error of a good pairwise registration (RMS over the tissue, thumbnail px)."""
CAUCHY = 3.0
"""Residuals of CAUCHY sigmas get half weight."""
OUTVOTED_PX = 1.0
"""A pair whose transform is further than this (RMS over the tissue) from the solved poses, and
more than 4 robust standard deviations from the typical pair, was outvoted (see `qc`)."""
PRIOR_SHIFT_PX = 1.0
PRIOR_ANGLE_DEG = None
"""The axis cue is off by default: the sample brain's axis turns 3.5 degrees from one end to the
other, and pulling towards a straight axis made alignment worse there (measured, docs/processing.md)."""
ITERATIONS = 15
TREND_WINDOW = 5
TREND_SHIFT_PX = 0.1
"""With anchors and `trend_window` W, the mean over every W consecutive sections of their aligned
centroids' offset from the reference's (in reference coordinates, each centroid robustly weighted
as its anchor) is held to this: the slow trend comes from the tissue, the detail from the pairs.
One centroid is a noisy cue (anatomy, tears), the mean of a few is not. Measured (2026-12-06):
the synthetic 120-section stack's end-to-end drift 1.02 -> 0.25 px (per-pair error 0.14); the hard
sample 0.74 -> 0.65 px RMS; the standard sample 0.45 -> 0.46. Its drift was mostly translation:
the rotation part of it was 0.49 degrees end to end, 0.21 px over the tissue."""


@dataclass(frozen=True)
class Pair:
    fixed: int
    moving: int
    matrix: np.ndarray
    """fixed -> moving coordinates (3x3)."""
    hard: bool = False
    """A manual transform: held exactly."""
    rotation_only: bool = False
    """Only the pair's rotation enters the solve (its shift constrains nothing; its robust weight
    still comes from the whole transform, so a fit that is off in its shift is outvoted in its
    turn too): the align stage's similarity fits, whose shift (of the fixed tissue centroid under
    a scale) is no better than the registration's."""


@dataclass(frozen=True)
class Anchor:
    centroid: tuple[float, float]
    """(x, y) of the tissue centroid in the section's canvas."""
    axis: float | None
    """Direction of the tissue's principal axis (radians, modulo pi), None when the tissue is too round."""


@dataclass
class PoseSolution:
    poses: list[np.ndarray]
    pair_residual: np.ndarray
    """Per pair: RMS distance (px, over a disc of the tissue's RMS radius) between the pair's
    transform and what the solved poses say."""
    pair_weight: np.ndarray
    outvoted: np.ndarray
    section_disagreement: np.ndarray
    """Per section: median residual of the pairs it takes part in (NaN when it has none)."""
    anchor_residual: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Per section: distance (px) of its aligned centroid from the reference's (0 without anchors)."""


def anchor_of(image: np.ndarray) -> Anchor:
    """Centroid and principal axis of the non-zero pixels (tissue) of a cleaned thumbnail."""
    data = np.asarray(image)
    tissue = data.any(axis=2) if data.ndim == 3 else data != 0
    yy, xx = np.nonzero(tissue)
    if xx.size < 3:
        raise SlidepipeError("section has no tissue: no centroid")
    cx, cy = xx.mean(), yy.mean()
    cov = np.cov(np.stack([xx - cx, yy - cy]))
    values, vectors = np.linalg.eigh(cov)
    anisotropy = (values[1] - values[0]) / max(values[1] + values[0], 1e-12)
    axis = float(np.arctan2(vectors[1, 1], vectors[0, 1])) if anisotropy > 0.1 else None
    return Anchor((float(cx), float(cy)), axis)


def rms_radius(image: np.ndarray, center: tuple[float, float]) -> float:
    data = np.asarray(image)
    tissue = data.any(axis=2) if data.ndim == 3 else data != 0
    yy, xx = np.nonzero(tissue)
    if xx.size == 0:
        return 1.0
    return float(np.sqrt(((xx - center[0]) ** 2 + (yy - center[1]) ** 2).mean()))


def pair_discrepancy(expected: np.ndarray, found: np.ndarray, center, radius: float) -> float:
    """RMS distance over a disc about `center` with RMS radius `radius` between two rigid maps."""
    delta = found @ _inverse(expected)
    angle = np.arctan2(delta[1, 0], delta[0, 0])
    c = np.asarray(center, dtype=np.float64)
    ex, ey = delta[:2, 2] - c + delta[:2, :2] @ c
    return float(np.sqrt(ex * ex + ey * ey + (2 * radius * np.sin(angle / 2)) ** 2))


def _inverse(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a rigid 3x3 matrix."""
    out = np.eye(3)
    out[:2, :2] = matrix[:2, :2].T
    out[:2, 2] = -matrix[:2, :2].T @ matrix[:2, 2]
    return out


def _least_squares(rows: list, rhs: list) -> np.ndarray:
    """Normal equations (the systems are small and well posed; SVD-based lstsq was 20x slower)."""
    a, b = np.asarray(rows, dtype=np.float64), np.asarray(rhs, dtype=np.float64)
    return np.linalg.solve(a.T @ a, a.T @ b)


def _angle_only(matrix: np.ndarray) -> tuple[float, None, None]:
    return float(np.arctan2(matrix[1, 0], matrix[0, 0])), None, None


def _rot(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


class _Groups:
    """Sections joined by hard pairs: pose[m] = offset[m] @ pose[root[m]]."""

    def __init__(self, count: int, pairs: list[Pair], reference: int):
        self.reference = reference
        self.root = list(range(count))
        self.offset = [np.eye(3) for _ in range(count)]
        members = {i: [i] for i in range(count)}
        for pair in (p for p in pairs if p.hard):
            a, b = self.root[pair.fixed], self.root[pair.moving]
            if a == b:
                raise SlidepipeError(f"manual transforms form a loop through sections {pair.fixed} and {pair.moving}")
            # pose[moving] = T pose[fixed] = T off[fixed] pose[a]; pose[moving] = off[moving] pose[b]
            # => pose[b] = off[moving]^-1 T off[fixed] pose[a]: re-root b's group onto a
            link = np.linalg.inv(self.offset[pair.moving]) @ pair.matrix @ self.offset[pair.fixed]
            keep, drop = (b, a) if b == self.root[reference] else (a, b)
            if keep == b:  # the reference's group keeps its root: express a's group in b
                link = np.linalg.inv(link)
            for m in members.pop(drop):
                self.offset[m] = self.offset[m] @ link
                self.root[m] = keep
                members[keep].append(m)
        ref_root = self.root[reference]
        # the reference itself is the identity: fold its offset into the group's root
        base = np.linalg.inv(self.offset[reference])
        for m in members[ref_root]:
            self.offset[m] = self.offset[m] @ base
        self.free = [r for r in sorted(members) if r != ref_root]
        self.ref_root = ref_root
        self.index = {r: k for k, r in enumerate(self.free)}


def solve_poses(count: int, pairs: list[Pair], reference: int, center: tuple[float, float], radius: float, *,
                anchors: list[Anchor | None] | None = None, prior_shift_px: float = PRIOR_SHIFT_PX,
                prior_angle_deg: float | None = PRIOR_ANGLE_DEG, iterations: int = ITERATIONS,
                trend_window: int | None = TREND_WINDOW, trend_shift_px: float = TREND_SHIFT_PX) -> PoseSolution:
    """Robust poses of `count` sections onto `reference` from pairwise transforms (see the module)."""
    if not 0 <= reference < count:
        raise SlidepipeError(f"reference section {reference} is outside 0..{count - 1}")
    for p in pairs:
        if not (0 <= p.fixed < count and 0 <= p.moving < count) or p.fixed == p.moving:
            raise SlidepipeError(f"pair {p.fixed}->{p.moving} is not between two different sections of 0..{count - 1}")
    groups = _Groups(count, pairs, reference)
    soft = [p for p in pairs if not p.hard]
    _check_connected(count, pairs, groups)
    c = np.asarray(center, float)
    n = len(groups.free)
    measured = [_angle_only(p.matrix) for p in soft]
    weights = np.ones(len(soft))
    anchor_weights = np.ones(count)
    use_anchors = anchors is not None
    if use_anchors and len(anchors) != count:
        raise SlidepipeError(f"{len(anchors)} anchors for {count} sections")
    ref_anchor = anchors[reference] if use_anchors else None
    sigma_angle = None if prior_angle_deg is None else np.deg2rad(prior_angle_deg) * radius
    start = _initial_poses(count, [p for p in soft if not p.rotation_only], groups, center, radius)
    theta = np.array([np.arctan2(start[r][1, 0], start[r][0, 0]) for r in groups.free])
    residual = np.array([pair_discrepancy(p.matrix @ start[p.fixed], start[p.moving], center, radius) for p in soft])
    weights = 1.0 / (1.0 + (residual / (CAUCHY * PAIR_SIGMA_PX)) ** 2)
    for _ in range(iterations):
        theta = _solve_angles(count, soft, measured, groups, weights, theta, radius,
                              anchors if use_anchors else None, anchor_weights, sigma_angle)
        shifts = _solve_shifts(count, soft, measured, groups, weights, theta, c,
                               anchors if use_anchors else None, anchor_weights, prior_shift_px,
                               trend_window, trend_shift_px)
        poses = _poses(count, groups, theta, shifts, c)
        residual = np.array([pair_discrepancy(p.matrix @ poses[p.fixed], poses[p.moving], center, radius) for p in soft])
        previous, weights = weights, 1.0 / (1.0 + (residual / (CAUCHY * PAIR_SIGMA_PX)) ** 2)
        anchor_residual = np.zeros(count)
        if use_anchors and ref_anchor is not None:
            for i, a in enumerate(anchors):
                if a is not None and i != reference:
                    anchor_residual[i] = float(np.linalg.norm((poses[i] @ np.array([*ref_anchor.centroid, 1.0]))[:2]
                                                              - np.asarray(a.centroid)))
            anchor_weights = 1.0 / (1.0 + (anchor_residual / (CAUCHY * prior_shift_px)) ** 2)
        if np.max(np.abs(weights - previous), initial=0.0) < 1e-4:
            break
    outvoted = high_outliers(residual, OUTVOTED_PX)
    disagreement = np.full(count, np.nan)
    for i in range(count):
        own = [r for p, r in zip(soft, residual) if i in (p.fixed, p.moving)]
        if own:
            disagreement[i] = float(np.median(own))
    if not use_anchors:
        anchor_residual = np.zeros(count)
    return PoseSolution(poses=poses, pair_residual=residual, pair_weight=weights, outvoted=outvoted,
                        section_disagreement=disagreement, anchor_residual=anchor_residual)


TRIANGLE_PX = 1.0
"""Scale of the triangle test in `choose_hypotheses`: a triangle off by this (RMS over the tissue)
costs log 2; the cost grows only logarithmically, so one failed pair cannot outweigh the others."""
TURN_PREFERENCE = 0.1
"""NCC given up by a hypothesis at a half turn ((1 - cos turn) / 2 of it in between), as in
`rotation_search.preferred`: on the hard sample the last three sections' pairs offered a set of
half-turned hypotheses as consistent as the right ones (a near-symmetric pole with a piece
missing) that scored better alone; measured there: 0.05-0.3 all give 1.27 px RMS, 0 gives 8.7."""
SCORE_WEIGHT = 2.0
ALTERNATIVE_COST = 1.2
"""What choosing another hypothesis than the registration's own result costs (as much as a
triangle off by 1.5 px): at the ends of the stack a section has one triangle, and a hypothesis
that fitted a wrong k-2 pair there was chosen over the right result (hard sample section 0: 2.2
px off; standard sample: 5 pairs more than 1 degree off instead of 1). Chosen on the two samples
(2026-12-06, stack RMS px against the truth offline, standard / hard): 0 -> 0.46 / 0.65; 0.5 ->
0.39 / 0.61; 0.7-0.9 -> 0.40 / 0.61; 1.0-1.2 -> 0.40 / 0.42; 1.4-1.6 -> 0.40 / 0.51; 1.9 -> 0.40 /
1.21 (the pole's right turn then loses to the registration's half turn). A tuned constant: the
range that works on the hard sample is narrow, and the align stage's second pass (similarity
fits) does not widen it (swept with it: 0-0.9 leave the pole's first pair 12 degrees off, 1.6 one
pair 1.15 off, 1.9 section 22 half turned; docs/processing.md)."""


def choice_settings() -> dict:
    """The constants `choose_hypotheses` and the trend anchor use (for the compose task's fingerprint)."""
    return {"triangle_px": TRIANGLE_PX, "score_weight": SCORE_WEIGHT, "turn_preference": TURN_PREFERENCE,
            "alternative_cost": ALTERNATIVE_COST, "trend_window": TREND_WINDOW, "trend_shift_px": TREND_SHIFT_PX}


def choose_hypotheses(count: int, candidates: dict[tuple[int, int], list[tuple[np.ndarray, float]]],
                      center: tuple[float, float], radius: float) -> dict[tuple[int, int], int]:
    """Which of each pair's hypotheses (matrix, score) to use: the combination most consistent
    around the stack's triangles (k-2 -> k-1 -> k against k-2 -> k), by dynamic programming
    along the stack (Viterbi over the k-1 pairs' choices; each k-2 pair is chosen with its
    triangle). A pair that is half a turn off can look better alone than the right turn (a near
    symmetric outline, a missing piece), but it cannot agree with both of its neighbours' pairs.
    `candidates[(fixed, moving)]`: steps 1 and 2 only; a missing pair constrains nothing.
    Returns the chosen index per pair (0 where there is one hypothesis)."""

    def cost(d):
        return np.log1p((d / TRIANGLE_PX) ** 2)

    def unary(pair, k):
        matrix, score = candidates[pair][k]
        turn = np.arctan2(matrix[1, 0], matrix[0, 0])
        return -SCORE_WEIGHT * (score - TURN_PREFERENCE * (1 - np.cos(turn)) / 2) + (ALTERNATIVE_COST if k else 0.0)

    def triangle(k, a, b):
        """Best k-2 choice and its cost for the triangle ending at section k, given choice a of
        (k-2, k-1) and b of (k-1, k)."""
        across = candidates.get((k - 2, k))
        first, second = candidates.get((k - 2, k - 1)), candidates.get((k - 1, k))
        if not across:
            return 0, 0.0
        if not first or not second:
            scores = [unary((k - 2, k), c) for c in range(len(across))]
            return int(np.argmin(scores)), float(min(scores))
        chained = second[b][0] @ first[a][0]
        misfit = [pair_discrepancy(chained, m, center, radius) for m, _ in across]
        costs = [cost(d) + unary((k - 2, k), c) for c, d in enumerate(misfit)]
        return int(np.argmin(costs)), float(min(costs))

    def options(k):
        return range(len(candidates.get((k - 1, k)) or [None]))

    def own(k, b):
        return unary((k - 1, k), b) if candidates.get((k - 1, k)) else 0.0

    chosen: dict[tuple[int, int], int] = {}
    if count < 2:
        return chosen
    total = {b: own(1, b) for b in options(1)}
    back: list[dict[int, int]] = [{}, {}]
    for k in range(2, count):
        new, came = {}, {}
        for b in options(k):
            best = min(((total[a] + triangle(k, a, b)[1], a) for a in options(k - 1)), key=lambda v: v[0])
            new[b], came[b] = best[0] + own(k, b), best[1]
        total = new
        back.append(came)
    b = min(total, key=total.get)
    path = {count - 1: b}
    for k in range(count - 1, 1, -1):
        path[k - 1] = back[k][path[k]]
    for k in range(1, count):
        if candidates.get((k - 1, k)):
            chosen[(k - 1, k)] = path[k]
        if k >= 2 and candidates.get((k - 2, k)):
            chosen[(k - 2, k)] = triangle(k, path[k - 1], path[k])[0]
    return chosen


def _check_connected(count: int, pairs: list[Pair], groups: _Groups) -> None:
    parent = list(range(count))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for p in pairs:
        parent[find(p.fixed)] = find(p.moving)
    lost = [i for i in range(count) if find(i) != find(groups.ref_root)]
    if lost:
        raise SlidepipeError(f"sections {lost} are not connected to the reference by any pairwise registration")


def _group_angle(groups: _Groups, i: int) -> float:
    return float(np.arctan2(groups.offset[i][1, 0], groups.offset[i][0, 0]))


def _initial_poses(count, soft, groups, center, radius) -> list[np.ndarray | None]:
    """Poses grown out from the reference, one section at a time: next is the section whose
    known neighbours agree best on its pose (a vote, so a wrong tissue's pairs do not lead)."""
    known = {i: groups.offset[i] for i in range(count) if groups.root[i] == groups.ref_root}
    while len(known) < count:
        estimates: dict[int, list[np.ndarray]] = {}
        for p in soft:
            if p.fixed in known and p.moving not in known:
                estimates.setdefault(p.moving, []).append(p.matrix @ known[p.fixed])
            elif p.moving in known and p.fixed not in known:
                estimates.setdefault(p.fixed, []).append(_inverse(p.matrix) @ known[p.moving])
        if not estimates:
            break
        best = None
        for section, values in estimates.items():
            agree = np.array([[pair_discrepancy(a, b, center, radius) < 1.5 for b in values] for a in values])
            support = agree.sum(axis=1)
            k = int(np.argmax(support))
            rank = 2 * support[k] - len(values)
            if best is None or rank > best[0]:
                best = (rank, section, values[k])
        _, other, pose = best
        root_pose = _inverse(groups.offset[other]) @ pose
        for m in range(count):
            if groups.root[m] == groups.root[other]:
                known[m] = groups.offset[m] @ root_pose
    return [known.get(i) for i in range(count)]


def _angle_of(i, groups, theta) -> tuple[int | None, float]:
    """(column of the free root or None for the reference group, constant) with angle_i = theta[col] + const."""
    root = groups.root[i]
    return (None if root == groups.ref_root else groups.index[root]), _group_angle(groups, i)


def _wrap(x):
    return (x + np.pi) % (2 * np.pi) - np.pi


def _solve_angles(count, soft, measured, groups, weights, theta, radius, anchors, anchor_weights, sigma_angle):
    n = len(groups.free)
    if n == 0:
        return theta
    rows, rhs = [], []

    def current(i):
        col, const = _angle_of(i, groups, theta)
        return (theta[col] if col is not None else 0.0) + const

    for p, (a, _, _), w in zip(soft, measured, weights):
        row = np.zeros(n)
        ci, ki = _angle_of(p.moving, groups, theta)
        cj, kj = _angle_of(p.fixed, groups, theta)
        if ci is not None:
            row[ci] += 1
        if cj is not None:
            row[cj] -= 1
        # theta_i - theta_j = a (+ 2 pi k nearest to the current solution)
        target = a - ki + kj
        difference = current(p.moving) - current(p.fixed)
        target += difference - a - _wrap(difference - a)
        scale = np.sqrt(w) * radius / PAIR_SIGMA_PX
        rows.append(row * scale)
        rhs.append(target * scale)
    if anchors is not None and sigma_angle is not None and anchors_reference_axis(anchors, groups) is not None:
        ref_axis = anchors_reference_axis(anchors, groups)
        for i, anchor in enumerate(anchors):
            if anchor is None or anchor.axis is None:
                continue
            col, const = _angle_of(i, groups, theta)
            if col is None:
                continue
            wanted = anchor.axis - ref_axis  # modulo pi
            now = current(i)
            wanted = now + ((wanted - now + np.pi / 2) % np.pi - np.pi / 2)
            row = np.zeros(n)
            row[col] = 1
            scale = np.sqrt(anchor_weights[i]) * radius / sigma_angle
            rows.append(row * scale)
            rhs.append((wanted - const) * scale)
    return _least_squares(rows, rhs)


def anchors_reference_axis(anchors, groups):
    return anchors[groups.reference].axis if anchors[groups.reference] is not None else None


def _solve_shifts(count, soft, measured, groups, weights, theta, c, anchors, anchor_weights, prior_shift_px,
                  trend_window=None, trend_shift_px=TREND_SHIFT_PX):
    """Linear in the root shifts: pose_i = off_i pose_root, pose_root = rigid(theta_root, t_root)."""
    n = len(groups.free)
    if n == 0:
        return np.zeros((0, 2))
    root_angle = {r: theta[k] for k, r in enumerate(groups.free)}
    root_angle[groups.ref_root] = 0.0

    def affine(i):
        """pose_i(p) = L_i p + A_i t_root + b_i (t_root the root's shift about c)."""
        off = groups.offset[i]
        root = groups.root[i]
        rot = _rot(root_angle[root])
        lin = off[:2, :2] @ rot
        # pose_root(p) = rot (p - c) + c + t
        const = off[:2, :2] @ (c - rot @ c) + off[:2, 2]
        col = None if root == groups.ref_root else groups.index[root]
        return lin, off[:2, :2], const, col

    rows, rhs = [], []
    for p, w in zip(soft, weights):
        if p.rotation_only:
            continue
        # pose_i = T pose_j, compared where the tissue is: pose_i(c) = T pose_j(c)
        li, ai, bi, ci = affine(p.moving)
        lj, aj, bj, cj = affine(p.fixed)
        t_lin, t_off = p.matrix[:2, :2], p.matrix[:2, 2]
        block = np.zeros((2, 2 * n))
        if ci is not None:
            block[:, 2 * ci:2 * ci + 2] += ai
        if cj is not None:
            block[:, 2 * cj:2 * cj + 2] -= t_lin @ aj
        target = t_lin @ (lj @ c + bj) + t_off - li @ c - bi
        scale = np.sqrt(w) / PAIR_SIGMA_PX
        rows.extend(list(block * scale))
        rhs.extend(list(target * scale))
    if anchors is not None:
        ref_anchor = anchors[groups.reference]
        if ref_anchor is not None:
            g = np.asarray(ref_anchor.centroid, float)
            for i, anchor in enumerate(anchors):
                if anchor is None:
                    continue
                li, ai, bi, ci = affine(i)
                if ci is None:
                    continue
                # pose_i(g) = centroid_i
                block = np.zeros((2, 2 * n))
                block[:, 2 * ci:2 * ci + 2] = ai
                target = np.asarray(anchor.centroid) - li @ g - bi
                scale = np.sqrt(anchor_weights[i]) / prior_shift_px
                rows.extend(list(block * scale))
                rhs.extend(list(target * scale))
            if trend_window:
                # the slow trend: the mean over a window of sections of (aligned centroid - the
                # reference's), in reference coordinates, held near 0 much tighter than one centroid
                half = trend_window // 2
                for k in range(count):
                    block, target, total = np.zeros((2, 2 * n)), np.zeros(2), 0.0
                    for i in range(max(0, k - half), min(count, k + half + 1)):
                        if anchors[i] is None:
                            continue
                        li, ai, bi, ci = affine(i)
                        w = anchor_weights[i]
                        back = np.linalg.inv(li)  # section i's canvas -> reference directions
                        if ci is not None:
                            block[:, 2 * ci:2 * ci + 2] -= w * back @ ai
                        target += w * back @ (li @ g + bi - np.asarray(anchors[i].centroid))
                        total += w
                    if total > 0:
                        rows.extend(list(block / (total * trend_shift_px)))
                        rhs.extend(list(target / (total * trend_shift_px)))
    return _least_squares(rows, rhs).reshape(n, 2)


def _poses(count, groups, theta, shifts, c) -> list[np.ndarray]:
    roots = {groups.ref_root: np.eye(3)}
    for k, r in enumerate(groups.free):
        roots[r] = rigid_matrix(theta[k], shifts[k, 0], shifts[k, 1], tuple(c))
    return [groups.offset[i] @ roots[groups.root[i]] for i in range(count)]
