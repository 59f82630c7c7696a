"""OME-Zarr converter: pyramid maths, store layout, options, memory cap, resume, validation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from pipeline.publish import pyramid
from pipeline.publish.omezarr import (
    OmeZarrError,
    OmeZarrOptions,
    convert_stack,
    decode_ranges,
    encode_ranges,
    list_slices,
    main,
    parse_ranges,
    read_attributes,
    xyz_triple,
    zyx,
)
from pipeline.publish.validate_omezarr import OmeZarrValidationError, validate_store

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


# ------------------------------------------------------------------------------------------
# helpers
def synthetic_stack(shape, dtype=np.uint16, rgb=False, seed=0, zero_rows=0) -> np.ndarray:
    """Smooth structure plus noise (compresses like tissue), zero rows at the top (background)."""
    z, y, x = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:y, 0:x]
    top = 200 if dtype == np.uint8 else 30000
    planes = []
    for k in range(z):
        base = (np.sin(yy / 9.0 + k) + np.cos(xx / 13.0 - k / 3)) * top / 5 + top / 2
        plane = np.clip(base + rng.integers(0, top // 20, size=(y, x)), 0, np.iinfo(dtype).max).astype(dtype)
        if rgb:
            plane = np.stack([plane, plane[::-1], np.roll(plane, 7, axis=1)], axis=-1)
        plane[:zero_rows] = 0
        planes.append(plane)
    return np.stack(planes)


def write_stack(folder: Path, stack: np.ndarray, compress_every: int = 2, **tags) -> list[Path]:
    """One TIFF per z named s1, s2, ... s10 (lexical order would put s10 before s2); every other
    one zlib-compressed so both reading paths (raw rows, decoded strips) are exercised."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, plane in enumerate(stack):
        path = folder / f"s{k + 1}.tif"
        kwargs = dict(tags)
        if compress_every and k % compress_every:
            kwargs.update(compression="zlib", rowsperstrip=8)
        if plane.ndim == 3:
            kwargs["photometric"] = "rgb"
        tifffile.imwrite(path, plane, **kwargs)
        paths.append(path)
    return paths


def levels(store: Path) -> list[np.ndarray]:
    group = zarr.open_group(store, mode="r")
    attrs = dict(group.attrs)
    ms = (attrs["ome"] if "ome" in attrs else attrs)["multiscales"][0]
    return [np.asarray(group[d["path"]][...]) for d in ms["datasets"]]


def multiscales(store: Path) -> dict:
    attrs = read_attributes(store)
    return (attrs["ome"] if "ome" in attrs else attrs)["multiscales"][0]


def factors_between(ms: dict) -> list[tuple[int, int, int]]:
    scales = [next(t["scale"] for t in d["coordinateTransformations"] if t["type"] == "scale")[-3:]
              for d in ms["datasets"]]
    return [tuple(int(round(b / a)) for a, b in zip(scales[i], scales[i + 1])) for i in range(len(scales) - 1)]


def chunk_files(array_dir: Path) -> list[Path]:
    return sorted(p for p in array_dir.rglob("*") if p.is_file() and not p.name.startswith((".z", "zarr.json")))


def small_options(**kw) -> OmeZarrOptions:
    kw.setdefault("chunk", (4, 16, 16))
    kw.setdefault("voxel_um", (20.0, 10.0, 10.0))
    kw.setdefault("threads", 2)
    return OmeZarrOptions(**kw)


