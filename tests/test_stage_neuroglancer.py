"""The neuroglancer stage through the real CLI: DB voxel sizes, runner tasks, file_log records,
skip on re-run, and the temporary layer's lifecycle.

The aligned stack is placed at the aligned paths by the test itself, so this does not depend on
the align stage.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import tifffile
from sqlalchemy import select

from db.models import FileLog, PipelineRun
from db.queries import how_was_made
from db.session import init_db, session_scope
from pipeline.create_pipeline import main
from pipeline.layout import AnimalLayout
from pipeline.publish.validate import verify_layer
from tests.helpers_db import record_outputs, seed_sections
from tests.helpers_layers import decoded_chunk_files
from tests.helpers_queue import worker

ANIMAL = "NG1"


def seed_animal(db_url: str, sections: int, resolution_um: float = 0.325, z_um: float = 20.0) -> list[str]:
    return seed_sections(db_url, ANIMAL, sections, resolution_um=resolution_um, z_um=z_um, dtype="uint8")


def place_aligned(layout: AnimalLayout, names: list[str], height: int, width: int, downsample=True, seed=0,
                  db_url: str | None = None) -> list:
    """Aligned sections written by the test and recorded as align's outputs (the stage trusts
    only recorded, unchanged files)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i, name in enumerate(names):
        path = layout.aligned(1, downsample, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        section = rng.integers(0, 200, (height, width), dtype=np.uint8)
        section[10 + i: 30 + i, 10:40] = 255
        tifffile.imwrite(path, section)
        paths.append(path)
    if db_url:
        record_outputs(db_url, layout.data_root, paths)
    return paths


def cli(tmp_path, db_url, *extra) -> int:
    return main(["--animal", ANIMAL, "--task", "neuroglancer", "--channel", "1", "--data-root", str(tmp_path / "data"),
                 "--db-url", db_url, "--workers", "2", *extra])


def last_run(db_url) -> PipelineRun:
    engine = init_db(db_url)
    with session_scope(engine) as s:
        run = s.scalars(select(PipelineRun).where(PipelineRun.stage != "web")  # web: the pages after it
                        .order_by(PipelineRun.id.desc()).limit(1)).first()
        s.expunge(run)
    engine.dispose()
    return run


def stack_of(paths) -> np.ndarray:
    return np.stack([tifffile.imread(p) for p in paths], axis=-1).transpose(1, 0, 2)  # (x, y, z)


def read_mip0(layer) -> np.ndarray:
    from cloudvolume import CloudVolume

    vol = CloudVolume("file://" + str(layer), progress=False, fill_missing=True)  # background chunks have no file
    return np.asarray(vol[vol.bounds])[..., 0]


def test_publishes_records_and_skips_on_rerun(tmp_path, db_url):
    layout = AnimalLayout(tmp_path / "data", ANIMAL)
    paths = place_aligned(layout, seed_animal(db_url, 5), 90, 130, db_url=db_url)
    assert cli(tmp_path, db_url, "--chunk-size", "32,32,2") == 0
    layer = layout.precomputed_layer(1, True)
    assert layer.name == "C1T" and not layout.precomputed_layer(1, True, rechunkme=True).exists()
    info = json.loads((layer / "info").read_text())
    assert info["scales"][0]["resolution"] == [10400, 10400, 20000], "0.325 um x 32 thumbnails, 20 um sections from scan_run"
    assert info["scales"][0]["chunk_sizes"] == [[32, 32, 2]]
    got = read_mip0(layer)
    assert np.array_equal(got[:130, :90, :5], stack_of(paths))
    run = last_run(db_url)
    assert run.status == "success" and run.tasks_run == 6  # 5 sections (+ no z padding here) + the layer
    engine = init_db(db_url)
    with session_scope(engine) as s:
        row = s.scalars(select(FileLog).where(FileLog.path == layout.relative(layer))).one()
        result = json.loads(row.result)
        assert [m["mip"] for m in result["mips"]] == list(range(len(info["scales"])))
        assert all(m["chunks"] == m["expected_chunks"] and len(m["sha256"]) == 64 for m in result["mips"])
        assert row.size == sum(m["bytes"] for m in result["mips"]) + (layer / "info").stat().st_size \
            + (layer / "provenance").stat().st_size
        assert sorted(i.path for i in row.inputs) == sorted(layout.relative(p) for p in paths)
        chunk = next((layer / info["scales"][1]["key"]).iterdir())
        answer = how_was_made(s, layout.relative(chunk))
        assert json.dumps(answer, default=str).count("neuroglancer") >= 1
        per_chunk_rows = s.scalars(select(FileLog).where(FileLog.path.like(f"%{info['scales'][0]['key']}/%"))).all()
        assert per_chunk_rows == [], "a row per layer, not per chunk"
    engine.dispose()
    prov = json.loads((layer / "provenance").read_text())
    assert any(p["method"].get("task") == "slidepipe.precomputed" and p["method"]["params"]["animal"] == ANIMAL
               for p in prov["processing"])
    mtime = (layer / "info").stat().st_mtime_ns
    # Re-run: nothing to do, and the deleted temporary layer is not rebuilt.
    assert cli(tmp_path, db_url, "--chunk-size", "32,32,2") == 0
    run = last_run(db_url)
    assert (run.tasks_run, run.tasks_skipped) == (0, 1)
    assert not layout.precomputed_layer(1, True, rechunkme=True).exists()
    assert (layer / "info").stat().st_mtime_ns == mtime


def test_changed_section_republishes_and_keep_rechunkme(tmp_path, sqlite_url):
    layout = AnimalLayout(tmp_path / "data", ANIMAL)
    paths = place_aligned(layout, seed_animal(sqlite_url, 4), 70, 70, db_url=sqlite_url)
    assert cli(tmp_path, sqlite_url, "--chunk-size", "16,16,2", "--keep-rechunkme") == 0
    temp = layout.precomputed_layer(1, True, rechunkme=True)
    assert (temp / "info").is_file(), "--keep-rechunkme keeps the step-1 layer"
    tifffile.imwrite(paths[2], np.full((70, 70), 7, dtype=np.uint8))
    record_outputs(sqlite_url, layout.data_root, [paths[2]])  # align made it again
    assert cli(tmp_path, sqlite_url, "--chunk-size", "16,16,2", "--keep-rechunkme") == 0
    run = last_run(sqlite_url)
    assert run.tasks_run == 2, "only the changed section's step-1 task and the layer"
    got = read_mip0(layout.precomputed_layer(1, True))
    assert (got[:70, :70, 2] == 7).all() and np.array_equal(got[:70, :70, :4], stack_of(paths))
    # Without --keep-rechunkme the temporary layer goes, even when the layer task is skipped.
    assert cli(tmp_path, sqlite_url, "--chunk-size", "16,16,2") == 0
    assert not temp.exists()
    # A change after the temporary layer is gone rebuilds all of step 1, not just one section.
    tifffile.imwrite(paths[0], np.full((70, 70), 9, dtype=np.uint8))
    record_outputs(sqlite_url, layout.data_root, [paths[0]])
    assert cli(tmp_path, sqlite_url, "--chunk-size", "16,16,2") == 0
    assert last_run(sqlite_url).tasks_run == 5
    got = read_mip0(layout.precomputed_layer(1, True))
    assert np.array_equal(got[:70, :70, :4], stack_of(paths))
    verify_layer(layout.precomputed_layer(1, True), paths, sample=None)


def test_a_damaged_published_layer_is_noticed_and_rebuilt(tmp_path, sqlite_url):
    layout = AnimalLayout(tmp_path / "data", ANIMAL)
    paths = place_aligned(layout, seed_animal(sqlite_url, 4), 70, 70, db_url=sqlite_url)
    flags = ("--chunk-size", "16,16,2")
    assert cli(tmp_path, sqlite_url, *flags) == 0
    layer = layout.precomputed_layer(1, True)
    key = json.loads((layer / "info").read_text())["scales"][0]["key"]
    chunks = sorted((layer / key).iterdir())
    original = {p: p.read_bytes() for p in chunks}
    with init_db(sqlite_url).connect() as conn:
        layer_rows = conn.execute(select(FileLog.id).where(FileLog.path == layout.relative(layer))).all()
    # one chunk deleted, then one truncated: each rerun notices it, rebuilds and verifies the layer
    for damage in ("delete", "truncate"):
        victim = chunks[len(chunks) // 2]
        if damage == "delete":
            victim.unlink()
        else:
            victim.write_bytes(victim.read_bytes()[:10])
        assert cli(tmp_path, sqlite_url, *flags) == 0, damage
        run = last_run(sqlite_url)
        assert run.status == "success" and run.tasks_run >= 1, damage
        assert {p: p.read_bytes() for p in chunks} == original, damage
        verify_layer(layer, paths, sample=None)
    with init_db(sqlite_url).connect() as conn:
        assert len(conn.execute(select(FileLog.id).where(FileLog.path == layout.relative(layer))).all()) == len(layer_rows) + 2
    assert np.array_equal(read_mip0(layer)[:70, :70, :4], stack_of(paths))
    # untouched: skipped
    assert cli(tmp_path, sqlite_url, *flags) == 0
    assert (last_run(sqlite_url).tasks_run, last_run(sqlite_url).tasks_skipped) == (0, 1)


def test_sharded_flag_publishes_shards_records_them_and_switching_reruns(tmp_path, sqlite_url):
    """--sharded enters the layer task's fingerprint (not step 1's): switching either way
    republishes the layer only; the same switch again is skipped."""
    layout = AnimalLayout(tmp_path / "data", ANIMAL)
    paths = place_aligned(layout, seed_animal(sqlite_url, 4), 70, 70, db_url=sqlite_url)
    flags = ("--chunk-size", "16,16,2", "--keep-rechunkme")
    layer = layout.precomputed_layer(1, True)
    assert cli(tmp_path, sqlite_url, *flags) == 0
    assert any(layer.rglob("*.gz")) and not any(layer.rglob("*.shard"))
    assert cli(tmp_path, sqlite_url, *flags, "--sharded") == 0
    assert last_run(sqlite_url).tasks_run == 1, "the layer only: step 1 does not depend on --sharded"
    info = json.loads((layer / "info").read_text())
    assert all(scale["sharding"] for scale in info["scales"])
    assert not any(layer.rglob("*.gz")) and any(layer.rglob("*.shard"))
    assert np.array_equal(read_mip0(layer)[:70, :70, :4], stack_of(paths))
    verify_layer(layer, paths, sample=None)
    engine = init_db(sqlite_url)
    with session_scope(engine) as s:
        row = s.scalars(select(FileLog).where(FileLog.path == layout.relative(layer))
                        .order_by(FileLog.id.desc()).limit(1)).one()
        result = json.loads(row.result)
        assert result["sharded"] is True and all(m["sharded"] for m in result["mips"])
        shard = next((layer / info["scales"][0]["key"]).glob("*.shard"))
        assert "neuroglancer" in json.dumps(how_was_made(s, layout.relative(shard)), default=str)
    engine.dispose()
    prov = json.loads((layer / "provenance").read_text())
    ours = next(p["method"] for p in prov["processing"] if p["method"].get("task") == "slidepipe.precomputed")
    assert ours["params"]["sharded"] is True and ours["sharded"] is True
    assert cli(tmp_path, sqlite_url, *flags, "--sharded") == 0
    assert (last_run(sqlite_url).tasks_run, last_run(sqlite_url).tasks_skipped) == (0, 1)
    assert cli(tmp_path, sqlite_url, *flags) == 0
    assert last_run(sqlite_url).tasks_run == 1 and any(layer.rglob("*.gz")) and not any(layer.rglob("*.shard"))


def test_full_resolution_with_z_padding_and_a_queue(tmp_path, sqlite_url):
    layout = AnimalLayout(tmp_path / "data", ANIMAL)
    paths = place_aligned(layout, seed_animal(sqlite_url, 5, resolution_um=0.5, z_um=1.0), 100, 120, downsample=False,
                          db_url=sqlite_url)
    queue = "fq://" + str(tmp_path / "queue")
    with worker(queue, tmp_path / "data", tmp_path / "worker"):  # the runner only waits for queued tasks
        code = cli(tmp_path, sqlite_url, "--downsample", "false", "--chunk-size", "16,16,2",
                   "--queue", queue, "--verify-sample", "0")
    assert code == 0
    layer = layout.precomputed_layer(1, False)
    info = json.loads((layer / "info").read_text())
    assert layer.name == "C1" and info["scales"][0]["resolution"] == [500, 500, 1000]
    assert info["scales"][0]["size"][2] == 6, "one blank section pads z for the 2x2x2 level"
    assert [s["resolution"][2] for s in info["scales"]][-1] == 2000
    assert last_run(sqlite_url).tasks_run == 5 + 1 + 1  # sections, the blank one, the layer
    assert np.array_equal(read_mip0(layer)[:120, :100, :5], stack_of(paths))


def test_missing_or_unrecorded_aligned_sections_refuse_with_the_sections_named(tmp_path, sqlite_url, capsys):
    layout = AnimalLayout(tmp_path / "data", ANIMAL)
    names = seed_animal(sqlite_url, 3)
    paths = place_aligned(layout, names, 40, 40, db_url=sqlite_url)
    paths[1].unlink()
    tifffile.imwrite(paths[2], np.zeros((40, 40), np.uint8))  # changed after align wrote it
    assert cli(tmp_path, sqlite_url) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "2 of 3 aligned sections cannot be published" in lines[0]
    assert f"{names[1]} is missing" in lines[0] and f"{names[2]} changed on disk" in lines[0]
    assert "--task align --channel 1 --downsample true" in lines[0]
    assert ("UPDATE slide_czi_to_tif SET active = 0 WHERE (FK_slide_id = 1 AND scene_index = 1) OR "
            "(FK_slide_id = 1 AND scene_index = 2);") in lines[0]
    run = last_run(sqlite_url)
    assert run.status == "failed" and "cannot be published" in run.error
    assert not layout.precomputed_layer(1, True).exists() and not layout.precomputed_layer(1, True, True).exists()


def test_before_extract_says_run_extract_first(tmp_path, sqlite_url, capsys):
    for task in ("neuroglancer", "omezarr"):
        code = main(["--animal", "NEW1", "--task", task, "--data-root", str(tmp_path / "data"), "--db-url", sqlite_url])
        assert code == 1
        err = capsys.readouterr().err
        assert "run --task extract first" in err and "pixel size" not in err, err
        assert last_run(sqlite_url).status == "failed"


@pytest.mark.parametrize("bad", ["32,32", "0,32,2", "a,b,c"])
def test_chunk_size_flag_is_checked(tmp_path, sqlite_url, bad):
    with pytest.raises(SystemExit):
        cli(tmp_path, sqlite_url, "--chunk-size", bad)


# --------------------------------------------------------------------------------------------
# the sample brain through the whole chain with `clean --normalise`, both publishing stages
@pytest.fixture(scope="module")
def normalised_sample(tmp_path_factory):
    """The tiny sample brain: extract, mask, clean --normalise, histogram, align, create_metrics,
    neuroglancer, omezarr (thumbnails), then the viewer links, as a user would."""
    from pipeline.sample import build_sample
    from web.state import write_links

    root = tmp_path_factory.mktemp("normalised") / "data"
    db_url = f"sqlite:///{root / 'slidepipe.db'}"
    build_sample(root, animal="DEMO", seed=0, size="tiny")
    for task, *extra in (("extract",), ("mask",), ("clean", "--normalise", "true"), ("histogram",), ("align",),
                         ("create_metrics",), ("neuroglancer",), ("omezarr",)):
        assert main(["--animal", "DEMO", "--task", task, "--data-root", str(root), "--db-url", db_url,
                     "--workers", "2", *extra]) == 0, task
    write_links(root, "DEMO", "http://127.0.0.1:8080")
    return root


@pytest.mark.slow
def test_published_windows_contain_the_published_tissue_percentiles(normalised_sample):
    """Issue 13.3: the windows came from the histogram stage's counts of the extracted sections,
    but `clean --normalise` stretches channel 1 to 0..65535, so nearly all published tissue was
    at or above the window's end. The windows of both published volumes must describe what is
    published: here checked with np.percentile of the aligned sections' tissue voxels."""
    from pipeline.publish.omezarr import read_attributes
    from web.state import build_state

    root = normalised_sample
    layout = AnimalLayout(root, "DEMO")
    aligned = np.stack([tifffile.imread(p) for p in sorted(layout.aligned_dir(1, True).glob("*.tif"))])
    tissue = aligned[aligned > 0].astype(np.float64)  # clean zeroes the background outside the mask
    low, high = np.percentile(tissue, [0.5, 99.5])
    assert high - low > 20000, "the sample is normalised: its tissue spans most of 0..65535"
    precomputed = build_state(root, "DEMO", "http://127.0.0.1:8080", downsample=True, layer_source="precomputed")
    attrs = read_attributes(layout.omezarr(1, True))
    omero = attrs.get("ome", attrs)["omero"]["channels"][0]["window"]
    omezarr = build_state(root, "DEMO", "http://127.0.0.1:8080", downsample=True, layer_source="omezarr")
    for what, (lo, hi) in (("neuroglancer", precomputed["layers"][0]["shaderControls"]["normalized"]["range"]),
                           ("omero", (omero["start"], omero["end"])),
                           ("omezarr state", omezarr["layers"][0]["shaderControls"]["normalized"]["range"])):
        assert lo <= low and high <= hi, f"{what} window {lo, hi} misses the tissue's 0.5-99.5 % {low, high}"
        assert (tissue >= hi).mean() < 0.01 and (tissue < lo).mean() < 0.01, what
        # and it is the tissue's window, not just the whole dtype range
        assert lo >= np.percentile(tissue, 0.1) - 1 and hi <= tissue.max() + 1, what


@pytest.mark.slow
def test_nothing_served_names_the_data_root_or_the_host(normalised_sample):
    """Issue 13.7: no file under www/ (what the servers publish) holds the data root's absolute
    path or this machine's name; the published provenance used to carry user@host and paths."""
    import gzip
    import re
    import socket

    root = normalised_sample
    host = socket.gethostname()
    word = re.compile(rf"(?<![A-Za-z0-9_.-]){re.escape(host)}(?![A-Za-z0-9_-])")
    absolute = [str(root).encode(), str(root.resolve()).encode()]
    served = [p for p in (root / "DEMO" / "www").rglob("*") if p.is_file()]
    assert any(p.name == "provenance" for p in served) and any(p.name == "zarr.json" for p in served)
    text_files = 0
    for path in served:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        assert not any(a in data for a in absolute), path
        try:
            text = data.decode("utf-8")
            json.loads(text)  # metadata, provenance, viewer state and links are JSON
        except ValueError:
            continue  # voxels and images: the path check above covers them
        text_files += 1
        assert not word.search(text), f"{path} names the host {host!r}"
    assert text_files >= 5


# --------------------------------------------------------------------------------------------
# z-slab publishing (issue 8.1)
def test_a_failure_in_a_later_slab_resumes_without_redoing_finished_slabs(tmp_path, db_url):
    """Three slabs of 4 sections; section 9 (slab 3) is truncated (its header reads, its pixels do
    not): the run fails with slabs 1-2
    done (their step-1 chunks already deleted). Repaired, the rerun skips them (runner counts;
    their published chunk files keep their mtimes) and the layer equals the whole-stack build."""
    from pipeline.publish import precomputed as pc

    layout = AnimalLayout(tmp_path / "data", ANIMAL)
    paths = place_aligned(layout, seed_animal(db_url, 12), 70, 70, db_url=db_url)
    good = paths[9].read_bytes()
    paths[9].write_bytes(good[:-2000])
    record_outputs(db_url, layout.data_root, [paths[9]])
    flags = ("--chunk-size", "16,16,2", "--slab-depth", "4", "--verify-sample", "0")
    assert cli(tmp_path, db_url, *flags) == 1
    run = last_run(db_url)
    assert run.status == "failed" and paths[9].name in run.error
    temp = layout.precomputed_layer(1, True, rechunkme=True)
    partial = layout.precomputed_partial(1, True)
    slab_markers = sorted(p.name for p in layout.precomputed_slab_markers(1, True).glob("z*.json"))
    assert slab_markers == ["z00000-00004.json", "z00004-00008.json"]
    info = json.loads((partial / "info").read_text())
    key0 = info["scales"][0]["key"]
    step1_z = sorted({int(p.name.split("_")[2].split("-")[0]) for p in (temp / key0).iterdir()})
    assert step1_z == [8, 10, 11], "finished slabs' step-1 chunks are deleted; slab 3's written ones stay"
    before = {p.name: p.stat().st_mtime_ns for p in (partial / key0).iterdir()}
    assert before and all(int(n.split("_")[2].split("-")[0]) < 8 for n in before)
    assert not layout.precomputed_layer(1, True).exists()

    paths[9].write_bytes(good)
    record_outputs(db_url, layout.data_root, [paths[9]])
    assert cli(tmp_path, db_url, *flags) == 0
    run = last_run(db_url)
    # run: section 9's step-1 task, slab 3, the layer; skipped: sections 8, 10, 11 and slabs 1-2
    assert (run.tasks_run, run.tasks_skipped) == (3, 5)
    layer = layout.precomputed_layer(1, True)
    after = {p.name: p.stat().st_mtime_ns for p in (layer / key0).iterdir()}
    assert {n: after[n] for n in before} == before, "finished slabs' chunks were not written again"
    assert not temp.exists()
    whole = pc.publish_stack(paths, tmp_path / "whole" / "C1T", 10.4, 20, chunk_size=(16, 16, 2), sample=None)
    assert whole["plan"]["factors"] == [[2, 2, 1], [2, 2, 2]], "a level that halves z, built after the slabs"
    assert decoded_chunk_files(layer) == decoded_chunk_files(tmp_path / "whole" / "C1T")
    assert json.loads((layer / "info").read_text()) == json.loads((tmp_path / "whole" / "C1T" / "info").read_text())
    verify_layer(layer, paths, sample=None)
    engine = init_db(db_url)
    with session_scope(engine) as s:
        rows = s.scalars(select(FileLog).where(FileLog.path == layout.relative(layer))).all()
        assert len(rows) == 1 and len(json.loads(rows[0].result)["mips"]) == 3
    engine.dispose()
    assert cli(tmp_path, db_url, *flags) == 0
    assert (last_run(db_url).tasks_run, last_run(db_url).tasks_skipped) == (0, 1)


def test_temporary_files_are_bounded_by_one_slab_whatever_the_stack_depth(tmp_path, sqlite_url):
    """Peak step-1 files and bytes, watched during the run, are the same for 32 and 64 sections
    (one slab of 16 sections: 16 x 16 (16,16,1) chunks), where the whole-stack build holds all."""
    import threading

    peaks = {}
    for depth in (32, 64):
        root = tmp_path / f"d{depth}"
        db = f"sqlite:///{root / 'slidepipe.db'}"
        root.mkdir()
        layout = AnimalLayout(root / "data", ANIMAL)
        paths = place_aligned(layout, seed_animal(db, depth), 64, 64, db_url=db)
        temp = layout.precomputed_layer(1, True, rechunkme=True)
        key = "10400_10400_20000"
        peak = [0, 0]
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                try:
                    sizes = [e.stat().st_size for e in os.scandir(temp / key)]
                except (FileNotFoundError, OSError):
                    sizes = []
                peak[:] = [max(peak[0], len(sizes)), max(peak[1], sum(sizes))]
                time.sleep(0.001)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            code = main(["--animal", ANIMAL, "--task", "neuroglancer", "--channel", "1", "--data-root",
                         str(root / "data"), "--db-url", db, "--workers", "1", "--chunk-size", "32,32,16",
                         "--rechunkme-chunk-size", "16,16,1", "--slab-depth", "16", "--verify-sample", "4"])
        finally:
            stop.set()
            watcher.join()
        assert code == 0
        assert not temp.exists()
        assert np.array_equal(read_mip0(layout.precomputed_layer(1, True))[:64, :64, :depth], stack_of(paths))
        peaks[depth] = tuple(peak)
    assert peaks[32] == peaks[64] == (16 * 16, 16 * 16 * 16 * 16), peaks


@pytest.mark.parametrize("sharded", [False, True], ids=["unsharded", "sharded"])
def test_a_sigkill_between_slabs_resumes_to_the_all_at_once_build(tmp_path, sqlite_url, sharded):
    """The stage through the real CLI in its own process group, SIGKILLed between slab 2 and slab
    3 of three (slab 2 transferred, verified, its step-1 chunks deleted, its marker recorded: the
    test-only pause point `<slab marker> recorded`), then run again. The rerun runs slab 3 and
    the layer only (finished slabs are not redone, their published files keep their mtimes),
    leaves no temporary file, records the killed run as failed, and the layer decodes chunk for
    chunk to the same stack published all at once. Sharded: 4 KB shards (2x2x2 chunks, two
    slabs deep), so slab 2 had packed shards of mip 0 before the kill."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from pipeline.atomic import PAUSE_ENV, is_temp
    from pipeline.publish import precomputed as pc

    layout = AnimalLayout(tmp_path / "data", ANIMAL)
    paths = place_aligned(layout, seed_animal(sqlite_url, 6), 70, 70, db_url=sqlite_url)
    flags = ["--chunk-size", "16,16,2", "--slab-depth", "2", "--verify-sample", "0"]
    flags += ["--sharded", "--shard-bytes", "4096"] if sharded else []
    partial = layout.precomputed_partial(1, True)
    slab_markers = layout.precomputed_slab_markers(1, True)
    log = tmp_path / "killed.log"
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, PAUSE_ENV: "z00002-00004.json recorded",
           "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "--animal", ANIMAL, "--task", "neuroglancer",
                                 "--channel", "1", "--data-root", str(tmp_path / "data"), "--db-url", sqlite_url,
                                 "--workers", "2", *flags], env=env, start_new_session=True, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while "slidepipe test hook" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"the stage ended before the pause point: {log.read_text()}"
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    killed = last_run(sqlite_url)
    assert killed.status == "running", "SIGKILL: nothing ran a finally"
    assert sorted(p.name for p in slab_markers.glob("z*.json")) == ["z00000-00002.json", "z00002-00004.json"]
    temp = layout.precomputed_layer(1, True, rechunkme=True)
    key0 = json.loads((partial / "info").read_text())["scales"][0]["key"]
    assert not list((temp / key0).iterdir()), "both finished slabs' step-1 chunks were deleted, slab 3 not begun"
    before = {p.name: p.stat().st_mtime_ns for p in (partial / key0).iterdir()}
    assert any(n.endswith(".shard") for n in before) == sharded, "sharded: shards complete below z 4 are packed"

    assert cli(tmp_path, sqlite_url, *flags) == 0
    run = last_run(sqlite_url)
    # run: sections 4 and 5, slab 3, the layer; skipped: slabs 1-2
    assert (run.tasks_run, run.tasks_skipped) == (4, 2)
    layer = layout.precomputed_layer(1, True)
    after = {p.name: p.stat().st_mtime_ns for p in (layer / key0).iterdir()}
    kept = [n for n in before if not n.endswith(".gz") or not sharded]  # sharded: loose chunks were packed since
    assert kept and {n: after[n] for n in kept} == {n: before[n] for n in kept}, "finished slabs not written again"
    assert not temp.exists() and [p for p in (tmp_path / "data").rglob("*") if is_temp(p)] == []
    engine = init_db(sqlite_url)
    with session_scope(engine) as s:
        row = s.get(PipelineRun, killed.id)
        assert row.status == "failed" and ("killed" in row.error or "taken over" in row.error), row.error
    engine.dispose()

    whole = tmp_path / "whole" / "C1T"
    pc.publish_stack(paths, whole, 10.4, 20, chunk_size=(16, 16, 2), sample=None, sharded=sharded,
                     shard_bytes=4096 if sharded else None)
    assert json.loads((layer / "info").read_text()) == json.loads((whole / "info").read_text())
    got, want = decoded_chunk_files(layer), decoded_chunk_files(whole)
    assert got.keys() == want.keys() and [k for k in want if got[k] != want[k]] == []
    assert len(want) > 3 * 25, "every level's chunks compared"
    verify_layer(layer, paths, sample=None)
