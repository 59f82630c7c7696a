"""Sections are files by their stable key (<slide>_S<scene>), not by their position: an edit
stays with its tissue when the user deactivates or reorders sections, and one bad section fails
alone, by name, with the SQL that takes it out of the stack. Through the real command line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from sqlalchemy import select, text

from db.models import ElastixTransformation, FileLog, PipelineRun
from db.queries import ordered_sections, section_key_of
from db.session import init_db, session_scope
from pipeline.create_pipeline import main
from pipeline.imaging.mask import mask_from_overlay
from pipeline.imaging.orient import tissue_box
from pipeline.layout import AnimalLayout
from pipeline.sample import build_sample
from tests.helpers_czi import corrupt_scene

pytestmark = pytest.mark.filterwarnings("ignore:builtin type [Ss]wig")  # ITK's SWIG wrappers

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_sample(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    build_sample(root, animal="DEMO", seed=0, size="tiny")
    return root


def copy_sample(sample: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(sample / "DEMO", root / "DEMO")
    return root


def run_cli(root: Path, db_url: str, task: str, *extra: str) -> subprocess.CompletedProcess:
    """`python -m pipeline ...` as a user types it, in a process of its own."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "pipeline", "--animal", "DEMO", "--task", task, "--data-root", str(root),
                           "--db-url", db_url, "--workers", "2", *extra],
                          capture_output=True, text=True, env=env, timeout=600)


def cli(root: Path, db_url: str, task: str, *extra: str) -> int:
    return main(["--animal", "DEMO", "--task", task, "--data-root", str(root), "--db-url", db_url, "--workers", "2", *extra])


def last_run(db_url: str) -> PipelineRun:
    with session_scope(init_db(db_url)) as s:
        run = s.scalars(select(PipelineRun).order_by(PipelineRun.id.desc())).first()
        s.expunge(run)
        return run


def stack(db_url: str) -> list[tuple[str, int, int, int]]:
    """(key, channel-1 row id, slide id, scene index) of the active sections, in the DB's order now."""
    with session_scope(init_db(db_url)) as s:
        return [(section_key_of(r), r.id, r.FK_slide_id, r.scene_index) for r in ordered_sections(s, "DEMO", 1)]


def sql(db_url: str, statement: str) -> None:
    with init_db(db_url).begin() as conn:
        conn.execute(text(statement))


def read(path: Path) -> np.ndarray:
    return tifffile.imread(path)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def composed_order(layout: AnimalLayout, db_url: str, name: str) -> list[str]:
    with session_scope(init_db(db_url)) as s:
        row = s.scalars(select(FileLog).where(FileLog.path == layout.relative(layout.section_transform(name)))
                        .order_by(FileLog.id.desc())).first()
        return json.loads(row.result)["order"]


# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_hand_edited_mask_stays_with_its_section_when_sections_are_deactivated_or_reordered(
        tiny_sample, tmp_path, sqlite_url):
    root = copy_sample(tiny_sample, tmp_path)
    layout = AnimalLayout(root, "DEMO")
    for task in ("extract", "mask"):
        done = run_cli(root, sqlite_url, task)
        assert done.returncode == 0, done.stderr
    sections = stack(sqlite_url)
    names = [s[0] for s in sections]
    assert names == ["DEMO_slide01_S1", "DEMO_slide01_S2", "DEMO_slide01_S3",
                     "DEMO_slide02_S1", "DEMO_slide02_S2", "DEMO_slide02_S3"]
    auto = {n: layout.mask(n).read_bytes() for n in names}

    # The user erases the left third of the tissue of DEMO_slide02_S1 (position 3) in a paint program ...
    edited = names[3]
    overlay_path = layout.mask(edited, True, "colored")
    overlay = read(overlay_path)
    y0, y1, x0, x1 = tissue_box(read(layout.mask(edited)) > 0)
    overlay[:, : x0 + (x1 - x0) // 3] = 128
    tifffile.imwrite(overlay_path, overlay, photometric="rgb")
    edit = mask_from_overlay(overlay)
    assert not np.array_equal(edit, read(layout.mask(edited)) > 0)
    # ... and takes an earlier section out of the stack, the documented way.
    dropped = sections[1]
    sql(sqlite_url, f"UPDATE slide_czi_to_tif SET active = 0 WHERE FK_slide_id = {dropped[2]} AND scene_index = {dropped[3]}")
    active = [n for n in names if n != dropped[0]]
    assert [s[0] for s in stack(sqlite_url)] == active

    done = run_cli(root, sqlite_url, "mask")
    assert done.returncode == 0, done.stderr
    run = last_run(sqlite_url)
    assert (run.status, run.tasks_run, run.tasks_failed) == ("success", 1, 0)
    assert np.array_equal(read(layout.mask(edited)) > 0, edit), "the edit is on its own section"
    assert all(layout.mask(n).read_bytes() == auto[n] for n in names if n != edited), "no other section took it"
    with session_scope(init_db(sqlite_url)) as s:
        row = s.scalars(select(FileLog).where(FileLog.path == layout.relative(layout.mask(edited)))
                        .order_by(FileLog.id.desc())).first()
        assert json.loads(row.result)["source"] == "edited overlay"
        assert [i.path for i in row.inputs if "colored" in i.path] == [layout.relative(overlay_path)]

    for task in ("clean", "align"):
        done = run_cli(root, sqlite_url, task)
        assert done.returncode == 0, (task, done.stderr)
    thumbnail = read(layout.extracted_thumbnail("DEMO_slide02", 0, 1))
    assert read(layout.cleaned(1, True, edited)).sum() == np.where(edit, thumbnail, 0).sum(), "cleaned with the edit"
    assert not layout.cleaned(1, True, dropped[0]).exists()
    assert json.loads(layout.pairwise_transform(names[2]).read_text())["fixed"] == names[0], "bridged over the gap"
    assert composed_order(layout, sqlite_url, edited) == active

    # Reorder: the first two scenes of slide 2 swap places (scene_order of their rows).
    slide2 = sections[3][2]
    sql(sqlite_url, f"UPDATE slide_czi_to_tif SET scene_order = 3 - scene_order WHERE FK_slide_id = {slide2} "
                    f"AND scene_index IN (0, 1)")
    reordered = [names[0], names[2], names[4], names[3], names[5]]
    assert [s[0] for s in stack(sqlite_url)] == reordered
    masks_before = {n: layout.mask(n).stat().st_mtime_ns for n in active}
    done = run_cli(root, sqlite_url, "mask")
    assert done.returncode == 0 and last_run(sqlite_url).tasks_run == 0, "a mask does not depend on the order"
    assert {n: layout.mask(n).stat().st_mtime_ns for n in active} == masks_before
    assert np.array_equal(read(layout.mask(edited)) > 0, edit)

    # Publishing before align followed the new order is refused, in one line.
    done = run_cli(root, sqlite_url, "neuroglancer")
    assert done.returncode == 1
    errors = error_lines(done.stderr)
    assert len(errors) == 1 and "reordered" in errors[0] and "--task align" in errors[0], done.stderr
    assert not layout.precomputed_layer(1, True).exists()

    done = run_cli(root, sqlite_url, "align")
    assert done.returncode == 0, done.stderr
    assert composed_order(layout, sqlite_url, edited) == reordered
    fixed = {n: json.loads(layout.pairwise_transform(n).read_text())["fixed"] for n in reordered[1:]}
    assert fixed == {names[2]: names[0], names[4]: names[2], names[3]: names[4], names[5]: names[3]}
    ids = {s[0]: s[1] for s in stack(sqlite_url)}
    with session_scope(init_db(sqlite_url)) as s:
        rows = s.scalars(select(ElastixTransformation).where(ElastixTransformation.FK_section_id == ids[edited],
                                                             ElastixTransformation.active.is_(True))).all()
        # onto its previous section (k-1) and the one before it (k-2), nothing from the old order
        assert sorted((r.FK_fixed_section_id, r.section) for r in rows) == sorted(
            [(ids[names[4]], "003"), (ids[names[2]], "003")])

    # The published volume is the stack in the database's order.
    done = run_cli(root, sqlite_url, "neuroglancer")
    assert done.returncode == 0, done.stderr
    from cloudvolume import CloudVolume

    volume = CloudVolume("file://" + str(layout.precomputed_layer(1, True)), progress=False, fill_missing=True)
    data = np.asarray(volume[volume.bounds])[..., 0]
    for z, name in enumerate(reordered):
        section = read(layout.aligned(1, True, name))
        assert np.array_equal(data[: section.shape[1], : section.shape[0], z], section.T), name


# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_section_that_failed_extract_fails_alone_in_every_later_stage(tiny_sample, tmp_path, sqlite_url, capsys):
    root = copy_sample(tiny_sample, tmp_path)
    layout = AnimalLayout(root, "DEMO")
    corrupt_scene(layout.czi_dir / "DEMO_slide01.czi", scene=1)  # channel 1 of DEMO_slide01_S2 cannot decode
    assert cli(root, sqlite_url, "extract") == 1
    sections = stack(sqlite_url)
    bad = next(s for s in sections if s[0] == "DEMO_slide01_S2")
    good = [s[0] for s in sections if s is not bad]
    deactivate = f"UPDATE slide_czi_to_tif SET active = 0 WHERE (FK_slide_id = {bad[2]} AND scene_index = {bad[3]});"
    capsys.readouterr()

    expected = {"mask": "the extracted channel-1 thumbnail is missing", "clean": "the extracted channel-1 section is missing",
                "histogram": "the extracted channel-1 section is missing",
                "align": "the cleaned channel-1 thumbnail is missing", "create_metrics": "the aligned image is missing"}
    for task, what in expected.items():
        assert cli(root, sqlite_url, task) == 1, task
        err = capsys.readouterr().err
        failures = [line for line in error_lines(err) if "DEMO_slide01_S2" in line]
        assert len(failures) == 1 and len(error_lines(err)) == 1, err
        assert f"section DEMO_slide01_S2 (position 001): {what}" in failures[0] and failures[0].endswith(deactivate)
        run = last_run(sqlite_url)
        assert (run.status, run.tasks_failed) == ("failed", 1) and deactivate in run.error
    assert all(layout.aligned(1, True, n).is_file() for n in good), "the other sections went on"
    aligned = {n: layout.aligned(1, True, n).read_bytes() for n in good}

    assert all(layout.metrics_data(1, True, n).is_file() for n in good[1:]), "compared across the gap"

    # Publishing needs the whole stack: one line naming the section and both ways out.
    for task in ("neuroglancer", "omezarr"):
        assert cli(root, sqlite_url, task) == 1
        errors = error_lines(capsys.readouterr().err)
        assert len(errors) == 1 and "1 of 6 aligned sections cannot be published (DEMO_slide01_S2 is missing)" in errors[0]
        assert "--task align --channel 1 --downsample true" in errors[0] and errors[0].endswith(deactivate)
        assert last_run(sqlite_url).status == "failed"
    assert not layout.precomputed_layer(1, True).exists() and not layout.omezarr(1, True).exists()

    # The user runs the SQL from the message: every stage completes, nothing good is redone.
    sql(sqlite_url, deactivate)
    mtimes = {n: layout.mask(n).stat().st_mtime_ns for n in good}
    assert cli(root, sqlite_url, "mask") == 0 and last_run(sqlite_url).tasks_run == 0
    assert {n: layout.mask(n).stat().st_mtime_ns for n in good} == mtimes
    for task in ("clean", "histogram"):
        assert cli(root, sqlite_url, task) == 0 and last_run(sqlite_url).tasks_run == 0, task
    assert cli(root, sqlite_url, "align") == 0
    assert {n: layout.aligned(1, True, n).read_bytes() for n in good} == aligned, "the stack was already bridged"
    assert cli(root, sqlite_url, "neuroglancer") == 0
    assert last_run(sqlite_url).status == "success"
    info = json.loads((layout.precomputed_layer(1, True) / "info").read_text())
    assert info["scales"][0]["size"][2] >= len(good)
