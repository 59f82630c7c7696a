"""One pose per section from pairwise registrations (pose_graph) and the QC flags (qc)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import SlidepipeError
from pipeline.imaging.pose_graph import Anchor, Pair, choose_hypotheses, pair_discrepancy, solve_poses
from pipeline.imaging.qc import dips, flag_sections, mirrored_sections, misfit
from pipeline.imaging.transforms import compose_to_reference, rigid_matrix

CENTER, RADIUS = (50.0, 40.0), 25.0


def true_poses(count, seed=0):
    rng = np.random.default_rng(seed)
    poses = [rigid_matrix(np.deg2rad(rng.uniform(-45, 45)), rng.uniform(-5, 5), rng.uniform(-5, 5), CENTER)
             for _ in range(count)]
    reference = count // 2
    return [p @ np.linalg.inv(poses[reference]) for p in poses], reference


def relative(poses, fixed, moving):
    return poses[moving] @ np.linalg.inv(poses[fixed])


def pairs_of(poses, error=None, reach=2):
    """k-1 .. k-reach pairs; error(fixed, moving) -> 3x3 applied to the measurement."""
    pairs = []
    for moving in range(1, len(poses)):
        for fixed in range(max(0, moving - reach), moving):
            measured = relative(poses, fixed, moving)
            if error is not None:
                measured = error(fixed, moving) @ measured
            pairs.append(Pair(fixed, moving, measured))
    return pairs


def chain(pairs, count, reference):
    links = [None] + [next(p.matrix for p in pairs if p.fixed == i - 1 and p.moving == i) for i in range(1, count)]
    return compose_to_reference(links, reference)


def worst_error(found, truth):
    return max(pair_discrepancy(t, f, CENTER, RADIUS) for f, t in zip(found, truth))


def test_exact_pairs_give_the_exact_poses():
    truth, reference = true_poses(12)
    solution = solve_poses(12, pairs_of(truth), reference, CENTER, RADIUS)
    assert worst_error(solution.poses, truth) < 1e-6
    assert np.allclose(solution.poses[reference], np.eye(3))
    assert solution.pair_residual.max() < 1e-6 and not solution.outvoted.any()


def test_a_failed_pair_is_outvoted_instead_of_followed():
    truth, reference = true_poses(15, seed=1)
    bad = (9, 10)  # a k-1 pair registered 30 degrees off (the 28.7 -> 11.0 failure)
    pairs = pairs_of(truth, lambda f, m: rigid_matrix(np.deg2rad(30), 3, -2, CENTER) if (f, m) == bad else np.eye(3))
    solution = solve_poses(15, pairs, reference, CENTER, RADIUS)
    chained = chain(pairs, 15, reference)
    print(f"one failed pair: chaining moves the sections beyond it by {worst_error(chained, truth):.1f} px, "
          f"the pose solve by {worst_error(solution.poses, truth):.3f} px")
    assert worst_error(chained, truth) > 10
    assert worst_error(solution.poses, truth) < 0.05
    assert [(p.fixed, p.moving) for p, o in zip(pairs, solution.outvoted) if o] == [bad]


def test_a_manual_transform_is_a_hard_constraint():
    truth, reference = true_poses(10, seed=2)
    pairs = pairs_of(truth)
    manual = rigid_matrix(np.deg2rad(2.0), 1.5, -1.0, CENTER) @ relative(truth, 6, 7)  # the user's own, 2 deg off
    pairs.append(Pair(6, 7, manual, hard=True))
    solution = solve_poses(10, pairs, reference, CENTER, RADIUS)
    assert np.allclose(solution.poses[7], manual @ solution.poses[6], atol=1e-9)
    # a manual transform into the reference moves its neighbour, not the reference
    pairs = pairs_of(truth) + [Pair(reference - 1, reference, manual, hard=True)]
    solution = solve_poses(10, pairs, reference, CENTER, RADIUS)
    assert np.allclose(solution.poses[reference], np.eye(3))
    assert np.allclose(solution.poses[reference], manual @ solution.poses[reference - 1], atol=1e-9)


def test_unconnected_sections_are_an_error():
    truth, reference = true_poses(6)
    pairs = [p for p in pairs_of(truth, reach=1) if p.moving != 4]
    with pytest.raises(SlidepipeError, match=r"sections \[.*\] are not connected"):
        solve_poses(6, pairs, reference, CENTER, RADIUS)


def test_drift_over_a_long_stack_is_removed():
    """120 sections whose anatomy changes slowly: each pair's registration is a little biased
    the same way along the stack (0.1 px and 0.1 degree, slowly turning) plus noise. Chaining adds
    the bias up; the pose solve with the stack's centroids as anchors, one by one weakly and their
    running mean (the slow trend) tightly, does not: issue 10's target, end-to-end drift at most
    twice the per-pair error."""
    count = 120
    truth, reference = true_poses(count, seed=3)
    rng = np.random.default_rng(4)

    def error(fixed, moving):
        steps = moving - fixed
        bias = 0.1 * steps * np.array([np.cos(moving / 15), np.sin(moving / 15)])
        angle = np.deg2rad(0.1 * steps * np.sin(moving / 20) + rng.normal(0, 0.1))
        return rigid_matrix(angle, *(bias + rng.normal(0, 0.05, 2)), CENTER)

    pairs = pairs_of(truth, error)
    anatomy = np.array([51.0, 41.0])  # the tissue's centroid and axis, as the reference shows them
    anchors = []
    for i in range(count):
        centroid = (truth[i] @ np.array([*(anatomy + rng.normal(0, 0.1, 2)), 1.0]))[:2]
        axis = np.arctan2(truth[i][1, 0], truth[i][0, 0]) + np.deg2rad(rng.normal(0, 0.5))
        anchors.append(Anchor((float(centroid[0]), float(centroid[1])), float(axis)))
    per_pair = np.sqrt(np.mean([pair_discrepancy(relative(truth, p.fixed, p.moving), p.matrix, CENTER, RADIUS) ** 2
                                for p in pairs if p.moving - p.fixed == 1]))

    def end_to_end(poses):
        return pair_discrepancy(relative(truth, 0, count - 1), relative(poses, 0, count - 1), CENTER, RADIUS)

    chained = chain(pairs, count, reference)
    graph = solve_poses(count, pairs, reference, CENTER, RADIUS).poses
    one_by_one = solve_poses(count, pairs, reference, CENTER, RADIUS, anchors=anchors, trend_window=None).poses
    anchored = solve_poses(count, pairs, reference, CENTER, RADIUS, anchors=anchors).poses
    print(f"per-pair error {per_pair:.3f} px (RMS over the tissue); end-to-end drift: chained {end_to_end(chained):.2f} px, pose solve "
          f"{end_to_end(graph):.2f} px, with the centroids one by one {end_to_end(one_by_one):.2f} px, and their trend "
          f"{end_to_end(anchored):.2f} px; worst section: chained "
          f"{worst_error(chained, truth):.2f}, pose solve {worst_error(graph, truth):.2f}, with anchors "
          f"{worst_error(anchored, truth):.2f} px")
    assert end_to_end(chained) > 2 * per_pair
    assert end_to_end(anchored) <= 2 * per_pair
    assert worst_error(anchored, truth) < worst_error(graph, truth) < worst_error(chained, truth)


def test_a_corrupted_section_is_flagged_and_does_not_move_its_neighbours():
    count = 20
    truth, reference = true_poses(count, seed=5)
    rng = np.random.default_rng(6)
    wrong = 6  # wrong tissue: every registration involving it lands somewhere arbitrary

    def error(fixed, moving):
        if wrong in (fixed, moving):
            return rigid_matrix(rng.uniform(-np.pi, np.pi), *rng.uniform(-15, 15, 2), CENTER)
        return rigid_matrix(np.deg2rad(rng.normal(0, 0.2)), *rng.normal(0, 0.1, 2), CENTER)

    pairs = pairs_of(truth, error)
    clean = [p if wrong not in (p.fixed, p.moving) else Pair(p.fixed, p.moving, relative(truth, p.fixed, p.moving))
             for p in pairs]
    solution = solve_poses(count, pairs, reference, CENTER, RADIUS)
    baseline = solve_poses(count, clean, reference, CENTER, RADIUS)
    moved = max(pair_discrepancy(b, s, CENTER, RADIUS)
                for i, (b, s) in enumerate(zip(baseline.poses, solution.poses)) if i != wrong)
    names = [f"{i:03d}" for i in range(count)]
    flags = flag_sections(names, solution.section_disagreement)
    print(f"corrupted section {wrong}: disagreement {solution.section_disagreement[wrong]:.1f} px (median of the "
          f"others {np.nanmedian(np.delete(solution.section_disagreement, wrong)):.2f}); other sections moved by at "
          f"most {moved:.3f} px; flags {flags}")
    assert list(flags) == [names[wrong]]
    assert moved < 0.1  # the baseline also has good pairs for the section: not exactly the same problem
    outvoted = {(p.fixed, p.moving) for p, o in zip(pairs, solution.outvoted) if o}
    # the section's own pose is free, so one of its four random pairs may fit it: the rest are outvoted
    assert outvoted <= {(p.fixed, p.moving) for p in pairs if wrong in (p.fixed, p.moving)} and len(outvoted) >= 3


def test_similarity_dips_are_flagged():
    values = np.array([0.9, 0.91, 0.92, 0.9, 0.5, 0.91, 0.9, 0.89, 0.9, np.nan, 0.88])
    assert np.flatnonzero(dips(values)).tolist() == [4, 9]
    names = [f"{i:03d}" for i in range(values.size)]
    flags = flag_sections(names, np.full(values.size, 0.2), values)
    assert list(flags) == ["004"] and "worse than the stack" in flags["004"]


def test_wrong_tissue_that_registers_consistently_is_flagged_by_its_neighbours_across_it():
    """Adjacent sections match better than sections two apart; a section of wrong tissue matches
    both neighbours worse than they match each other across it (NCC as registered)."""
    adjacent = np.array([0.9, 0.92, 0.5, 0.55, 0.91, 0.9])  # NCC(i, i+1): section 3 is wrong
    across = np.array([0.85, 0.86, 0.8, 0.84, 0.86])  # NCC(i, i+2)
    values = np.full(7, np.nan)
    values[1:-1] = misfit(adjacent[:-1], adjacent[1:], across)
    names = [f"{i:03d}" for i in range(7)]
    flags = flag_sections(names, np.full(7, 0.2), misfits=values)
    assert np.nanmax(np.delete(values, 3)) < 0 < values[3]
    assert list(flags) == ["003"] and "neighbours match each other better" in flags["003"]


def test_the_sections_whose_pairs_fit_better_mirrored_are_named_by_parity():
    """A pair fits better mirrored exactly when one of its sections is mirrored: two mirrored
    sections two apart (4 and 6) share a k-2 pair that fits as mounted, which a count of each
    section's own pairs misses (6 has 2 of its 4); one false report elsewhere is outvoted."""
    mirrored = {4, 6}
    pairs = [(i - k, i, 0.2 if (i in mirrored) != (i - k in mirrored) else -0.2) for i in range(1, 10) for k in (1, 2)
             if i - k >= 0]
    pairs = [(f, m, 0.15 if (f, m) == (1, 3) else e) for f, m, e in pairs]  # one false report elsewhere
    assert mirrored_sections(10, pairs) == [4, 6]
    assert mirrored_sections(10, [(f, m, -abs(e)) for f, m, e in pairs]) == []
    # a section at the end of the stack has two pairs: weak evidence names it only when both agree
    assert mirrored_sections(4, [(0, 1, -0.3), (1, 2, -0.3), (0, 2, -0.3), (2, 3, 0.3), (1, 3, 0.3)]) == [3]
    assert mirrored_sections(4, [(0, 1, -0.3), (1, 2, -0.3), (0, 2, -0.3), (2, 3, 0.3), (1, 3, -0.1)]) == []


