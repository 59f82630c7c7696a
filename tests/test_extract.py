"""extract end to end through the command line, on SQLite and on MariaDB."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from sqlalchemy import func, select

from db.models import PipelineRun, ScanRun, Slide, SlideCziToTif
from db.queries import ordered_sections
from db.session import init_db, session_scope
from pipeline.create_pipeline import main
from pipeline.layout import AnimalLayout
from pipeline.readers import open_slide
from tests.helpers_czi import corrupt_scene
from pipeline.sample import SampleTruth, build_sample, build_sample_tiffs

REAL_CZI = Path(__file__).resolve().parents[2] / "shared" / "data" / "czi"


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    build_sample(root, animal="DEMO", seed=0, size="tiny")
    return root


def fresh_copy(sample_root: Path, tmp_path: Path, animal: str = "DEMO") -> Path:
    root = tmp_path / "data"
    shutil.copytree(sample_root / "DEMO", root / animal)
    return root


def extract(root: Path, db_url: str, animal: str = "DEMO", *extra: str) -> int:
    return main(["--animal", animal, "--task", "extract", "--data-root", str(root), "--db-url", db_url, "--workers", "2", *extra])


def runs(db_url: str, animal: str) -> list[PipelineRun]:
    with session_scope(init_db(db_url)) as s:
        return s.scalars(select(PipelineRun).where(PipelineRun.FK_prep_id == animal).order_by(PipelineRun.id)).all()


def test_extract_sample_brain(sample_root, tmp_path, db_url):
    root = fresh_copy(sample_root, tmp_path)
    truth = SampleTruth.load(root, "DEMO")
    assert extract(root, db_url) == 0
    layout = AnimalLayout(root, "DEMO")
    engine = init_db(db_url)
    with session_scope(engine) as s:
        scan_run = s.scalars(select(ScanRun).where(ScanRun.FK_prep_id == "DEMO")).one()
        assert scan_run.resolution == pytest.approx(truth.pixel_size_um, rel=1e-6)
        assert scan_run.zresolution == 20.0
        slides = s.scalars(select(Slide).order_by(Slide.slide_physical_id)).all()
        assert [sl.file_name for sl in slides] == sorted(p.name for p in layout.czi_dir.glob("*.czi"))
        assert all(sl.processed and len(sl.checksum) == 64 and sl.file_size > 0 for sl in slides)
        assert all(sl.pixel_size_x_um == pytest.approx(truth.pixel_size_um) for sl in slides)
        for channel in (1, 2):
            sections = ordered_sections(s, "DEMO", channel=channel)
            assert len(sections) == len(truth.sections)
            for position, row in enumerate(sections):
                expected = truth.sections[position]
                assert (row.slide.file_name, row.scene_index) == (expected.slide_file, expected.scene_index)
                assert row.slide.slide_physical_id == expected.slide_number
                assert (row.width, row.height) == tuple(expected.scene_shape[::-1])
                assert (row.bbox_x, row.bbox_y) == tuple(expected.scene_origin)
                assert row.dtype == "uint16" and row.channel_name == truth.channel_names[channel - 1]
                assert row.checksum and row.file_size == layout.extracted_tif(Path(row.slide.file_name).stem, row.scene_index, channel).stat().st_size
    # every file is there and the full-resolution pixels are the ones sample.py wrote
    for position, expected in enumerate(truth.sections):
        stem = Path(expected.slide_file).stem
        written = truth.render(position)
        for channel in (1, 2):
            full = tifffile.imread(layout.extracted_tif(stem, expected.scene_index, channel))
            assert full.dtype == written[channel - 1].dtype and np.array_equal(full, written[channel - 1]), (position, channel)
            thumb = tifffile.imread(layout.extracted_thumbnail(stem, expected.scene_index, channel))
            assert thumb.shape == tuple(-(-n // 32) for n in full.shape)
        assert layout.scene_png(stem, expected.scene_index).stat().st_size > 0
    assert runs(db_url, "DEMO")[-1].status == "success"


def test_rerun_rewrites_nothing_and_adds_no_rows(sample_root, tmp_path, db_url):
    root = fresh_copy(sample_root, tmp_path)
    assert extract(root, db_url) == 0
    layout = AnimalLayout(root, "DEMO")
    files = sorted(p for p in layout.preps.rglob("*") if p.is_file()) + sorted(layout.www.rglob("*.png"))
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    engine = init_db(db_url)
    with session_scope(engine) as s:
        # a user deactivates a section and reorders scenes: a rerun must keep that
        row = ordered_sections(s, "DEMO", channel=1)[3]
        row.active = False
        row.scene_order = 99
        edited_id = row.id
        counts = (s.scalar(select(func.count()).select_from(Slide)), s.scalar(select(func.count()).select_from(SlideCziToTif)))
    assert extract(root, db_url) == 0
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
    last = runs(db_url, "DEMO")[-1]
    assert last.tasks_run == 0 and last.tasks_skipped == last.tasks_total > 0
    with session_scope(engine) as s:
        assert (s.scalar(select(func.count()).select_from(Slide)), s.scalar(select(func.count()).select_from(SlideCziToTif))) == counts
        row = s.get(SlideCziToTif, edited_id)
        assert row.active is False and row.scene_order == 99


def test_new_slide_is_ingested_alone(sample_root, tmp_path, db_url):
    root = fresh_copy(sample_root, tmp_path)
    czis = sorted((root / "DEMO" / "czi").glob("*.czi"))
    held_back = tmp_path / czis[-1].name
    shutil.move(czis[-1], held_back)
    assert extract(root, db_url) == 0
    shutil.move(held_back, czis[-1])
    assert extract(root, db_url) == 0
    last = runs(db_url, "DEMO")[-1]
    with session_scope(init_db(db_url)) as s:
        slide = s.scalars(select(Slide).where(Slide.file_name == czis[-1].name)).one()
        new_sections = s.scalar(select(func.count()).select_from(SlideCziToTif).where(SlideCziToTif.FK_slide_id == slide.id))
    assert last.tasks_run == 1 + new_sections  # its description + its scene channels, nothing else


@pytest.mark.slow
def test_sigkill_then_rerun_completes(sample_root, tmp_path, sqlite_url):
    root = fresh_copy(sample_root, tmp_path)
    layout = AnimalLayout(root, "DEMO")
    cmd = [sys.executable, "-m", "pipeline", "--animal", "DEMO", "--task", "extract", "--data-root", str(root),
           "--db-url", sqlite_url, "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(layout.tif_dir.glob("*.tif"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(layout.tif_dir.glob("*.tif")))
    assert done_before >= 3, "the run was killed before it wrote anything"
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert not [p for p in layout.preps.rglob("*") if ".tmp-" in p.name], "temp files left behind"
    truth = SampleTruth.load(root, "DEMO")
    for position, expected in enumerate(truth.sections):
        full = tifffile.imread(layout.extracted_tif(Path(expected.slide_file).stem, expected.scene_index, 1))
        assert np.array_equal(full, truth.render(position)[0])
    last = runs(sqlite_url, "DEMO")[-1]
    assert last.status == "success" and 0 < last.tasks_run < last.tasks_total
    assert runs(sqlite_url, "DEMO")[0].status == "failed"  # the killed run, marked by the rerun


# ---------------------------------------------------------------------------------------
# bad input: one clear message naming the file, a failed pipeline_run row, exit != 0, good files kept


@pytest.mark.parametrize("kind", ["zero_byte", "truncated", "undecodable_scene"])
def test_bad_czi_is_reported_and_good_files_extracted(sample_root, tmp_path, db_url, kind, capsys):
    root = fresh_copy(sample_root, tmp_path)
    czi_dir = root / "DEMO" / "czi"
    good = sorted(czi_dir.glob("*.czi"))
    bad = czi_dir / "broken_slide99.czi"
    if kind == "zero_byte":
        bad.write_bytes(b"")
    elif kind == "truncated":
        bad.write_bytes(good[0].read_bytes()[: good[0].stat().st_size // 2])
    else:
        shutil.copy(good[0], bad)
        corrupt_scene(bad, scene=1)
    assert extract(root, db_url) != 0
    err = capsys.readouterr().err
    error_lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert error_lines and all(str(bad) in l for l in error_lines), err
    last = runs(db_url, "DEMO")[-1]
    assert last.status == "failed" and str(bad) in last.error
    layout = AnimalLayout(root, "DEMO")
    for czi in good:
        assert list(layout.tif_dir.glob(f"{czi.stem}_S*_C1.tif")), f"{czi.name} was not extracted"
    assert not list(layout.tif_dir.glob("broken_slide99_S*_C1.tif")) or kind == "undecodable_scene"
    if kind == "undecodable_scene":
        # the scenes that do decode are extracted; the broken one is not written as zeros
        for tif in layout.tif_dir.glob("broken_slide99_S*_C*.tif"):
            assert tifffile.imread(tif).any()


def test_non_czi_file_is_ignored_with_a_warning(sample_root, tmp_path, db_url, caplog):
    root = fresh_copy(sample_root, tmp_path)
    (root / "DEMO" / "czi" / "notes.txt").write_text("scanned on monday")
    assert extract(root, db_url) == 0
    assert any("notes.txt" in r.getMessage() and "ignored" in r.getMessage() for r in caplog.records)


def test_unreachable_database_is_one_clear_line(tmp_path, capsys):
    code = main(["--animal", "X", "--task", "extract", "--data-root", str(tmp_path),
                 "--db-url", "mysql+pymysql://slide:hunter2@127.0.0.1:1/slidepipe"])
    err = capsys.readouterr().err
    assert code == 3
    assert "cannot connect to database" in err and "127.0.0.1:1" in err and "hunter2" not in err
    assert "Traceback" not in err


def test_unknown_task_lists_tasks(capsys, tmp_path):
    assert main(["--animal", "X", "--task", "bogus", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'bogus'" in err and "extract" in err and "omezarr" in err


# ---------------------------------------------------------------------------------------
REAL = {
    # file: (scene count, width, height, dtype, samples, channels, z planes, pixel size um or None)
    "mosaic_test.czi": (1, 1756, 624, "uint16", 1, 1, 1, 1.083),
    "s_1_t_1_c_1_z_1.czi": (1, None, None, "uint16", 1, 1, 1, None),
    "RGB-8bit.czi": (1, 924, 624, "uint8", 3, 1, 1, None),
    "tiles_z.czi": (1, None, None, "uint8", 1, 2, 2, None),
}


@pytest.mark.skipif(not REAL_CZI.is_dir(), reason="shared/data/czi (real CZI files) not present")
def test_real_czi_files_ingest(tmp_path, db_url, caplog):
    """Each real ZEN file as an animal of its own: they differ in pixel type and pixel size."""
    root = tmp_path / "data"
    for number, name in enumerate(REAL):
        animal = f"REAL{number}"
        (root / animal / "czi").mkdir(parents=True)
        shutil.copy(REAL_CZI / name, root / animal / "czi" / name)
        caplog.clear()
        assert extract(root, db_url, animal) == 0, name
        # tiles_z.czi: channel 1 is dim (values 0-4), channel 2 is 0 everywhere; only channel 2 is "every pixel 0"
        zero = [r.getMessage() for r in caplog.records if "every pixel is 0" in r.getMessage()]
        assert zero == ([f"{root / animal / 'czi' / name} (scene 1, channel 2): every pixel is 0 in the source file "
                         "(extracted as is; deactivate the section if it should not be used)"] if name == "tiles_z.czi" else []), zero
    with session_scope(init_db(db_url)) as s:
        for number, (name, (scenes, width, height, dtype, spp, channels, zplanes, pixel)) in enumerate(REAL.items()):
            layout = AnimalLayout(root, f"REAL{number}")
            slide = s.scalars(select(Slide).where(Slide.file_name == name)).one()
            rows = s.scalars(select(SlideCziToTif).where(SlideCziToTif.FK_slide_id == slide.id)).all()
            assert slide.scenes == scenes and len(rows) == scenes * channels, name
            with open_slide(REAL_CZI / name) as reader:
                info = reader.info()
            for row in rows:
                scene = info.scenes[row.scene_index]
                assert (row.width, row.height) == (scene.width, scene.height)
                if width:
                    assert (row.width, row.height) == (width, height), name
                assert (row.dtype, row.samples_per_pixel, row.z_planes, row.time_points) == (dtype, spp, zplanes, 1), name
                assert (row.bbox_x, row.bbox_y) == (scene.x, scene.y)
                image = tifffile.imread(layout.extracted_tif(Path(name).stem, row.scene_index, row.channel))
                assert image.shape[:2] == (row.height, row.width) and image.dtype == np.dtype(dtype)
                if spp == 3:
                    assert image.shape[2] == 3
                with open_slide(REAL_CZI / name) as reader:
                    source = reader.read_region(row.scene_index, row.channel, 0, 0, row.width, row.height, z=row.z_plane)
                assert np.array_equal(image, source), name
            if pixel:
                assert slide.pixel_size_x_um == pytest.approx(pixel, rel=1e-3)
        origin = s.scalars(select(SlideCziToTif).join(Slide).where(Slide.file_name == "s_1_t_1_c_1_z_1.czi")).one()
        assert (origin.bbox_x, origin.bbox_y) == (39856, 39272)
        negative = s.scalars(select(SlideCziToTif).join(Slide).where(Slide.file_name == "tiles_z.czi")).first()
        assert (negative.bbox_x, negative.bbox_y) == (-127, -128)


def test_tiff_folder_input(tmp_path, db_url):
    folder = tmp_path / "stack"
    paths = build_sample_tiffs(folder, count=4)
    root = tmp_path / "data"
    assert extract(root, db_url, "TIFFS", "--input", str(folder)) == 0
    layout = AnimalLayout(root, "TIFFS")
    with session_scope(init_db(db_url)) as s:
        assert s.scalars(select(ScanRun).where(ScanRun.FK_prep_id == "TIFFS")).one().file_type == "TIFF"
        rows = ordered_sections(s, "TIFFS", channel=2)
        assert [r.slide.file_name for r in rows] == [p.name for p in paths]
        assert rows[0].slide.pixel_size_x_um and rows[0].channel_name
    with tifffile.TiffFile(paths[2]) as tif:
        source = tif.asarray()
    stem = Path(paths[2].name).stem
    assert np.array_equal(tifffile.imread(layout.extracted_tif(stem, 0, 2)), source[1])


def test_tiff_series_gap_is_an_error(tmp_path, db_url, capsys):
    folder = tmp_path / "stack"
    paths = build_sample_tiffs(folder, count=4)
    paths[2].unlink()  # DEMO_003 missing
    root = tmp_path / "data"
    assert extract(root, db_url, "GAP", "--input", str(folder)) == 1
    err = capsys.readouterr().err
    assert "section number 3 is missing" in err and str(folder) in err
    layout = AnimalLayout(root, "GAP")
    assert len(list(layout.tif_dir.glob("*_C1.tif"))) == 3, "the sections present are still extracted"
    assert runs(db_url, "GAP")[-1].status == "failed"


def test_how_answers_provenance_from_the_shell(sample_root, tmp_path, db_url, capsys, monkeypatch):
    import json

    root = fresh_copy(sample_root, tmp_path)
    assert extract(root, db_url) == 0
    layout = AnimalLayout(root, "DEMO")
    tif = sorted(layout.tif_dir.glob("*_C2.tif"))[0]
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    for typed in (str(tif), f"data/DEMO/preps/tif/{tif.name}", f"DEMO/preps/tif/{tif.name}"):
        assert main(["how", typed, "--data-root", str(root), "--db-url", db_url]) == 0
        answer = json.loads(capsys.readouterr().out)
        assert answer["path"] == f"DEMO/preps/tif/{tif.name}"
        assert answer["run"]["stage"] == "extract" and answer["run"]["software_versions"]["pylibCZIrw"]
        assert answer["checksum"] and [i["path"] for i in answer["inputs"]] == [f"DEMO/czi/{tif.name.split('_S')[0]}.czi"]
    assert main(["how", "DEMO/nothing.tif", "--data-root", str(root), "--db-url", db_url]) == 1
    assert "no record" in capsys.readouterr().err
