"""mask / clean / histogram / align / create_metrics as stages, on the sample brain.

The tiny sample (6 sections) runs the whole chain on SQLite and MariaDB and checks files, rows,
reruns and bad input; the small sample (40 sections, slow) measures accuracy against the truth
sample.py saved: mask Dice, and registration error in thumbnail pixels.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi
from sqlalchemy import select

from db.models import AlignmentMetric, ElastixTransformation, FileLog, PipelineRun, ScanRun
from db.queries import files_of_run, ordered_sections, section_key_of
from db.session import init_db, session_scope
from pipeline.create_pipeline import main
from pipeline.imaging.downsample import downsample_area
from pipeline.imaging.mask import dice, mask_from_overlay
from pipeline.imaging.orient import tissue_box
from pipeline.imaging.transforms import canvas_center, compose_to_reference, rigid_matrix, rigid_parameters
from pipeline.layout import THUMBNAIL_FACTOR, AnimalLayout
from pipeline.sample import SampleTruth, build_sample
from tests.helpers_db import record_outputs
from tests.helpers_truth import truth_canvas_matrices, truth_keys

pytestmark = pytest.mark.filterwarnings("ignore:builtin type [Ss]wig")  # ITK's SWIG wrappers


def cli(root: Path, db_url: str, task: str, *extra: str, animal: str = "DEMO") -> int:
    return main(["--animal", animal, "--task", task, "--data-root", str(root), "--db-url", db_url, "--workers", "2", *extra])


def last_run(db_url: str, stage: str | None = None) -> PipelineRun:
    with session_scope(init_db(db_url)) as s:
        query = select(PipelineRun).order_by(PipelineRun.id.desc())
        if stage:
            query = query.where(PipelineRun.stage == stage)
        return s.scalars(query).first()


def made_by_last_run(db_url: str, root: Path) -> set[str]:
    """Paths (relative to the animal) written by the newest run."""
    run = last_run(db_url)
    with session_scope(init_db(db_url)) as s:
        return {row.path.split("/", 1)[1] for row in files_of_run(s, run.id)}


def keys(db_url: str, animal: str = "DEMO") -> list[str]:
    """The section keys (file names) of the active stack, in its order now."""
    with session_scope(init_db(db_url)) as s:
        return [section_key_of(r) for r in ordered_sections(s, animal, 1)]


def copy_sample(sample: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(sample / "DEMO", root / "DEMO")
    return root


def aligned_copy(sample: Path, tmp_path: Path, db_url: str) -> tuple[Path, AnimalLayout, list[str]]:
    """A copy of the sample taken through extract, mask, clean and align (thumbnails), and the
    section keys in stack order."""
    root = copy_sample(sample, tmp_path)
    for task in ("extract", "mask", "clean", "align"):
        assert cli(root, db_url, task) == 0, task
    names = keys(db_url)
    assert len(names) == SampleTruth.load(root, "DEMO").section_count
    return root, AnimalLayout(root, "DEMO"), names


@pytest.fixture(scope="module")
def tiny_sample(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    build_sample(root, animal="DEMO", seed=0, size="tiny")
    return root


def read(path: Path) -> np.ndarray:
    return tifffile.imread(path)


# --------------------------------------------------------------------------------------------
def test_chain_on_the_tiny_sample(tiny_sample, tmp_path, db_url):
    root = copy_sample(tiny_sample, tmp_path)
    layout = AnimalLayout(root, "DEMO")
    assert cli(root, db_url, "extract") == 0
    count = SampleTruth.load(root, "DEMO").section_count
    n = keys(db_url)
    # quarter turn + horizontal mirror, set on the scan run by flags of any task
    assert cli(root, db_url, "mask", "--scan-rotation", "1", "--flop", "true") == 0
    assert cli(root, db_url, "clean") == 0
    engine = init_db(db_url)
    with session_scope(engine) as s:
        scan_run = s.scalars(select(ScanRun)).one()
        sections = ordered_sections(s, "DEMO", 1)
        stems = [(Path(r.slide.file_name).stem, r.scene_index) for r in sections]
    canvas = read(layout.cleaned(1, True, n[0])).shape
    assert (scan_run.height, scan_run.width) == (canvas[0] * THUMBNAIL_FACTOR, canvas[1] * THUMBNAIL_FACTOR)
    # the cleaned section is the masked tissue box turned 90 degrees ccw, mirrored left-right, centred
    thumb = read(layout.extracted_thumbnail(*stems[2], 1))
    mask = read(layout.mask(n[2])) > 0
    y0, y1, x0, x1 = tissue_box(mask)
    expected = np.fliplr(np.rot90(np.where(mask, thumb, 0)[y0:y1, x0:x1]))
    cleaned = read(layout.cleaned(1, True, n[2]))
    oy, ox = (canvas[0] - expected.shape[0]) // 2, (canvas[1] - expected.shape[1]) // 2
    assert np.array_equal(cleaned[oy:oy + expected.shape[0], ox:ox + expected.shape[1]], expected)
    assert cleaned.sum() == expected.sum()

    assert cli(root, db_url, "histogram") == 0
    combined = np.load(layout.histogram_data(1, True))["counts"]
    parts = sum(np.load(layout.histogram_data(1, True, name))["counts"] for name in n)
    assert np.array_equal(combined, parts) and combined.sum() == sum((read(layout.mask(name)) > 0).sum() for name in n)
    assert layout.histogram_png(1, True).stat().st_size > 0

    assert cli(root, db_url, "align") == 0
    align_run = last_run(db_url, "align")
    assert "EulerTransform" in json.loads(align_run.params)["registration_settings"]["rigid.txt"]
    with session_scope(engine) as s:
        rows = s.scalars(select(ElastixTransformation).order_by(ElastixTransformation.section)).all()
        # one row per registered pair: each section onto its previous one (k-1) and the one before (k-2)
        position = {r.id: p for p, r in enumerate(sections)}
        k1 = [r for r in rows if position[r.FK_section_id] - position[r.FK_fixed_section_id] == 1]
        k2 = [r for r in rows if position[r.FK_section_id] - position[r.FK_fixed_section_id] == 2]
        assert len(rows) == len(k1) + len(k2) == (count - 1) + (count - 2)
        assert [r.section for r in k1] == [f"{p:03d}" for p in range(1, count)]
        assert [r.FK_section_id for r in k1] == [r.id for r in sections[1:]]
        assert [r.FK_fixed_section_id for r in k1] == [r.id for r in sections[:-1]]
        assert [r.FK_fixed_section_id for r in k2] == [r.id for r in sections[:-2]]
        assert all(not r.manual and r.metric is not None and r.iteration > 0 and r.FK_pipeline_run_id == align_run.id for r in rows)
    aligned = [read(layout.aligned(1, True, name)) for name in n]
    assert all(a.shape == canvas and a.any() for a in aligned)

    assert cli(root, db_url, "create_metrics") == 0
    with session_scope(engine) as s:
        metrics = s.scalars(select(AlignmentMetric).order_by(AlignmentMetric.section)).all()
    assert [m.section for m in metrics] == [f"{p:03d}" for p in range(1, count)]
    assert all(-1 <= m.ncc <= 1 and m.mutual_information > 0 and 0 < m.overlap_fraction <= 1 for m in metrics)
    assert layout.metrics_png(1, True).stat().st_size > 0

    # channel 2 reuses channel 1's masks and transforms: no registration runs again
    assert cli(root, db_url, "clean", "--channel", "2") == 0
    assert cli(root, db_url, "align", "--channel", "2") == 0
    assert made_by_last_run(db_url, root) == {f"preps/CH2/thumbnail_aligned/{name}.tif" for name in n}
    assert all(read(layout.aligned(2, True, name)).any() for name in n)

    # a rerun does nothing
    assert cli(root, db_url, "align") == 0
    assert last_run(db_url).tasks_run == 0

    # a manual transform of the last section onto its previous one: held exactly (a hard constraint
    # of the pose solve, replacing the section's own registrations); every other pose is re-solved
    # without them, and exactly the sections whose composed transform changed are re-warped
    target = count - 1
    before = {p: layout.aligned(1, True, n[p]).stat().st_mtime_ns for p in range(count)}
    composed_before = {p: layout.section_transform(n[p]).read_text() for p in range(count)}
    assert cli(root, db_url, "align", "--section", str(target), "--rotation", "2", "--xshift", "1.5", "--yshift", "-1") == 0
    changed = {p for p in range(count) if layout.section_transform(n[p]).read_text() != composed_before[p]}
    assert target in changed and count // 2 not in changed  # the reference stays the identity
    # (and the first pose solve, and the similarity fits whose start it moved by more than START_STEP)
    made = {m for m in made_by_last_run(db_url, root)
            if m != "preps/transforms/first_pass.json" and not m.startswith("preps/transforms/similarity")}
    assert made == {f"preps/transforms/composed/{name}.json" for name in n} | {
        f"preps/CH1/thumbnail_aligned/{n[p]}.tif" for p in changed}
    assert {p for p in range(count) if layout.aligned(1, True, n[p]).stat().st_mtime_ns != before[p]} == changed
    composed = {p: json.loads(layout.section_transform(n[p]).read_text()) for p in (target - 1, target)}
    assert composed[target]["pairwise_source"] == "manual"
    manual = rigid_matrix(np.deg2rad(2), 1.5, -1, canvas_center(canvas))
    assert np.allclose(np.array(composed[target]["matrix"]), manual @ np.array(composed[target - 1]["matrix"]))
    with session_scope(engine) as s:
        manual_rows = s.scalars(select(ElastixTransformation).where(ElastixTransformation.manual.is_(True))).all()
    assert len(manual_rows) == 1 and manual_rows[0].section == f"{target:03d}" and manual_rows[0].active
    assert manual_rows[0].rotation == pytest.approx(np.deg2rad(2))
    assert cli(root, db_url, "align", "--section", n[target], "--clear-manual") == 0  # by name, too
    assert json.loads(layout.section_transform(n[target]).read_text())["pairwise_source"] != "manual"
    # back to exactly the computed poses
    assert {p: layout.section_transform(n[p]).read_text() for p in range(count)} == composed_before
    assert made_by_last_run(db_url, root) & {f"preps/CH1/thumbnail_aligned/{name}.tif" for name in n} == {
        f"preps/CH1/thumbnail_aligned/{n[p]}.tif" for p in changed}


def test_edited_overlay_reruns_exactly_the_affected_sections(tiny_sample, tmp_path, sqlite_url):
    root, layout, n = aligned_copy(tiny_sample, tmp_path, sqlite_url)
    count = len(n)
    edited = 1
    overlay_path = layout.mask(n[edited], True, "colored")
    overlay = read(overlay_path)
    auto = read(layout.mask(n[edited])) > 0
    assert np.array_equal(mask_from_overlay(overlay), auto)
    # the user erases the left third of the tissue (paints it grey) in a paint program
    y0, y1, x0, x1 = tissue_box(auto)
    cut = x0 + (x1 - x0) // 3
    overlay[:, :cut] = 128
    tifffile.imwrite(overlay_path, overlay, photometric="rgb")
    aligned_before = {p: layout.aligned(1, True, n[p]).stat().st_mtime_ns for p in range(count)}
    composed_before = {p: layout.section_transform(n[p]).read_text() for p in range(count)}

    assert cli(root, sqlite_url, "mask") == 0
    assert made_by_last_run(sqlite_url, root) == {f"preps/masks/CH1/thumbnail_masked/{n[edited]}.tif"}
    new_mask = read(layout.mask(n[edited])) > 0
    assert np.array_equal(new_mask, auto & (np.arange(auto.shape[1]) >= cut)[None, :])
    with session_scope(init_db(sqlite_url)) as s:
        row = s.scalars(select(FileLog).where(FileLog.path.endswith(f"thumbnail_masked/{n[edited]}.tif"))
                        .order_by(FileLog.id.desc())).first()
        result = json.loads(row.result)
        assert result["source"] == "edited overlay" and result["pixels_changed_by_edit"] == int((auto & ~new_mask).sum())
        assert any(i.path.endswith(f"thumbnail_colored/{n[edited]}.tif") and i.kind == "external" for i in row.inputs)
    assert cli(root, sqlite_url, "mask") == 0  # the edit is kept, nothing recomputed
    assert last_run(sqlite_url).tasks_run == 0 and np.array_equal(read(layout.mask(n[edited])) > 0, new_mask)

    # Until clean and align ran again, what was made from the old mask is out of date, even two
    # stages down: the aligned stack is not published (and every section's transform depends on it).
    assert cli(root, sqlite_url, "neuroglancer") == 1
    error = last_run(sqlite_url).error
    assert f"{count} of {count} aligned sections cannot be published" in error
    assert f"{layout.mask(n[edited])} changed after clean read it (run --task clean again" in error
    assert not layout.precomputed_layer(1, True).exists()

    assert cli(root, sqlite_url, "clean") == 0
    assert made_by_last_run(sqlite_url, root) == {f"preps/CH1/thumbnail_cleaned/{n[edited]}.tif",
                                                  f"www/section/CH1_thumbnail/{n[edited]}.png"}
    assert cli(root, sqlite_url, "align") == 0
    made = made_by_last_run(sqlite_url, root)
    pairs = {p for p in range(count) if f"preps/transforms/pairwise/{n[p]}.json" in made}
    assert pairs == {edited, edited + 1}  # the k-1 registrations that involve the edited section
    pairs2 = {p for p in range(count) if f"preps/transforms/pairwise_k2/{n[p]}.json" in made}
    assert pairs2 == {edited + 2}  # and the k-2 ones (section 1 has no k-2 pair)
    # the poses are solved together: exactly the sections whose composed transform changed are re-warped
    changed = {p for p in range(count) if layout.section_transform(n[p]).read_text() != composed_before[p]}
    rewarped = {p for p in range(count) if layout.aligned(1, True, n[p]).stat().st_mtime_ns != aligned_before[p]}
    assert edited in rewarped and rewarped == changed | {edited}


def test_bad_sections_fail_alone_and_are_never_black(tiny_sample, tmp_path, sqlite_url, caplog):
    root = copy_sample(tiny_sample, tmp_path)
    layout = AnimalLayout(root, "DEMO")
    assert cli(root, sqlite_url, "extract") == 0
    count = SampleTruth.load(root, "DEMO").section_count
    n = keys(sqlite_url)
    with session_scope(init_db(sqlite_url)) as s:
        rows = ordered_sections(s, "DEMO", 1)
        thumbs = [layout.extracted_thumbnail(Path(r.slide.file_name).stem, r.scene_index, 1) for r in rows]
    # section 2: a scene with no tissue (background and noise only)
    empty = read(thumbs[2])
    background = np.random.default_rng(0).normal(np.median(empty), 3, empty.shape)
    tifffile.imwrite(thumbs[2], background.astype(empty.dtype))
    # section 4: a section of another size (the scene was cropped larger)
    bigger = np.pad(read(thumbs[4]), 9, mode="edge")
    tifffile.imwrite(thumbs[4], bigger)
    record_outputs(sqlite_url, root, [thumbs[2], thumbs[4]], stage="extract")  # as if extract had made them
    # an overlay named by position, left by an older slidepipe: said, never silently ignored
    legacy = layout.masks_dir("colored", True) / "003.tif"
    legacy.parent.mkdir(parents=True)
    tifffile.imwrite(legacy, np.zeros((4, 4, 3), np.uint8), photometric="rgb")

    with caplog.at_level("WARNING", logger="slidepipe"):
        assert cli(root, sqlite_url, "mask") == 1
    assert any("named by position (003.tif)" in r.getMessage() for r in caplog.records)
    run = last_run(sqlite_url)
    assert run.status == "failed" and run.tasks_failed == 1
    assert f"{thumbs[2]}: no tissue found" in run.error
    assert not layout.mask(n[2]).exists() and layout.mask(n[2], True, "colored").exists()  # overlay left for painting
    assert all(layout.mask(name).exists() for p, name in enumerate(n) if p != 2)

    assert cli(root, sqlite_url, "clean") == 1
    assert f"section {n[2]} (position 002): the mask is missing: run --task mask" in last_run(sqlite_url).error
    cleaned = {p: read(layout.cleaned(1, True, name)) for p, name in enumerate(n) if p != 2}
    assert not layout.cleaned(1, True, n[2]).exists()
    assert len({c.shape for c in cleaned.values()}) == 1  # one canvas for the larger section too
    mask4 = read(layout.mask(n[4])) > 0
    assert cleaned[4].sum() == np.where(mask4, bigger, 0).sum()  # nothing of it cropped away

    assert cli(root, sqlite_url, "align") == 1
    error = last_run(sqlite_url).error
    assert f"section {n[2]} (position 002): the cleaned channel-1 thumbnail is missing" in error
    assert json.loads(layout.pairwise_transform(n[3]).read_text())["fixed"] == n[1]  # bridged over the gap
    assert not layout.aligned(1, True, n[2]).exists()
    assert all(read(layout.aligned(1, True, name)).any() for p, name in enumerate(n) if p != 2)

    # a canvas fixed too small by the user: the sections that do not fit fail, none is cropped
    with session_scope(init_db(sqlite_url)) as s:
        scan_run = s.scalars(select(ScanRun)).one()
        scan_run.width = scan_run.width // 2
    assert cli(root, sqlite_url, "clean") == 1
    assert "larger than the canvas" in last_run(sqlite_url).error


# --------------------------------------------------------------------------------------------
# accuracy on the small sample (40 sections) against the saved truth
@pytest.fixture(scope="module")
def small_processed(tmp_path_factory, small_sample):
    root = tmp_path_factory.mktemp("small")
    db_url = f"sqlite:///{root / 'slidepipe.db'}"
    shutil.copytree(small_sample.data_root / "DEMO", root / "DEMO")  # build_sample(root, "DEMO", seed=0, size="small")
    for task in ("extract", "mask", "clean", "align"):
        assert cli(root, db_url, task) == 0, task
    return root, db_url


@pytest.mark.slow
def test_masks_match_the_true_footprints(small_processed):
    root, _ = small_processed
    truth = SampleTruth.load(root, "DEMO")
    layout = AnimalLayout(root, "DEMO")
    scores, debris_hits, debris_total = [], 0, 0
    for s in truth.sections:
        mask = read(layout.mask(truth_keys(truth)[s.position])) > 0
        footprint = truth.footprint(s.position, thumbnail=True)
        scores.append(dice(mask, footprint))
        near_tissue = ndi.binary_dilation(footprint, iterations=2)
        for speck in s.debris:
            x = int(round((speck["x"] - 15.5) / THUMBNAIL_FACTOR))
            y = int(round((speck["y"] - 15.5) / THUMBNAIL_FACTOR))
            if 0 <= y < mask.shape[0] and 0 <= x < mask.shape[1] and not near_tissue[y, x]:
                debris_total += 1
                debris_hits += int(mask[y, x])
    print(f"mask Dice vs true footprint: min {min(scores):.4f}, mean {np.mean(scores):.4f}; "
          f"debris specks inside a mask: {debris_hits} of {debris_total}")
    assert min(scores) >= 0.95
    assert debris_total > 20 and debris_hits == 0


@pytest.mark.slow
def test_registration_recovers_the_true_relative_transforms(small_processed):
    root, _ = small_processed
    layout = AnimalLayout(root, "DEMO")
    truth = truth_canvas_matrices(root)
    n = truth_keys(SampleTruth.load(root, "DEMO"))
    canvas = read(layout.cleaned(1, True, n[0])).shape
    center = canvas_center(canvas)
    errors, rotation_errors = [], []
    for i in range(1, len(truth)):
        true = truth[i] @ np.linalg.inv(truth[i - 1])
        found = json.loads(layout.pairwise_transform(n[i]).read_text())
        matrix = rigid_matrix(found["rotation"], found["xshift"], found["yshift"], center)
        yy, xx = np.nonzero(read(layout.cleaned(1, True, n[i - 1])))
        points = np.stack([xx, yy, np.ones_like(xx)]).astype(float)
        errors.append(np.sqrt(((matrix @ points - true @ points)[:2] ** 2).sum(axis=0).mean()))
        rotation_errors.append(np.rad2deg(found["rotation"] - rigid_parameters(true, center)[0]))
    errors = np.array(errors)
    rms = float(np.sqrt((errors**2).mean()))
    print(f"pairwise registration vs truth over {errors.size} pairs ({found['backend']}): translation RMS "
          f"{rms:.3f} thumbnail px (worst pair {errors.max():.3f}), rotation error RMS "
          f"{np.sqrt(np.mean(np.square(rotation_errors))):.3f} deg (worst {np.max(np.abs(rotation_errors)):.3f})")
    assert rms <= 0.5
    # composed onto the middle section: how far each aligned section is from where it belongs, for
    # the stage's pose solve (k-1 and k-2 pairs, centroid anchors) and for chaining the k-1 pairs
    reference = len(truth) // 2
    k1 = [json.loads(layout.pairwise_transform(n[i]).read_text()) for i in range(1, len(truth))]
    chained = compose_to_reference([None] + [rigid_matrix(d["rotation"], d["xshift"], d["yshift"], center) for d in k1],
                                   reference)
    errors = {"pose solve": [], "chained": []}
    for i in range(len(truth)):
        composed = np.array(json.loads(layout.section_transform(n[i]).read_text())["matrix"])
        true = truth[i] @ np.linalg.inv(truth[reference])
        yy, xx = np.nonzero(read(layout.aligned(1, True, n[i])))
        points = np.stack([xx, yy, np.ones_like(xx)]).astype(float)
        for method, matrix in (("pose solve", composed), ("chained", chained[i])):
            errors[method].append(np.sqrt(((matrix @ points - true @ points)[:2] ** 2).sum(axis=0).mean()))
    rms = {k: float(np.sqrt(np.mean(np.square(v)))) for k, v in errors.items()}
    print(f"aligned onto section {reference:03d} vs truth: stage (pose solve) RMS {rms['pose solve']:.3f} px, worst "
          f"{max(errors['pose solve']):.3f} px; chaining the same k-1 pairs RMS {rms['chained']:.3f} px, worst "
          f"{max(errors['chained']):.3f} px")
    assert rms["pose solve"] <= 0.5  # issue 10: no worse than before on the standard sample
    assert rms["pose solve"] < rms["chained"]


@pytest.mark.slow
def test_a_corrupted_section_is_flagged_and_does_not_move_its_neighbours(small_processed, tmp_path, capsys, caplog):
    """Issue 10: one section's cleaned thumbnail holds the wrong tissue (another section's, mirrored
    and shifted). Through the command line: align names it (summary line with the manual override
    command, pipeline_run.summary) and the other sections' poses stay where they were."""
    base_root, base_db = small_processed
    root = tmp_path / "copy"
    shutil.copytree(base_root, root)
    db_url = f"sqlite:///{root / 'slidepipe.db'}"
    layout, base = AnimalLayout(root, "DEMO"), AnimalLayout(base_root, "DEMO")
    n = keys(db_url)
    assert json.loads(last_run(base_db, "align").summary)["alignment_qc"]["flagged"] == {}
    bad, donor = 10, 30  # the reference is section 20
    wrong = np.roll(np.fliplr(read(layout.cleaned(1, True, n[donor]))), (3, -4), axis=(0, 1))
    tifffile.imwrite(layout.cleaned(1, True, n[bad]), wrong)
    record_outputs(db_url, root, [layout.cleaned(1, True, n[bad])], stage="clean")
    capsys.readouterr()
    assert cli(root, db_url, "align") == 0
    err = capsys.readouterr().err
    qc = json.loads(last_run(db_url, "align").summary)["alignment_qc"]
    assert list(qc["flagged"]) == [n[bad]], qc["flagged"]
    command = f"create_pipeline --animal DEMO --task align --section {n[bad]} --rotation "
    assert qc["commands"][n[bad]].startswith(command)
    assert f"look at 1 section(s): {n[bad]}; " in err and command in err, err
    canvas = read(layout.cleaned(1, True, n[0])).shape
    moved = {}
    for i, name in enumerate(n):
        if i == bad:
            continue
        before = np.array(json.loads(base.section_transform(name).read_text())["matrix"])
        after = np.array(json.loads(layout.section_transform(name).read_text())["matrix"])
        yy, xx = np.nonzero(read(base.aligned(1, True, name)))
        points = np.stack([xx, yy, np.ones_like(xx)]).astype(float)
        moved[i] = float(np.sqrt(((after @ points - before @ points)[:2] ** 2).sum(axis=0).mean()))
    others = [v for k, v in qc["misfit_ncc"].items() if k != n[bad] and v is not None]
    print(f"corrupted section {bad}: disagreement {qc['disagreement_px'][n[bad]]:.2f} px (median of the others "
          f"{np.median([v for k, v in qc['disagreement_px'].items() if k != n[bad]]):.2f}), misfit NCC "
          f"{qc['misfit_ncc'][n[bad]]:+.2f} (others {min(others):+.2f} .. {max(others):+.2f}); the other sections moved by "
          f"at most {max(moved.values()):.3f} px (its neighbours: "
          + ", ".join(f"{i}: {moved[i]:.3f}" for i in (bad - 2, bad - 1, bad + 1, bad + 2)) + f"), canvas {canvas}")
    assert max(moved.values()) < 1.0
    # the metrics plot and the alignment page mark it too
    assert cli(root, db_url, "create_metrics") == 0
    with session_scope(init_db(db_url)) as s:
        plot = s.scalars(select(FileLog).where(FileLog.path == layout.relative(layout.metrics_png(1, True)))
                         .order_by(FileLog.id.desc())).first()
        assert list(json.loads(plot.result)["align_flagged"]) == [n[bad]]
    assert any(f"sections flagged by align's QC (orange on the plot): {n[bad]}: " in m for m in caplog.messages)
    assert cli(root, db_url, "web") == 0
    rows = [r for r in layout.web_page("alignment").read_text().split("<tr")[1:] if 'class="align-flag"' in r]
    assert len(rows) == 1 and rows[0].startswith(f' class="pair flagged" id="pair-{bad}"'), rows
    rotation = float(qc["commands"][n[bad]].split("--rotation ")[1].split()[0])
    fix = re.search(rf"--task align --section {n[bad]} --rotation (\S+) ", rows[0])
    assert fix and abs(float(fix[1]) - rotation) < 0.01  # starts from the transform in use (the pose solve's)