def test_the_hypotheses_consistent_around_the_triangles_are_chosen():
    """Each pair offers several refined hypotheses, the registration's own result first. Where
    that result is half a turn off (it scored best alone: a near-symmetric outline) or some
    degrees off (a local maximum), the right alternative is chosen, because the result disagrees
    with its neighbours' pairs around the triangles; elsewhere the result itself is kept."""
    count = 12
    truth, reference = true_poses(count, seed=7)
    rng = np.random.default_rng(8)
    half_turn = rigid_matrix(np.pi, 0.5, -0.5, CENTER)
    half_first, off_first = {(8, 9), (7, 9), (3, 5)}, {(2, 3), (5, 6)}
    candidates, wanted = {}, {}
    for pair in pairs_of(truth):
        key = (pair.fixed, pair.moving)
        right = (rigid_matrix(np.deg2rad(rng.normal(0, 0.2)), *rng.normal(0, 0.1, 2), CENTER) @ pair.matrix, 0.3)
        wrong = (half_turn @ pair.matrix, 0.4)
        # a local maximum some degrees off, each pair its own (a wrong turn shared by all the pairs
        # into one section would be that section's pose: nothing around the triangles tells it)
        off = (rigid_matrix(np.deg2rad(rng.choice([-1, 1]) * rng.uniform(5, 15)), 1, 0, CENTER) @ pair.matrix, 0.35)
        candidates[key] = [wrong, off, right] if key in half_first else [off, right, wrong] if key in off_first else \
            [right, wrong, off]
        wanted[key] = next(k for k, c in enumerate(candidates[key]) if c is right)
    chosen = choose_hypotheses(count, candidates, CENTER, RADIUS)
    assert chosen == wanted
    graph = [Pair(f, m, candidates[(f, m)][chosen[(f, m)]][0]) for f, m in candidates]
    solution = solve_poses(count, graph, reference, CENTER, RADIUS)
    own = solve_poses(count, [Pair(f, m, c[0][0]) for (f, m), c in candidates.items()], reference, CENTER, RADIUS)
    print(f"hypotheses chosen by triangles: worst section {worst_error(solution.poses, truth):.2f} px; the "
          f"registrations' own results: {worst_error(own.poses, truth):.2f} px")
    assert worst_error(solution.poses, truth) < 0.5 < 5 < worst_error(own.poses, truth)