# ------------------------------------------------------------------------------------------
# pure pyramid maths
def _naive_mean(block: np.ndarray, factor) -> np.ndarray:
    fz, fy, fx = factor
    shape = tuple(-(-n // f) for n, f in zip(block.shape, factor))
    out = np.empty(shape, block.dtype)
    for k in range(shape[0]):
        for i in range(shape[1]):
            for j in range(shape[2]):
                cell = block[k * fz:(k + 1) * fz, i * fy:(i + 1) * fy, j * fx:(j + 1) * fx]
                mean = Fraction(int(cell.astype(np.int64).sum()), cell.size)
                out[k, i, j] = round(mean)  # Python rounds halves to even, as np.rint does
    return out


@pytest.mark.parametrize("factor", [(1, 2, 2), (2, 2, 2)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_mean_is_the_rounded_block_mean_with_partial_edge_blocks(factor, dtype):
    rng = np.random.default_rng(1)
    block = rng.integers(0, np.iinfo(dtype).max, size=(5, 7, 9), dtype=dtype)
    block[0, 0, :4] = [1, 2, 1, 2]  # a block mean of exactly .5: rounds to even
    fast = pyramid.downsample(block, factor, "mean")
    assert np.array_equal(fast, _naive_mean(block, factor))
    if factor[0] == 1:  # the pipeline's area rule, plane by plane
        from pipeline.imaging.downsample import downsample_area

        assert np.array_equal(fast, np.stack([downsample_area(plane, 2) for plane in block]))
    # The float path (non-integer data) gives the same means before rounding.
    as_float = pyramid.downsample(block.astype(np.float32), factor, "mean")
    assert np.array_equal(np.rint(as_float).astype(dtype), fast)


def test_nearest_takes_the_first_voxel_of_each_block():
    block = np.arange(5 * 6 * 7, dtype=np.uint16).reshape(5, 6, 7)
    assert np.array_equal(pyramid.downsample(block, (2, 2, 2), "nearest"), block[::2, ::2, ::2])
    assert np.array_equal(pyramid.downsample(block, (1, 2, 2), "nearest"), block[:, ::2, ::2])


def test_gaussian_keeps_a_constant_and_smooths_an_impulse():
    flat = np.full((4, 8, 8), 1234, np.uint16)
    assert np.array_equal(pyramid.downsample(flat, (2, 2, 2), "gaussian"), np.full((2, 4, 4), 1234, np.uint16))
    impulse = np.zeros((4, 8, 8), np.uint16)
    impulse[2, 4, 4] = 60000
    mean = pyramid.downsample(impulse, (2, 2, 2), "mean")
    gauss = pyramid.downsample(impulse, (2, 2, 2), "gaussian")
    assert gauss.max() < mean.max() and np.count_nonzero(gauss) > np.count_nonzero(mean)


@pytest.mark.parametrize("algorithm", pyramid.ALGORITHMS)
def test_slabs_with_halo_reproduce_the_whole_level(algorithm):
    """What the slab engine computes piecewise equals the whole-volume downsample exactly."""
    rng = np.random.default_rng(2)
    volume = rng.integers(0, 65535, size=(9, 37, 41), dtype=np.uint16)
    factor = (2, 2, 2)
    whole = pyramid.downsample(volume, factor, algorithm)
    pieced = np.zeros_like(whole)
    for box in pyramid.plan_slabs(whole.shape, (2, 4, 8), 2 * 4 * 16):
        in_box, margin = pyramid.input_box(box, factor, volume.shape, algorithm)
        block = volume[tuple(slice(lo, hi) for lo, hi in in_box)]
        pieced[tuple(slice(lo, hi) for lo, hi in box)] = pyramid.downsample(block, factor, algorithm, margin)
    assert np.array_equal(pieced, whole)


def test_level_factors_halve_z_only_once_xy_caught_up():
    # 10 um pixels, 20 um sections: xy first, then all three.
    assert pyramid.level_factors((100, 512, 512), (20, 10, 10), 4) == [(1, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert pyramid.level_factors((100, 512, 512), (1, 1, 1), 3) == [(2, 2, 2), (2, 2, 2)]
    assert pyramid.level_factors((1, 512, 512), (1, 1, 1), 2) == [(1, 2, 2)]


def test_plan_slabs_tiles_the_volume_once_in_whole_units():
    shape, unit = (10, 50, 70), (4, 16, 16)
    slabs = pyramid.plan_slabs(shape, unit, 4 * 16 * 32)
    seen = np.zeros(shape, np.int32)
    for box in slabs:
        sizes = [hi - lo for lo, hi in box]
        assert np.prod(sizes) <= 4 * 16 * 32
        assert all(lo % u == 0 for (lo, _), u in zip(box, unit))
        seen[tuple(slice(lo, hi) for lo, hi in box)] += 1
    assert (seen == 1).all()
    with pytest.raises(ValueError):
        pyramid.plan_slabs(shape, unit, 100)


def test_ranges_are_parsed_in_xyz_order_and_progress_sets_round_trip():
    assert parse_ranges("10:20,:30,5:") == ((5, None), (None, 30), (10, 20))
    assert xyz_triple("64") == (64, 64, 64) and zyx(xyz_triple("128,96,8")) == (8, 96, 128)
    for indices in [set(), {0}, {0, 1, 2, 5, 7, 8}, set(range(1000)) - {500}]:
        assert decode_ranges(encode_ranges(indices)) == indices


# ------------------------------------------------------------------------------------------
# conversions
@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
@pytest.mark.parametrize("algorithm", pyramid.ALGORITHMS)
def test_levels_equal_stack_and_downsampling_of_previous(tmp_path, ngff, algorithm):
    stack = synthetic_stack((10, 45, 70), zero_rows=5)
    paths = write_stack(tmp_path / "tif", stack)
    store = tmp_path / "out.ome.zarr"
    # A tiny slab budget: several slabs per level, so slab edges (and gaussian halos) are exercised.
    result = convert_stack(list_slices(tmp_path / "tif"), store,
                           small_options(ngff_version=ngff, algorithm=algorithm, nlevels=4,
                                         slab_budget_bytes=400_000))
    assert [p.name for p in list_slices(tmp_path / "tif")] == [p.name for p in paths]
    assert result.slabs_written > 4
    data = levels(store)
    assert np.array_equal(data[0], stack)
    ms = multiscales(store)
    for i, factor in enumerate(factors_between(ms)):
        assert np.array_equal(data[i + 1], pyramid.downsample(data[i], factor, algorithm)), f"level {i + 1}"
    assert factors_between(ms) == [(1, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert [a.get("unit") for a in ms["axes"]] == ["micrometer"] * 3
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [20.0, 10.0, 10.0]
    # Independent schema check with ome-zarr-models, for the version on disk.
    if ngff == "0.5":
        from ome_zarr_models.v05.image import Image

        assert (store / "zarr.json").is_file() and not (store / ".zgroup").exists()
        assert json.loads((store / "0" / "zarr.json").read_text())["dimension_names"] == ["z", "y", "x"]
    else:
        from ome_zarr_models.v04.image import Image

        assert json.loads((store / "0" / ".zarray").read_text())["dimension_separator"] == "/"
        assert ms["version"] == "0.4"
    Image.from_zarr(zarr.open_group(store, mode="r"))
    report = validate_store(store, expect_levels=4)
    assert report.ngff_version == ngff
    assert read_attributes(store)["slidepipe"]["done"] is True


def test_validation_catches_a_broken_store(tmp_path):
    stack = synthetic_stack((4, 20, 20))
    write_stack(tmp_path / "tif", stack)
    store = tmp_path / "bad.ome.zarr"
    convert_stack(list_slices(tmp_path / "tif"), store, small_options(nlevels=2))
    good = read_attributes(store)

    def broken(edit) -> None:
        attrs = json.loads(json.dumps(good))
        edit(attrs["ome"]["multiscales"][0])
        (store / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs}))
        with pytest.raises(OmeZarrValidationError):
            validate_store(store)

    broken(lambda ms: ms["axes"][1].update(type="time"))  # time between space axes: schema error
    broken(lambda ms: ms["datasets"][1]["coordinateTransformations"][0].update(scale=[20.0, 10.0]))  # wrong length
    broken(lambda ms: ms["datasets"][1]["coordinateTransformations"][0].update(scale=[20.0, 40.0, 40.0]))  # shape


def test_rgb_stack_is_one_czyx_image_with_three_channels(tmp_path):
    stack = synthetic_stack((4, 30, 34), dtype=np.uint8, rgb=True)
    write_stack(tmp_path / "tif", stack)
    store = tmp_path / "rgb.ome.zarr"
    convert_stack(list_slices(tmp_path / "tif"), store, small_options(nlevels=2))
    data = levels(store)
    assert np.array_equal(data[0], np.moveaxis(stack, -1, 0))
    expected = np.stack([pyramid.downsample(data[0][c], (1, 2, 2)) for c in range(3)])
    assert np.array_equal(data[1], expected)
    attrs = read_attributes(store)["ome"]
    assert [a["name"] for a in attrs["multiscales"][0]["axes"]] == ["c", "z", "y", "x"]
    assert [c["color"] for c in attrs["omero"]["channels"]] == ["FF0000", "00FF00", "0000FF"]
    validate_store(store, expect_levels=2)


def test_windows_given_or_from_the_data(tmp_path):
    stack = synthetic_stack((4, 32, 32), zero_rows=8)
    write_stack(tmp_path / "tif", stack)
    store = tmp_path / "w.ome.zarr"
    convert_stack(list_slices(tmp_path / "tif"), store, small_options(nlevels=2))
    window = read_attributes(store)["ome"]["omero"]["channels"][0]["window"]
    nonzero = stack[stack > 0]
    assert abs(window["start"] - np.percentile(nonzero, 0.5)) < 0.02 * nonzero.max()
    assert abs(window["end"] - np.percentile(nonzero, 99.5)) < 0.02 * nonzero.max()
    store2 = tmp_path / "w2.ome.zarr"
    convert_stack(list_slices(tmp_path / "tif"), store2, small_options(nlevels=2, windows=[(100, 2000)]))
    window = read_attributes(store2)["ome"]["omero"]["channels"][0]["window"]
    assert (window["start"], window["end"]) == (100.0, 2000.0)


def test_pixel_size_from_tiff_tags(tmp_path):
    stack = synthetic_stack((3, 16, 16))
    # 0.5 um pixels as pixels per centimetre; ImageJ z spacing 4 um.
    write_stack(tmp_path / "tif", stack, compress_every=0, resolution=(20000, 20000), resolutionunit=3,
                imagej=True, metadata={"spacing": 4.0, "unit": "micron"})
    store = tmp_path / "t.ome.zarr"
    convert_stack(list_slices(tmp_path / "tif"), store, OmeZarrOptions(nlevels=1, chunk=(4, 16, 16)))
    assert multiscales(store)["datasets"][0]["coordinateTransformations"][0]["scale"] == pytest.approx([4.0, 0.5, 0.5])


def test_ranges_convert_a_sub_box_placed_by_a_translation(tmp_path):
    stack = synthetic_stack((8, 40, 50))
    write_stack(tmp_path / "tif", stack)
    store = tmp_path / "r.ome.zarr"
    rc = main([str(tmp_path / "tif"), str(store), "--ranges", "10:42,5:37,2:7", "--chunk-size", "16,16,4",
               "--nlevels", "2", "--resolution-xy", "10", "--resolution-z", "20"])
    assert rc == 0
    data = levels(store)
    assert np.array_equal(data[0], stack[2:7, 5:37, 10:42])
    assert np.array_equal(data[1], pyramid.downsample(data[0], (1, 2, 2)))
    transforms = multiscales(store)["datasets"][0]["coordinateTransformations"]
    assert transforms[1] == {"type": "translation", "translation": [40.0, 50.0, 100.0]}
    assert main([str(tmp_path / "tif"), str(tmp_path / "e.ome.zarr"), "--ranges", "60:70,:,:"]) == 1


def test_first_new_level_adds_levels_from_the_last_existing_one(tmp_path):
    stack = synthetic_stack((8, 64, 64))
    write_stack(tmp_path / "tif", stack)
    store = tmp_path / "f.ome.zarr"
    common = ["--chunk-size", "16,16,4", "--resolution-xy", "10", "--resolution-z", "20"]
    assert main([str(tmp_path / "tif"), str(store), "--nlevels", "2", *common]) == 0
    kept = {p: p.stat().st_mtime_ns for p in chunk_files(store / "0") + chunk_files(store / "1")}
    level1 = levels(store)[1].copy()
    assert main([str(store), "--first-new-level", "2", "--nlevels", "4", "--algorithm", "nearest"]) == 0
    data = levels(store)
    assert len(data) == 4
    assert np.array_equal(data[1], level1)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # levels 0 and 1 were not rewritten
    ms = multiscales(store)
    for i in (1, 2):
        assert np.array_equal(data[i + 1], pyramid.downsample(data[i], factors_between(ms)[i], "nearest"))
    validate_store(store, expect_levels=4)
    # Recompute from level 1 with another algorithm: level 1 itself is kept.
    assert main([str(store), "--first-new-level", "2", "--nlevels", "3"]) == 0
    data = levels(store)
    assert len(data) == 3 and not (store / "3").exists()
    assert np.array_equal(data[2], pyramid.downsample(data[1], factors_between(multiscales(store))[1], "mean"))


def test_existing_store_is_refused_without_overwrite(tmp_path, capsys):
    stack = synthetic_stack((4, 32, 32))
    write_stack(tmp_path / "tif", stack)
    store = tmp_path / "o.ome.zarr"
    args = [str(tmp_path / "tif"), str(store), "--chunk-size", "16,16,4", "--nlevels", "2"]
    assert main(args) == 0
    mtimes = {p: p.stat().st_mtime_ns for p in chunk_files(store)}
    # The same conversion again: nothing to redo, nothing rewritten.
    assert main(args) == 0
    assert "complete" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    # Other options on the same store: refused with a clear message, store untouched.
    assert main(args[:2] + ["--chunk-size", "8,8,4", "--nlevels", "2"]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert main(args[:2] + ["--chunk-size", "8,8,4", "--nlevels", "2", "--overwrite"]) == 0
    assert json.loads((store / "0" / "zarr.json").read_text())["chunk_grid"]["configuration"]["chunk_shape"] == [4, 8, 8]
    # A directory that is not a zarr store is never deleted, even with --overwrite.
    other = tmp_path / "notes.zarr"
    other.mkdir()
    (other / "thesis.txt").write_text("precious")
    assert main([str(tmp_path / "tif"), str(other), "--overwrite"]) == 1
    assert (other / "thesis.txt").read_text() == "precious"
    assert main([str(tmp_path / "tif"), str(tmp_path / "no-suffix")]) == 1


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_all_zero_chunks_are_not_written(tmp_path, ngff):
    stack = synthetic_stack((8, 64, 64))
    stack[:, :32, :] = 0  # the top two chunk rows are background
    stack[4:, :, 48:] = 0  # and the right chunk column of the second chunk layer
    write_stack(tmp_path / "tif", stack)
    store = tmp_path / "z.ome.zarr"
    convert_stack(list_slices(tmp_path / "tif"), store, small_options(ngff_version=ngff, nlevels=1))
    expected = sum(
        1
        for z in range(0, 8, 4) for y in range(0, 64, 16) for x in range(0, 64, 16)
        if stack[z:z + 4, y:y + 16, x:x + 16].any()
    )
    assert expected == 2 * 2 * 4 - 2  # 16 chunks hold data, 2 of those are zero on the right
    assert len(chunk_files(store / "0")) == expected
    assert np.array_equal(levels(store)[0], stack)


def test_sharded_v3_store(tmp_path):
    stack = synthetic_stack((8, 64, 64), zero_rows=40)
    write_stack(tmp_path / "tif", stack)
    store = tmp_path / "s.ome.zarr"
    convert_stack(list_slices(tmp_path / "tif"), store,
                  small_options(nlevels=2, shard=(8, 32, 32), slab_budget_bytes=500_000))
    meta = json.loads((store / "0" / "zarr.json").read_text())
    assert meta["codecs"][0]["name"] == "sharding_indexed"
    assert meta["codecs"][0]["configuration"]["chunk_shape"] == [4, 16, 16]
    # 2 x 2 shards of 32x32; the top row of shards is all zero and is not written.
    assert len(chunk_files(store / "0")) == 2
    data = levels(store)
    assert np.array_equal(data[0], stack)
    assert np.array_equal(data[1], pyramid.downsample(stack, (1, 2, 2)))
    validate_store(store, expect_levels=2)
    with pytest.raises(OmeZarrError, match="Zarr v3"):
        convert_stack(list_slices(tmp_path / "tif"), tmp_path / "s4.zarr",
                      small_options(ngff_version="0.4", shard=(8, 32, 32)))


def test_zarr_only_writes_one_plain_array(tmp_path):
    stack = synthetic_stack((5, 30, 40))
    write_stack(tmp_path / "tif", stack)
    store = tmp_path / "plain.zarr"
    assert main([str(tmp_path / "tif"), str(store), "--zarr-only", "--chunk-size", "16,16,4"]) == 0
    array = zarr.open_array(store, mode="r")
    assert np.array_equal(array[...], stack)
    assert "ome" not in read_attributes(store) and "multiscales" not in read_attributes(store)
    assert not (store / "0").exists()


def test_mismatched_slices_are_named(tmp_path):
    stack = synthetic_stack((3, 20, 20))
    write_stack(tmp_path / "tif", stack)
    tifffile.imwrite(tmp_path / "tif" / "s2.tif", np.zeros((20, 21), np.uint16))
    with pytest.raises(OmeZarrError, match="s2.tif"):
        convert_stack(list_slices(tmp_path / "tif"), tmp_path / "m.zarr", small_options())


def test_create_pipeline_tiff2omezarr_subcommand(tmp_path):
    from pipeline.create_pipeline import main as cli

    stack = synthetic_stack((3, 20, 20))
    write_stack(tmp_path / "tif", stack)
    store = tmp_path / "cli.ome.zarr"
    assert cli(["tiff2omezarr", str(tmp_path / "tif"), str(store), "--ngff-version", "0.4", "--nlevels", "2"]) == 0
    assert validate_store(store).ngff_version == "0.4"


# ------------------------------------------------------------------------------------------
# memory cap and resume: real subprocesses
def _run_converter(args: list[str], **kw) -> subprocess.Popen:
    """The converter in its own process, printing its peak RSS (bytes) on the last line.

    The peak is VmHWM of /proc/self/status, the high-water mark of this process's own memory
    map: ru_maxrss would also count the parent's RSS at fork time (kept across exec on Linux).
    """
    code = ("import re, sys\n"
            "from pipeline.publish.omezarr import main\n"
            "rc = main(sys.argv[1:])\n"
            "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
            "print('PEAK_RSS', int(hwm) * 1024)\n"
            "sys.exit(rc)\n")
    return subprocess.Popen([PYTHON, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["mean", "gaussian"])
def test_max_gb_caps_peak_rss_on_a_volume_larger_than_the_cap(tmp_path, algorithm):
    cap_gb = 0.25
    stack = synthetic_stack((24, 1600, 1600), seed=3)  # 123 MB uint16 ...
    stack = np.concatenate([stack, stack[:, ::-1]], axis=2)  # ... 246 MB ...
    write_stack(tmp_path / "tif", stack)
    write_stack(tmp_path / "tif2", stack[:8])
    for k, path in enumerate(list_slices(tmp_path / "tif2")):  # ... + 8 more slices: 328 MB
        path.rename(tmp_path / "tif" / f"s{25 + k}.tif")
    total = stack.nbytes * 32 // 24
    del stack
    store = tmp_path / "big.ome.zarr"
    proc = _run_converter([str(tmp_path / "tif"), str(store), "--max-gb", str(cap_gb), "--chunk-size", "32",
                           "--algorithm", algorithm, "--resolution-xy", "1", "--resolution-z", "1"])
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    peak = int(out.strip().splitlines()[-1].split()[1])
    print(f"volume {total / 1e6:.0f} MB + pyramid, cap {cap_gb * 1e3:.0f} MB, peak RSS {peak / 1e6:.0f} MB")
    assert total > 1.25 * cap_gb * 1e9 and peak <= cap_gb * 1e9
    # The capped run is still correct.
    group = zarr.open_group(store, mode="r")
    level0 = group["0"]
    planes = list_slices(tmp_path / "tif")
    for k in (0, 11, 23, 31):
        assert np.array_equal(level0[k], tifffile.imread(planes[k]))
    assert validate_store(store).shapes[0] == (32, 1600, 3200)


@pytest.mark.slow
def test_max_gb_too_small_is_a_clear_error(tmp_path):
    write_stack(tmp_path / "tif", synthetic_stack((2, 16, 16)))
    proc = _run_converter([str(tmp_path / "tif"), str(tmp_path / "x.zarr"), "--max-gb", "0.05"])
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "--max-gb 0.05" in err


def test_a_default_cap_the_process_already_exceeds_leaves_the_slabs_a_floor_instead_of_refusing():
    """The omezarr stage's default --max-gb (STAGE_MAX_GB) must not refuse to run in a process
    that already holds more (--task all after align loaded itk): its slabs get MIN_SLAB_BUDGET.
    The same cap given by the user is refused, as before."""
    from pipeline.publish.omezarr.planning import MIN_SLAB_BUDGET, memory_budget, process_rss

    tiny = process_rss() / 2 / 1e9  # half of what this process holds
    assert memory_budget(tiny, strict=False) == MIN_SLAB_BUDGET
    with pytest.raises(OmeZarrError, match="below what the converter needs"):
        memory_budget(tiny, strict=True)
    roomy = (process_rss() + 2 * MIN_SLAB_BUDGET) / 1e9 + 0.2
    assert memory_budget(roomy, strict=False) == memory_budget(roomy, strict=True) > MIN_SLAB_BUDGET


def test_the_stage_caps_the_converter_at_its_default_unless_told():
    from pipeline.stages.omezarr import STAGE_MAX_GB

    assert 0 < STAGE_MAX_GB <= 1.0  # issue 8: <= 1 GB per process, whatever the section size


def test_verification_holds_one_row_of_expected_blocks_at_a_time():
    """The background boxes of a layer of a 30000 x 20000 section are gigabytes together (measured:
    the stage's level-0 check rose to 1.09 GB before): `_in_rows` computes a row only when the
    previous row has been consumed."""
    from pipeline.publish.validate_omezarr import _in_rows

    calls = []

    def expected(boxes):
        calls.append(len(boxes))
        return [np.zeros(1) for _ in boxes]

    boxes = [((0, 1), (y, y + 1), (x, x + 1)) for y in range(3) for x in range(4)]
    rows = _in_rows(expected, boxes)
    first = [next(rows) for _ in range(4)]
    assert [i for i, _ in first] == [0, 1, 2, 3] and calls == [4]
    assert [i for i, _ in rows] == list(range(4, 12)) and calls == [4, 4, 4]


@pytest.mark.slow
@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_killed_conversion_resumes_to_the_same_result(tmp_path, ngff):
    stack = synthetic_stack((48, 400, 400), seed=4, zero_rows=64)
    write_stack(tmp_path / "tif", stack)
    args = ["--chunk-size", "64,64,4", "--nlevels", "3", "--ngff-version", ngff, "--threads", "1",
            "--resolution-xy", "10", "--resolution-z", "20"]
    store = tmp_path / "killed.ome.zarr"
    proc = _run_converter([str(tmp_path / "tif"), str(store), *args])
    done_at_kill: set[int] = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            state = read_attributes(store).get("slidepipe", {})
        except (OSError, ValueError):  # not created yet
            state = {}
        done = decode_ranges(state.get("levels", {}).get("0", {}).get("done", ""))
        if len(done) >= 3:
            os.kill(proc.pid, signal.SIGKILL)
            done_at_kill = done
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the conversion finished before it could be killed"
    state = read_attributes(store)["slidepipe"]
    assert state["done"] is False and 3 <= len(done_at_kill) < 12
    rerun = _run_converter([str(tmp_path / "tif"), str(store), *args])
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert "resumed" in out
    skipped = int(out.split(" slabs written, ")[1].split()[0])
    assert skipped >= len(done_at_kill)
    clean = tmp_path / "clean.ome.zarr"
    assert main([str(tmp_path / "tif"), str(clean), *args]) == 0
    for a, b in zip(levels(store), levels(clean)):
        assert np.array_equal(a, b)
    assert [p.relative_to(store) for p in chunk_files(store)] == [p.relative_to(clean) for p in chunk_files(clean)]
    assert read_attributes(store)["slidepipe"]["done"] is True


# ------------------------------------------------------------------------------------------
# the omezarr stage through the real CLI (aligned stack placed by the test at the aligned paths)
STAGE_ANIMAL = "OZ1"


def seed_scan_run(db_url: str, sections: int, channels: int = 1, resolution_um: float = 0.325,
                  z_um: float = 20.0) -> None:
    from tests.helpers_db import seed_sections

    seed_sections(db_url, STAGE_ANIMAL, sections, channels=channels, resolution_um=resolution_um, z_um=z_um)


def place_aligned_stack(layout, stack: np.ndarray, channel: int = 1, downsample: bool = True,
                        db_url: str | None = None) -> list[Path]:
    """The stack written at the aligned paths of the seeded sections (slide1_S1, ...) and, with
    `db_url`, recorded as align's outputs (publishing trusts only recorded, unchanged files)."""
    from pipeline.layout import section_key
    from tests.helpers_db import record_outputs

    paths = []
    for i, section in enumerate(stack):
        path = layout.aligned(channel, downsample, section_key("slide1", i))
        path.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(path, section, compression="zlib")
        paths.append(path)
    if db_url:
        record_outputs(db_url, layout.data_root, paths)
    return paths


def stage_cli(tmp_path, db_url, *extra) -> int:
    from pipeline.create_pipeline import main as cli

    return cli(["--animal", STAGE_ANIMAL, "--task", "omezarr", "--data-root", str(tmp_path / "data"),
                "--db-url", db_url, "--workers", "2", *extra])


def last_runs(db_url, count: int = 1):
    from sqlalchemy import select

    from db.models import PipelineRun
    from db.session import init_db, session_scope

    engine = init_db(db_url)
    with session_scope(engine) as s:
        runs = list(s.scalars(select(PipelineRun).where(PipelineRun.stage != "web")  # web: the pages after it
                              .order_by(PipelineRun.id.desc()).limit(count)))
        for run in runs:
            s.expunge(run)
    engine.dispose()
    return runs


@pytest.mark.slow
def test_stage_publishes_validates_records_and_skips(tmp_path, db_url):
    from sqlalchemy import select

    from db.models import FileLog
    from db.queries import how_was_made
    from db.session import init_db, session_scope
    from pipeline.layout import AnimalLayout

    layout = AnimalLayout(tmp_path / "data", STAGE_ANIMAL)
    seed_scan_run(db_url, 6)
    stack = synthetic_stack((6, 90, 130), zero_rows=10)
    paths = place_aligned_stack(layout, stack, db_url=db_url)
    assert stage_cli(tmp_path, db_url, "--channel", "1", "--chunk-size", "32,32,2", "--nlevels", "3") == 0
    store = layout.omezarr(1, downsample=True)
    assert store.name == "C1T.ome.zarr"
    data = levels(store)
    assert np.array_equal(data[0], stack)
    ms = multiscales(store)
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == pytest.approx([20.0, 10.4, 10.4])
    for i, factor in enumerate(factors_between(ms)):
        assert np.array_equal(data[i + 1], pyramid.downsample(data[i], factor, "mean"))
    assert json.loads((store / "0" / "zarr.json").read_text())["chunk_grid"]["configuration"]["chunk_shape"] == [2, 32, 32]
    assert validate_store(store, expect_levels=3).ngff_version == "0.5"
    run = last_runs(db_url)[0]
    assert (run.stage, run.status, run.tasks_run) == ("omezarr", "success", 1)
    engine = init_db(db_url)
    with session_scope(engine) as s:
        rows = s.scalars(select(FileLog).where(FileLog.FK_pipeline_run_id == run.id)).all()
        assert [r.path for r in rows] == [layout.relative(store)], "one row for the store, not one per chunk"
        row = rows[0]
        assert sorted(i.path for i in row.inputs) == sorted(layout.relative(p) for p in paths)
        manifest = json.loads(row.result)
        assert [lv["shape"] for lv in manifest["levels"]] == [list(a.shape) for a in data]
        assert sum(lv["files"] for lv in manifest["levels"]) == sum(len(chunk_files(store / str(i))) + 1
                                                                      for i in range(3))
        chunk = chunk_files(store / "1")[0]
        answer = how_was_made(s, layout.relative(chunk))
        assert answer["recorded_path"] == layout.relative(store) and answer["run"]["stage"] == "omezarr"
    engine.dispose()
    # Re-run: nothing to do.
    mtime = (store / "zarr.json").stat().st_mtime_ns
    assert stage_cli(tmp_path, db_url, "--channel", "1", "--chunk-size", "32,32,2", "--nlevels", "3") == 0
    run = last_runs(db_url)[0]
    assert (run.tasks_run, run.tasks_skipped) == (0, 1)
    assert (store / "zarr.json").stat().st_mtime_ns == mtime
    # A changed section: the store is rebuilt from the new stack.
    stack[3] = stack[3][::-1]
    tifffile.imwrite(paths[3], stack[3], compression="zlib")
    from tests.helpers_db import record_outputs

    record_outputs(db_url, layout.data_root, [paths[3]])  # as align would
    assert stage_cli(tmp_path, db_url, "--channel", "1", "--chunk-size", "32,32,2", "--nlevels", "3") == 0
    assert last_runs(db_url)[0].tasks_run == 1
    assert np.array_equal(levels(store)[0], stack)


@pytest.mark.slow
def test_stage_full_resolution_ngff_04_window_from_the_published_data(tmp_path, sqlite_url):
    from pipeline.imaging.contrast import window_from_histogram
    from pipeline.layout import AnimalLayout

    layout = AnimalLayout(tmp_path / "data", STAGE_ANIMAL)
    seed_scan_run(sqlite_url, 4, channels=2)
    stack = synthetic_stack((4, 70, 50), seed=5)
    place_aligned_stack(layout, stack, channel=2, downsample=False, db_url=sqlite_url)
    counts = np.bincount(stack.ravel(), minlength=65536)
    counts[:3000] = 0  # a histogram stage file that differs from the data: it must not be used (13.3)
    hist = layout.histogram_data(2, downsample=False)
    hist.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(hist, counts=counts)
    assert stage_cli(tmp_path, sqlite_url, "--channel", "2", "--downsample", "false", "--ngff-version", "0.4",
                     "--nlevels", "2", "--algorithm", "gaussian") == 0
    store = layout.omezarr(2, downsample=False)
    assert store.name == "C2.ome.zarr" and (store / ".zgroup").is_file()
    assert validate_store(store).ngff_version == "0.4"
    attrs = read_attributes(store)
    assert attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == [20.0, 0.325, 0.325]
    channel = attrs["omero"]["channels"][0]
    assert channel["label"] == "C2"
    own = np.bincount(stack.ravel(), minlength=65536)
    expected = window_from_histogram(own, np.arange(own.size + 1))  # the published voxels' own window
    assert (channel["window"]["start"], channel["window"]["end"]) == expected
    data = levels(store)
    assert np.array_equal(data[0], stack)
    assert np.array_equal(data[1], pyramid.downsample(data[0], (1, 2, 2), "gaussian"))
    # A new histogram stage file changes nothing: the store is current, its window stays.
    mtimes = {p: p.stat().st_mtime_ns for p in chunk_files(store / "0")}
    counts[:5000] = 0
    np.savez_compressed(hist, counts=counts)
    assert stage_cli(tmp_path, sqlite_url, "--channel", "2", "--downsample", "false", "--ngff-version", "0.4",
                     "--nlevels", "2", "--algorithm", "gaussian") == 0
    window = read_attributes(store)["omero"]["channels"][0]["window"]
    assert (window["start"], window["end"]) == expected
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes

@pytest.mark.slow
def test_stage_reports_missing_aligned_sections(tmp_path, sqlite_url, capsys):
    from pipeline.layout import AnimalLayout

    layout = AnimalLayout(tmp_path / "data", STAGE_ANIMAL)
    seed_scan_run(sqlite_url, 3)
    place_aligned_stack(layout, synthetic_stack((2, 20, 20)), db_url=sqlite_url)
    assert stage_cli(tmp_path, sqlite_url, "--channel", "1") == 1
    assert "1 of 3 aligned sections cannot be published (slide1_S3 is missing)" in capsys.readouterr().err
    assert last_runs(sqlite_url)[0].status == "failed"


# ------------------------------------------------------------------------------------------
# viewing: Neuroglancer in headless Chromium draws what the converter wrote, served by Apache
@pytest.mark.browser
@pytest.mark.apache
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("variant", ["0.5", "0.5-sharded", "0.4"])
def test_headless_chromium_renders_the_omezarr_served_by_apache(variant):
    """Level 0 one screen pixel per voxel is the section exactly; zoomed out 2x, Neuroglancer
    switches to level 1 and draws the converter's mean-downsampled level exactly (not a sampling
    of level 0), so the pyramid's scales are read as written."""
    from apache.launcher import ApacheServer
    from pipeline.layout import AnimalLayout
    from tests.helpers_browser import (asymmetric_section, best_match, chromium_driver, one_to_one,
                                       render_with_python_viewer, require_apache, require_chromium, servable_dir)
    from web.state import build_state

    require_apache()
    require_chromium()
    height, width, shown, size = 96, 128, 1, (256, 192)
    sections = np.stack([asymmetric_section(height, width, seed=z) for z in range(3)])
    ngff, sharded = variant.split("-")[0], variant.endswith("sharded")
    with servable_dir() as served:
        root = served / "data"
        paths = write_stack(served / "tif", sections)
        store = AnimalLayout(root, "OZB").omezarr(1, downsample=False)
        convert_stack(paths, store, OmeZarrOptions(
            ngff_version=ngff, chunk=(1, 32, 32), shard=(1, 64, 64) if sharded else None, nlevels=2,
            voxel_um=(20.0, 0.325, 0.325), threads=2))
        level1 = levels(store)[1]
        assert not np.array_equal(level1[shown], sections[shown][::2, ::2]), "level 1 must differ from a sampling"
        with chromium_driver() as driver, ApacheServer(root) as server:
            state = build_state(root, "OZB", server.url, layer_source="omezarr", windows={1: (0, 255)})
            assert state["layers"][0]["source"].startswith(f"zarr{3 if ngff == '0.5' else 2}://")
            full = render_with_python_viewer(driver, one_to_one(state, section=shown), size, timeout=120)
            zoomed_out = one_to_one(state, section=shown)
            zoomed_out["crossSectionScale"] = 2
            half = render_with_python_viewer(driver, zoomed_out, size, timeout=120)
    assert full is not None and half is not None, "Neuroglancer did not finish loading the chunks served by Apache"
    score, (y, x) = best_match(full[..., 0], sections[shown])
    assert score > 0.999
    assert np.array_equal(full[y:y + height, x:x + width, 0], sections[shown])
    score, (y, x) = best_match(half[..., 0], level1[shown])
    assert score > 0.999
    assert np.array_equal(half[y:y + height // 2, x:x + width // 2, 0], level1[shown])


def test_first_new_level_on_a_store_written_by_ome_zarr_py(tmp_path):
    from ome_zarr.writer import write_image

    stack = synthetic_stack((4, 64, 96))
    store = tmp_path / "foreign.ome.zarr"
    group = zarr.open_group(str(store), mode="w")
    write_image(stack, group, scale_factors=[2], axes="zyx", storage_options={"chunks": (4, 32, 32)},
                scale={"z": 20.0, "y": 1.0, "x": 1.0})
    level1 = levels(store)[1].copy()
    assert main([str(store), "--first-new-level", "2", "--nlevels", "4"]) == 0
    data = levels(store)
    assert len(data) == 4 and np.array_equal(data[1], level1)
    factors = factors_between(multiscales(store))
    for i in (1, 2):
        assert np.array_equal(data[i + 1], pyramid.downsample(data[i], factors[i], "mean"))
    validate_store(store, expect_levels=4)


# ------------------------------------------------------------------------------------------
# level placement, metadata that follows the options, data verification (issue 13 items 2, 4, 5)
def physical_centroid(store: Path, level: int) -> np.ndarray:
    """Intensity-weighted centre of a level's voxels in physical (z, y, x) micrometres, from the
    store's own multiscales metadata (NGFF: voxel centres at scale * index + translation)."""
    data = levels(store)[level].astype(np.float64)
    transforms = multiscales(store)["datasets"][level]["coordinateTransformations"]
    scale = np.array(next(t["scale"] for t in transforms if t["type"] == "scale"))
    translation = np.array(next((t["translation"] for t in transforms if t["type"] == "translation"), [0.0] * 3))
    index = np.array([(data.sum(axis=tuple(a for a in range(3) if a != axis)) * np.arange(n)).sum()
                      for axis, n in enumerate(data.shape)]) / data.sum()
    return index * scale + translation


@pytest.mark.parametrize("algorithm", pyramid.ALGORITHMS)
def test_a_feature_lies_at_its_physical_position_at_every_level(tmp_path, algorithm):
    """A bright cube whose edges fall on block edges of every level: its centroid in physical
    units must be the same at every level (without per-level translations level k sits
    (2^k - 1) / 2 level-0 voxels towards the origin)."""
    stack = np.zeros((12, 64, 64), np.uint16)
    stack[4:8, 24:40, 16:32] = 40000
    write_stack(tmp_path / "tif", stack)
    store = tmp_path / "p.ome.zarr"
    convert_stack(list_slices(tmp_path / "tif"), store, small_options(nlevels=4, algorithm=algorithm))
    assert factors_between(multiscales(store)) == [(1, 2, 2), (2, 2, 2), (2, 2, 2)]
    # Level 0: cube centre at voxel (5.5, 31.5, 23.5) of (20, 10, 10) um voxels.
    assert physical_centroid(store, 0) == pytest.approx([110.0, 315.0, 235.0])
    for level in (1, 2, 3):
        assert physical_centroid(store, level) == pytest.approx([110.0, 315.0, 235.0], abs=1e-6), f"level {level}"
    validate_store(store, expect_levels=4)


def test_levels_are_placed_as_ome_zarr_py_places_them(tmp_path):
    """ome-zarr-py (0.18) writes translation (f - 1) / 2 * voxel for a level made by a factor f;
    ours for the same pyramid is the same."""
    from ome_zarr.writer import write_image

    stack = synthetic_stack((4, 64, 96))
    theirs = tmp_path / "theirs.ome.zarr"
    write_image(stack, zarr.open_group(str(theirs), mode="w"), scale_factors=[2, 4], axes="zyx",
                scale={"z": 20.0, "y": 1.0, "x": 1.0})
    write_stack(tmp_path / "tif", stack)
    ours = tmp_path / "ours.ome.zarr"
    convert_stack(list_slices(tmp_path / "tif"), ours, small_options(nlevels=3, voxel_um=(20.0, 1.0, 1.0)))

    def transforms(store):
        return [{t["type"]: t[t["type"]] for t in d["coordinateTransformations"]} for d in multiscales(store)["datasets"]]

    assert transforms(ours) == transforms(theirs)
    assert transforms(ours)[2] == {"scale": [20.0, 4.0, 4.0], "translation": [0.0, 1.5, 1.5]}


def test_changed_metadata_is_rewritten_and_changed_factors_rebuild(tmp_path):
    """The completion signature covers everything that defines the store: a new voxel size
    with the same level factors, a new name or window rewrites the metadata only; a voxel size
    that changes the factors rebuilds the levels."""
    stack = synthetic_stack((8, 64, 64), zero_rows=8)
    write_stack(tmp_path / "tif", stack)
    store = tmp_path / "m.ome.zarr"
    paths = list_slices(tmp_path / "tif")
    convert_stack(paths, store, small_options(nlevels=3, voxel_um=(20.0, 10.4, 10.4)))
    mtimes = {p: p.stat().st_mtime_ns for p in chunk_files(store)}

    def level_transforms():
        return [d["coordinateTransformations"] for d in multiscales(store)["datasets"]]

    # 0.325 um -> 0.4 um pixels (x 32 thumbnails): still (1, 2, 2) then (2, 2, 2).
    result = convert_stack(paths, store, small_options(nlevels=3, voxel_um=(20.0, 12.8, 12.8), name="renamed",
                                                       windows=[(10, 20000)], overwrite=True))
    assert result.status == "metadata"
    assert level_transforms()[0][0]["scale"] == [20.0, 12.8, 12.8]
    scale, translation = level_transforms()[2]
    assert scale["scale"] == pytest.approx([40.0, 51.2, 51.2])
    assert translation["translation"] == pytest.approx([10.0, 19.2, 19.2])
    assert multiscales(store)["name"] == "renamed"
    assert read_attributes(store)["ome"]["omero"]["channels"][0]["window"]["end"] == 20000.0
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes, "voxels are not rewritten for metadata"
    again = convert_stack(paths, store, small_options(nlevels=3, voxel_um=(20.0, 12.8, 12.8), name="renamed",
                                                      windows=[(10, 20000)]))
    assert again.status == "complete"
    # Back to no window: the one from the data, as a fresh conversion writes it.
    convert_stack(paths, store, small_options(nlevels=3, voxel_um=(20.0, 12.8, 12.8), name="renamed"))
    fresh = tmp_path / "fresh.ome.zarr"
    convert_stack(paths, fresh, small_options(nlevels=3, voxel_um=(20.0, 12.8, 12.8), name="renamed"))
    assert read_attributes(store)["ome"] == read_attributes(fresh)["ome"]
    # 16 um pixels: xy * sqrt 2 >= z from the start, so z halves at level 1: other voxels.
    result = convert_stack(paths, store, small_options(nlevels=3, voxel_um=(20.0, 16.0, 16.0), overwrite=True))
    assert result.status == "written"
    assert factors_between(multiscales(store)) == [(2, 2, 2), (2, 2, 2)]
    assert levels(store)[1].shape == (4, 32, 32)
    assert level_transforms()[1][0]["scale"] == [40.0, 32.0, 32.0]


def _rewrite_chunk(store: Path, level: str, index, values) -> None:
    array = zarr.open_array(store / level, mode="r+")
    array[index] = values


@pytest.mark.parametrize("variant", ["0.4", "0.5", "0.5-sharded"])
def test_data_verification_fails_on_deleted_or_modified_chunks(tmp_path, variant):
    from pipeline.publish.validate_omezarr import OmeZarrDataError, verify_data

    stack = synthetic_stack((8, 64, 64), zero_rows=32)  # the top rows of chunks (and shards) are background: not stored
    paths = write_stack(tmp_path / "tif", stack)
    store = tmp_path / "v.ome.zarr"
    ngff, sharded = variant.split("-")[0], variant.endswith("sharded")
    convert_stack(paths, store, small_options(ngff_version=ngff, nlevels=3,
                                              shard=(8, 32, 32) if sharded else None))
    checked = verify_data(store, sections=paths, sample=None)
    assert checked[0]["absent"] > 0 and checked[0]["decoded"] == checked[0]["present"]
    assert checked[0]["present"] + checked[0]["absent"] == checked[0]["files"]
    sampled = verify_data(store, sections=paths, sample=2)
    assert [lv["decoded"] for lv in sampled.values()] == [min(2, lv["present"]) for lv in checked.values()]
    files = {level: chunk_files(store / level) for level in ("0", "1")}
    pristine = {p: p.read_bytes() for fs in files.values() for p in fs}

    def fails(match: str) -> None:
        with pytest.raises(OmeZarrDataError, match=match):
            verify_data(store, sections=paths, sample=None)
        for path, data in pristine.items():  # back to the intact store
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        verify_data(store, sections=paths, sample=None)

    files["0"][len(files["0"]) // 2].unlink()  # a data chunk of level 0
    fails("is missing, but what it must hold is not all zero")
    files["1"][-1].unlink()  # of level 1
    fails("is missing")
    for path in files["0"]:  # every data chunk
        path.unlink()
    fails("is missing")
    _rewrite_chunk(store, "0", (slice(4, 8), slice(48, 64), slice(0, 16)), 7)  # valid, other voxels
    fails("voxel values differ")
    _rewrite_chunk(store, "1", (slice(0, 4), slice(16, 32), slice(0, 16)), 7)
    fails("voxel values differ")
    files["0"][0].write_bytes(files["0"][0].read_bytes()[:20])  # truncated
    fails("does not decode|differ")
    # The default sample still finds a missing chunk: the grid is listed completely.
    files["0"][0].unlink()
    with pytest.raises(OmeZarrDataError, match="is missing"):
        verify_data(store, sections=paths)


@pytest.mark.slow
def test_stage_rerun_after_resolution_change_stores_the_new_scales(tmp_path, sqlite_url):
    """omezarr through the CLI, then the scan run's --resolution is corrected: the rerun's store
    has the new scales (metadata only while the level factors stay, rebuilt when they change),
    as the precomputed layer would."""
    from pipeline.layout import AnimalLayout

    layout = AnimalLayout(tmp_path / "data", STAGE_ANIMAL)
    seed_scan_run(sqlite_url, 6)
    stack = synthetic_stack((6, 90, 130), zero_rows=10)
    place_aligned_stack(layout, stack, db_url=sqlite_url)
    args = ("--channel", "1", "--chunk-size", "32,32,2", "--nlevels", "3")
    assert stage_cli(tmp_path, sqlite_url, *args) == 0
    store = layout.omezarr(1, downsample=True)
    assert multiscales(store)["datasets"][0]["coordinateTransformations"][0]["scale"] == pytest.approx([20, 10.4, 10.4])
    mtimes = {p: p.stat().st_mtime_ns for p in chunk_files(store)}
    assert stage_cli(tmp_path, sqlite_url, *args, "--resolution", "0.4") == 0
    assert last_runs(sqlite_url)[0].tasks_run == 1
    scales = [d["coordinateTransformations"][0]["scale"] for d in multiscales(store)["datasets"]]
    assert scales == [pytest.approx(s) for s in ([20, 12.8, 12.8], [20, 25.6, 25.6], [40, 51.2, 51.2])]
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert stage_cli(tmp_path, sqlite_url, *args, "--zresolution", "10") == 0  # z now halves at once
    ms = multiscales(store)
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == pytest.approx([10, 12.8, 12.8])
    assert factors_between(ms) == [(2, 2, 2), (2, 2, 2)]
    data = levels(store)
    assert np.array_equal(data[0], stack)
    assert np.array_equal(data[1], pyramid.downsample(stack, (2, 2, 2)))


@pytest.mark.slow
def test_stage_publishes_an_rgb_stack_as_three_channels(tmp_path, sqlite_url):
    """Brightfield: aligned sections of (y, x, 3) uint8 become one CZYX store with a window per
    channel and red/green/blue colours, verified against the sections (issue 12 item 8)."""
    from pipeline.layout import AnimalLayout

    layout = AnimalLayout(tmp_path / "data", STAGE_ANIMAL)
    seed_scan_run(sqlite_url, 4)
    stack = synthetic_stack((4, 70, 90), dtype=np.uint8, rgb=True)
    paths = place_aligned_stack(layout, stack, db_url=sqlite_url)
    hist = layout.histogram_data(1, downsample=True)  # what the histogram stage leaves: one mixed histogram
    hist.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(hist, counts=np.bincount(stack.ravel(), minlength=256))
    assert stage_cli(tmp_path, sqlite_url, "--channel", "1", "--chunk-size", "32,32,2", "--nlevels", "2") == 0
    store = layout.omezarr(1, downsample=True)
    data = levels(store)
    assert np.array_equal(data[0], np.moveaxis(stack, -1, 0))
    attrs = read_attributes(store)["ome"]
    assert [a["name"] for a in attrs["multiscales"][0]["axes"]] == ["c", "z", "y", "x"]
    channels = attrs["omero"]["channels"]
    assert [c["color"] for c in channels] == ["FF0000", "00FF00", "0000FF"]
    assert [c["label"] for c in channels] == ["red", "green", "blue"]
    for c, channel in enumerate(channels):  # each window from its own channel's voxels
        nonzero = stack[..., c][stack[..., c] > 0]
        assert abs(channel["window"]["end"] - np.percentile(nonzero, 99.5)) <= 3
    validate_store(store, expect_levels=2)
    from pipeline.publish.validate_omezarr import verify_data

    verify_data(store, sections=paths, sample=None)
    assert last_runs(sqlite_url)[0].status == "success"