@pytest.mark.slow
def test_detect_flips_reports_a_mirrored_section_and_changes_nothing(small_processed, tmp_path, capsys, caplog):
    """Issue 10: --detect-flips names a section mounted face down (here: section 10's own cleaned
    thumbnail mirrored left-right) in a warning, the summary line and pipeline_run.summary; the
    section is never flipped: its cleaned file stays as it is and every transform stays rigid."""
    base_root, base_db = small_processed
    root = tmp_path / "copy"
    shutil.copytree(base_root, root)
    db_url = f"sqlite:///{root / 'slidepipe.db'}"
    layout = AnimalLayout(root, "DEMO")
    n = keys(db_url)
    assert "mirror_check" not in json.loads(last_run(base_db, "align").summary)  # only when asked
    bad = 10
    path = layout.cleaned(1, True, n[bad])
    tifffile.imwrite(path, np.fliplr(read(path)))
    record_outputs(db_url, root, [path], stage="clean")
    mounted = path.read_bytes()
    capsys.readouterr()
    assert cli(root, db_url, "align", "--detect-flips") == 0
    err = capsys.readouterr().err
    summary = json.loads(last_run(db_url, "align").summary)
    assert summary["mirror_check"]["looks_mirrored"] == [n[bad]]
    assert f"1 section(s) look mounted mirrored (reported, not applied): {n[bad]}" in err
    assert any(f"{n[bad]} (position 010) looks mirrored" in m for m in caplog.messages)
    assert path.read_bytes() == mounted
    for name in n:
        matrix = np.array(json.loads(layout.section_transform(name).read_text())["matrix"])
        assert np.linalg.det(matrix[:2, :2]) == pytest.approx(1.0)
    check = json.loads((layout.transforms_dir / "mirror_check.json").read_text())
    wrong = [(p["fixed"], p["moving"]) for p in check["pairs"] if p["looks_mirrored"] and n[bad] not in (p["fixed"], p["moving"])]
    print(f"mirrored section {bad}: {sum(p['looks_mirrored'] for p in check['pairs'] if n[bad] in (p['fixed'], p['moving']))} "
          f"of its 4 pairs look mirrored; other pairs that look mirrored: {wrong}")