def test_rotation_only_pairs_turn_a_poorly_registered_end_section_but_do_not_move_it():
    """As at the hard sample's pole: the first section's k-1 registration is turned 3 degrees (its
    smaller outline fitted rigidly into its neighbour's), its k-2 one failed (20 degrees off,
    outvoted), so nothing corrects the first. A second, rotation-only measurement of every pair
    (the align stage's similarity fits: right in their turn, their shift 0.3 px off) outvotes the
    turned registration (two fits against one registration: the solve lands at a third of its
    turn, as on the hard sample: 3.1 -> 0.7 degrees), and their shift moves no section."""
    truth, reference = true_poses(10, seed=2)
    errors = {(0, 1): rigid_matrix(np.deg2rad(3.0), 0, 0, CENTER), (0, 2): rigid_matrix(np.deg2rad(20.0), 0, 0, CENTER)}
    pairs = pairs_of(truth, lambda f, m: errors.get((f, m), np.eye(3)))
    shifted = rigid_matrix(0, 0.3, 0, CENTER)
    fits = [Pair(p.fixed, p.moving, shifted @ relative(truth, p.fixed, p.moving), rotation_only=True) for p in pairs]

    def first_turn(solution):
        delta = solution.poses[1] @ np.linalg.inv(solution.poses[0]) @ np.linalg.inv(relative(truth, 0, 1))
        return float(np.rad2deg(np.arctan2(delta[1, 0], delta[0, 0])))

    alone = solve_poses(10, pairs, reference, CENTER, RADIUS)
    both = solve_poses(10, pairs + fits, reference, CENTER, RADIUS)
    print(f"first pair's turn: {first_turn(alone):+.2f} deg off from the registrations alone, "
          f"{first_turn(both):+.2f} with the rotation-only fits; the others off by "
          f"{worst_error(both.poses[1:], truth[1:]):.3f} px (without {worst_error(alone.poses[1:], truth[1:]):.3f})")
    assert abs(first_turn(alone)) > 2.5 and abs(first_turn(both)) < abs(first_turn(alone)) / 2
    assert worst_error(both.poses[1:], truth[1:]) < 0.1  # as whole pairs they would move them by 0.36 px
    assert len(both.pair_residual) == len(pairs) + len(fits)
