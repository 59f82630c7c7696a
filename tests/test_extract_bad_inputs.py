"""extract on inputs that must not pass silently (issue 12: items 2, 4, 5, 6, 10), through the
real command line: the exit code, the one error line, what the database recorded, and that the
good sections of the same animal are still extracted and unchanged."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from sqlalchemy import select

from db.models import PipelineRun, ScanRun, Slide, SlideCziToTif
from db.session import init_db, session_scope
from pipeline.layout import AnimalLayout
from tests.helpers_czi import corrupt_subblock, subblocks, write_czi

SHAPE = (200, 300)


def image(seed: int, dtype=np.uint16, high: int = 60000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    smooth = (np.sin(xx / 17.0 + seed) * np.cos(yy / 13.0) + 1) * high / 3
    return (smooth + rng.integers(1, high // 4, SHAPE)).astype(dtype)


def cli(root: Path, db_url: str, animal: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline", "--animal", animal, "--task", "extract", "--data-root", str(root),
           "--db-url", db_url, "--workers", "1", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return sorted(set(line for line in proc.stderr.splitlines() if line.startswith("error:")))


def rows(db_url: str, animal: str) -> dict[tuple[str, int, int], SlideCziToTif]:
    with session_scope(init_db(db_url)) as s:
        found = s.scalars(select(SlideCziToTif).join(Slide).join(ScanRun).where(ScanRun.FK_prep_id == animal)).all()
        s.expunge_all()
    return {(r.file_name, r.scene_index, r.channel): r for r in found}


def last_run(db_url: str, animal: str) -> PipelineRun:
    with session_scope(init_db(db_url)) as s:
        run = s.scalars(select(PipelineRun).where(PipelineRun.FK_prep_id == animal).order_by(PipelineRun.id.desc())).first()
        s.expunge(run)
    return run


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.glob("*.tif"))}


def czi_slides(root: Path, animal: str, *slides: dict) -> list[Path]:
    """<root>/<animal>/czi/<animal>_slide01.czi ...: each dict holds write_czi's arguments
    (`channels` for one scene at (0, 0), or `scenes`)."""
    folder = root / animal / "czi"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, kwargs in enumerate(slides, start=1):
        kwargs = {"tile": 128, "overlap": 8, **kwargs}
        scenes = kwargs.pop("scenes", None) or [((0, 0), kwargs.pop("channels", []))]
        paths.append(write_czi(folder / f"{animal}_slide{number:02d}.czi", scenes, **kwargs))
    return paths


def tiff_sections(folder: Path, count: int, dtype=np.uint16) -> dict[Path, np.ndarray]:
    """OME-TIFF sections of two channels (one page each), 1 um pixels, strips of 64 rows."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for n in range(1, count + 1):
        data = np.stack([image(10 * n + c, dtype, 250 if dtype == np.uint8 else 60000) for c in range(2)])
        path = folder / f"S_{n:03d}.ome.tif"
        tifffile.imwrite(path, data, ome=True, rowsperstrip=64, metadata={"axes": "CYX", "PhysicalSizeX": 1.0, "PhysicalSizeY": 1.0})
        written[path] = data
    return written


# --------------------------------------------------------------------------------------- item 2
def _zero_strip_offset(path: Path, page: int, strip: int) -> None:
    """Damage a page directory: one StripOffsets entry becomes 0 (tifffile then reads zeros)."""
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[page].tags["StripOffsets"]
        fmt = {3: "H", 4: "I", 16: "Q"}[int(tag.dtype)]
        where = tag.valueoffset + strip * struct.calcsize(fmt)
    with open(path, "r+b") as handle:
        handle.seek(where)
        handle.write(struct.pack("<" + fmt, 0))