def test_full_resolution_reuses_thumbnail_masks_and_transforms(tiny_sample, tmp_path, sqlite_url):
    root, layout, n = aligned_copy(tiny_sample, tmp_path, sqlite_url)
    count = len(n)
    full = ("--downsample", "false")
    assert cli(root, sqlite_url, "mask", *full) == 0
    with session_scope(init_db(sqlite_url)) as s:
        rows = ordered_sections(s, "DEMO", 1)
    for position, row in enumerate(rows):
        full_mask = read(layout.mask(n[position], False))
        expected = np.repeat(np.repeat(read(layout.mask(n[position])), 32, 0), 32, 1)[:row.height, :row.width]
        assert np.array_equal(full_mask, expected)  # nearest neighbour: still 0/255, no halo
    assert cli(root, sqlite_url, "clean", *full) == 0
    assert cli(root, sqlite_url, "align", *full) == 0
    made = made_by_last_run(sqlite_url, root)
    assert made == {f"preps/CH1/full_aligned/{name}.tif" for name in n}  # no registration, no compose
    for p in n:
        thumb = read(layout.aligned(1, True, p)).astype(np.float64)
        reduced = downsample_area(read(layout.aligned(1, False, p)), THUMBNAIL_FACTOR).astype(np.float64)
        assert reduced.shape == thumb.shape
        # the same place: tissue centroids agree (phase correlation is too noisy on 24 x 32 px)
        assert np.allclose(ndi.center_of_mass(thumb), ndi.center_of_mass(reduced), atol=0.05), p
        assert np.array_equal(downsample_area(read(layout.cleaned(1, False, p)), THUMBNAIL_FACTOR), read(layout.cleaned(1, True, p)))
    assert cli(root, sqlite_url, "histogram", *full) == 0
    counts = np.load(layout.histogram_data(1, False))["counts"]
    assert counts.sum() == sum(int((read(layout.mask(p, False)) > 0).sum()) for p in n)
    assert cli(root, sqlite_url, "create_metrics", *full) == 0
    assert cli(root, sqlite_url, "create_metrics") == 0
    with session_scope(init_db(sqlite_url)) as s:
        metrics = {resolution: s.scalars(select(AlignmentMetric).where(AlignmentMetric.resolution == resolution)
                                         .order_by(AlignmentMetric.section)).all() for resolution in ("full", "thumbnail")}
        overlap = {resolution: [m.overlap_fraction for m in rows] for resolution, rows in metrics.items()}
    # The full-resolution stack is the thumbnail stack's transforms scaled up: neighbours overlap
    # alike at both resolutions (the tiny sample's 24 x 32 px outlines are too coarse to ask more
    # of the alignment itself; its accuracy is measured on the standard sample).
    assert len(overlap["full"]) == count - 1 and all(f > 0.75 for f in overlap["full"]), overlap
    assert np.allclose(overlap["full"], overlap["thumbnail"], atol=0.05), overlap
    # the window-by-window measurement equals one pass over the whole images
    from pipeline.imaging.metrics import PairAccumulator, overlap_range

    last = metrics["full"][-1]
    whole = PairAccumulator(*overlap_range(read(layout.aligned(1, True, n[-2])), read(layout.aligned(1, True, n[-1]))))
    whole.add(read(layout.aligned(1, False, n[-2])), read(layout.aligned(1, False, n[-1])))
    expected = whole.result()
    assert last.ncc == pytest.approx(expected["ncc"], abs=1e-9)
    assert last.mutual_information == pytest.approx(expected["mutual_information"], abs=1e-9)


def test_an_overlay_a_killed_run_renamed_but_did_not_record_is_no_hand_edit(tiny_sample, tmp_path, sqlite_url):
    """A mask run SIGKILLed between an overlay's rename and its record leaves the automatic overlay
    on disk with no file_log row. The rerun must make and record it as an uninterrupted run does,
    not read the mask from it as from a hand edit (found by the queue kill test)."""
    root = copy_sample(tiny_sample, tmp_path)
    for task in ("extract", "mask"):
        assert cli(root, sqlite_url, task) == 0, task
    layout, n = AnimalLayout(root, "DEMO"), keys(sqlite_url)
    overlay = layout.mask(n[1], True, "colored")
    with session_scope(init_db(sqlite_url)) as s:
        for row in s.scalars(select(FileLog).where(FileLog.path == layout.relative(overlay))):
            s.delete(row)
    assert cli(root, sqlite_url, "mask") == 0
    assert made_by_last_run(sqlite_url, root) == {f"preps/masks/CH1/thumbnail_masked/{n[1]}.tif",
                                                  f"preps/masks/CH1/thumbnail_colored/{n[1]}.tif"}
    with session_scope(init_db(sqlite_url)) as s:
        assert {r.task_key for r in s.scalars(select(FileLog).where(FileLog.path == layout.relative(overlay)))} == {
            f"auto:{n[1]}"}