def test_damaged_tiff_page_is_an_error_not_zeros(tmp_path, sqlite_url):
    written = tiff_sections(tmp_path / "in", 3)
    bad = sorted(written)[1]
    _zero_strip_offset(bad, page=1, strip=2)  # channel 2 of section 2
    root = tmp_path / "data"
    proc = cli(root, sqlite_url, "DMG", "--input", str(tmp_path / "in"))
    assert proc.returncode == 1, proc.stderr
    assert error_lines(proc) == [f"error: {bad}: channel 2 z 0: page 2 is damaged: strip 2 has no data (offset 0, 38400 bytes); "
                                 "not reading it as zeros"], proc.stderr
    layout = AnimalLayout(root, "DMG")
    recorded = rows(sqlite_url, "DMG")
    damaged = recorded[(layout.extracted_name(bad.name.removesuffix(".tif"), 0, 2), 0, 2)]
    assert damaged.checksum is None and not (layout.tif_dir / damaged.file_name).exists()
    run = last_run(sqlite_url, "DMG")
    assert run.status == "failed" and f"{bad}: channel 2 z 0: page 2 is damaged" in run.error
    for path, data in written.items():  # everything else is extracted, pixel-exact
        for channel in (1, 2):
            if (path, channel) == (bad, 2):
                continue
            name = layout.extracted_name(path.name.removesuffix(".tif"), 0, channel)
            assert np.array_equal(tifffile.imread(layout.tif_dir / name), data[channel - 1]), name
            assert recorded[(name, 0, channel)].checksum


def test_short_uncompressed_czi_subblock_is_an_error_not_zeros(tmp_path, sqlite_url):
    """libCZI draws an uncompressed subblock whose data is shorter than its pixels padded with 0."""
    good, bad = czi_slides(tmp_path / "data", "SUB", {"channels": [image(1), image(2)], "compression": None},
                           {"channels": [image(3), image(4)], "compression": None})
    block = next(b for b in subblocks(bad) if b.dims.get("C") == 1 and b.dims["X"] > 0)
    with open(bad, "r+b") as handle:  # the segment's DataSize field: half of what the pixels need
        handle.seek(block.offset + 32 + 8)
        handle.write(struct.pack("<q", block.data_size // 2))
    proc = cli(tmp_path / "data", sqlite_url, "SUB")
    assert proc.returncode == 1, proc.stderr
    [line] = error_lines(proc)
    assert line.startswith(f"error: {bad}: scene 1 channel 2 z 0: the uncompressed subblock at byte {block.offset} ")
    assert line.endswith(f"holds {block.data_size // 2} bytes for {block.data_size}: damaged; not reading it as zeros")
    layout = AnimalLayout(tmp_path / "data", "SUB")
    recorded = rows(sqlite_url, "SUB")
    assert recorded[("SUB_slide02_S1_C2.tif", 0, 2)].checksum is None
    assert not (layout.tif_dir / "SUB_slide02_S1_C2.tif").exists()
    assert np.array_equal(tifffile.imread(layout.tif_dir / "SUB_slide02_S1_C1.tif"), image(3))
    for channel, seed in ((1, 1), (2, 2)):
        assert np.array_equal(tifffile.imread(layout.tif_dir / f"SUB_slide01_S1_C{channel}.tif"), image(seed))
        assert recorded[(f"SUB_slide01_S1_C{channel}.tif", 0, channel)].checksum
    assert good.exists()


# --------------------------------------------------------------------------------------- item 4
def test_uint8_section_among_uint16_is_refused_then_widened(tmp_path, sqlite_url):
    folder = tmp_path / "in"
    written = tiff_sections(folder, 3)
    odd = folder / "S_004.ome.tif"
    narrow = np.stack([image(40 + c, np.uint8, 250) for c in range(2)])
    tifffile.imwrite(odd, narrow, ome=True, rowsperstrip=64, metadata={"axes": "CYX", "PhysicalSizeX": 1.0, "PhysicalSizeY": 1.0})
    root = tmp_path / "data"
    layout = AnimalLayout(root, "MIX")

    proc = cli(root, sqlite_url, "MIX", "--input", str(folder))
    assert proc.returncode == 1, proc.stderr
    assert error_lines(proc) == [
        f"error: {odd}: uint8 pixels, but this animal's sections are uint16 (e.g. S_001.ome.tif): refused; "
        "rerun with --convert-dtype uint16 to widen them (value x 257)"], proc.stderr
    recorded = rows(sqlite_url, "MIX")
    assert {name for name, _, _ in recorded} == {layout.extracted_name(p.name.removesuffix(".tif"), 0, c) for p in written for c in (1, 2)}
    assert {r.dtype for r in recorded.values()} == {"uint16"} and all(r.checksum for r in recorded.values())
    assert not list(layout.tif_dir.glob("S_004*"))
    before = snapshot(layout.tif_dir)

    proc = cli(root, sqlite_url, "MIX", "--input", str(folder), "--convert-dtype", "uint16")
    assert proc.returncode == 0, proc.stderr
    assert snapshot(layout.tif_dir).items() >= before.items(), "the good sections were rewritten"
    for channel in (1, 2):
        name = layout.extracted_name("S_004.ome", 0, channel)
        widened = tifffile.imread(layout.tif_dir / name)
        assert widened.dtype == np.uint16 and np.array_equal(widened, narrow[channel - 1].astype(np.uint16) * 257)
        row = rows(sqlite_url, "MIX")[(name, 0, channel)]
        assert row.dtype == "uint16" and row.checksum
    assert last_run(sqlite_url, "MIX").status == "success"


def test_slide_with_another_pixel_size_is_refused(tmp_path, sqlite_url):
    *_, odd = czi_slides(tmp_path / "data", "PIX", *({"channels": [image(n)], "scale_x": size, "scale_y": size}
                                                    for n, size in ((1, 0.325e-6), (2, 0.325e-6), (3, 0.325e-6), (4, 0.65e-6))))
    proc = cli(tmp_path / "data", sqlite_url, "PIX")
    assert proc.returncode == 1, proc.stderr
    assert error_lines(proc) == [
        f"error: {odd}: pixel size 0.65 um, but this animal's sections are 0.325 um (e.g. PIX_slide01.czi): refused; "
        "one volume needs one pixel size: remove the file or extract it as another animal"], proc.stderr
    with session_scope(init_db(sqlite_url)) as s:
        assert s.scalars(select(ScanRun).where(ScanRun.FK_prep_id == "PIX")).one().resolution == pytest.approx(0.325)
        assert sorted(sl.file_name for sl in s.scalars(select(Slide))) == ["PIX_slide01.czi", "PIX_slide02.czi", "PIX_slide03.czi"]
    layout = AnimalLayout(tmp_path / "data", "PIX")
    for n in (1, 2, 3):
        assert np.array_equal(tifffile.imread(layout.tif_dir / f"PIX_slide0{n}_S1_C1.tif"), image(n))
    assert not list(layout.tif_dir.glob("PIX_slide04*"))


# --------------------------------------------------------------------------------------- item 5
def test_time_series_is_recorded_and_the_time_point_chosen(tmp_path, db_url):
    frames = [image(20 + t) for t in range(2)]
    _, series = czi_slides(tmp_path / "data", "TS", {"channels": [image(1)]}, {"time_points": [[frames]]})
    root = tmp_path / "data"
    layout = AnimalLayout(root, "TS")
    single = layout.tif_dir / "TS_slide01_S1_C1.tif"
    out = layout.tif_dir / "TS_slide02_S1_C1.tif"

    proc = cli(root, db_url, "TS")
    assert proc.returncode == 0, proc.stderr
    assert (f"WARNING {series}: a time series (2 time points); extracted time point 0 only (choose another with "
            "--time-point N)") in proc.stderr.splitlines()
    assert np.array_equal(tifffile.imread(out), frames[0])
    row = rows(db_url, "TS")[("TS_slide02_S1_C1.tif", 0, 1)]
    assert (row.time_points, row.time_point) == (2, 0)
    kept = snapshot(layout.tif_dir)["TS_slide01_S1_C1.tif"]

    proc = cli(root, db_url, "TS", "--time-point", "1")
    assert proc.returncode == 0, proc.stderr
    assert "time series" not in proc.stderr
    assert np.array_equal(tifffile.imread(out), frames[1])
    row = rows(db_url, "TS")[("TS_slide02_S1_C1.tif", 0, 1)]
    assert (row.time_points, row.time_point) == (2, 1) and row.checksum
    assert snapshot(layout.tif_dir)["TS_slide01_S1_C1.tif"] == kept  # one time point only: nothing to choose
    chosen = snapshot(layout.tif_dir)

    proc = cli(root, db_url, "TS", "--time-point", "2")
    assert proc.returncode == 1
    assert error_lines(proc) == [f"error: {series}: --time-point 2 is out of range: the file has 2 time points (0-1)"]
    assert snapshot(layout.tif_dir) == chosen
    assert rows(db_url, "TS")[("TS_slide02_S1_C1.tif", 0, 1)].time_point == 1
    assert np.array_equal(tifffile.imread(single), image(1))


# --------------------------------------------------------------------------------------- item 6
def test_z_plane_out_of_range_or_failed_leaves_files_and_database_as_they_were(tmp_path, db_url):
    planes = [image(30 + z) for z in range(3)]
    _, stack = czi_slides(tmp_path / "data", "ZP", {"channels": [image(1)]}, {"z_planes": [[planes]]})
    root = tmp_path / "data"
    layout = AnimalLayout(root, "ZP")
    out = layout.tif_dir / "ZP_slide02_S1_C1.tif"

    assert cli(root, db_url, "ZP", "--z-plane", "2").returncode == 0
    assert np.array_equal(tifffile.imread(out), planes[2])
    assert rows(db_url, "ZP")[("ZP_slide02_S1_C1.tif", 0, 1)].z_plane == 2
    before = snapshot(layout.tif_dir)

    proc = cli(root, db_url, "ZP", "--z-plane", "3")  # was clamped to 2 and called a success
    assert proc.returncode == 1
    assert error_lines(proc) == [f"error: {stack}: --z-plane 3 is out of range: the file has 3 z planes (0-2)"]
    assert snapshot(layout.tif_dir) == before

    # plane 1 cannot be decoded: the run fails and the database keeps saying plane 2, as on disk
    corrupt_subblock(stack, next(b for b in subblocks(stack) if b.dims.get("Z") == 1))
    proc = cli(root, db_url, "ZP", "--z-plane", "1")
    assert proc.returncode == 1
    [line] = error_lines(proc)
    assert line.startswith(f"error: {stack}: scene 1 channel 1 z 1: cannot decode region"), line
    assert snapshot(layout.tif_dir) == before
    row = rows(db_url, "ZP")[("ZP_slide02_S1_C1.tif", 0, 1)]
    assert row.z_plane == 2 and row.checksum == last_checksum(db_url, root, out)
    assert last_run(db_url, "ZP").status == "failed"


def last_checksum(db_url: str, root: Path, path: Path) -> str:
    from db.queries import current_file

    with session_scope(init_db(db_url)) as s:
        return current_file(s, path.relative_to(root).as_posix()).checksum


# -------------------------------------------------------------------------------------- item 10
def test_text_file_named_czi_is_not_called_truncated(tmp_path, sqlite_url):
    [good] = czi_slides(tmp_path / "data", "TXT", {"channels": [image(1)]})
    text = good.parent / "TXT_slide02.czi"
    text.write_text("scanned on monday, slide 2 to follow\n")
    proc = cli(tmp_path / "data", sqlite_url, "TXT")
    assert proc.returncode == 1
    assert error_lines(proc) == [f"error: {text}: not a CZI file (37 bytes; it starts with b'scanned on', not b'ZISRAWFILE')"]
    assert "truncated" not in proc.stderr
    layout = AnimalLayout(tmp_path / "data", "TXT")
    assert np.array_equal(tifffile.imread(layout.tif_dir / "TXT_slide01_S1_C1.tif"), image(1))
    assert list(rows(sqlite_url, "TXT")) == [("TXT_slide01_S1_C1.tif", 0, 1)]


def test_every_pixel_zero_is_judged_at_full_resolution(tmp_path, sqlite_url):
    """Sparse dim pixels vanish in a 1/32 area-averaged uint8 thumbnail; they are not 'every pixel 0'."""
    dim = np.zeros(SHAPE, np.uint8)
    dim[::40, ::40] = 3
    [slide] = czi_slides(tmp_path / "data", "DIM", {"channels": [dim, np.zeros(SHAPE, np.uint8)]})
    proc = cli(tmp_path / "data", sqlite_url, "DIM")
    assert proc.returncode == 0, proc.stderr
    zero = [line for line in proc.stderr.splitlines() if "every pixel is 0" in line]
    assert zero == [f"WARNING {slide} (scene 1, channel 2): every pixel is 0 in the source file "
                    "(extracted as is; deactivate the section if it should not be used)"], proc.stderr
    layout = AnimalLayout(tmp_path / "data", "DIM")
    assert np.array_equal(tifffile.imread(layout.tif_dir / "DIM_slide01_S1_C1.tif"), dim)
    assert tifffile.imread(layout.thumbnail_original_dir / "DIM_slide01_S1_C1.tif").max() == 0  # what the old check looked at
    assert all(r.checksum for r in rows(sqlite_url, "DIM").values())
