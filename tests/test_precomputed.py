"""Precomputed publishing: what igneous + cloud-volume write is exactly the stack and its pyramid.

References here are computed independently with plain numpy (strided sums), not with the
verifier's `block_mean_floor`, so a wrong verifier cannot agree with a wrong pyramid.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from pipeline.imaging.pyramid import block_mean_floor, plan_pyramid
from pipeline.layout import AnimalLayout
from pipeline.publish import precomputed as pc
from pipeline.publish.validate import LayerVerificationError, expected_chunks, verify_layer
from tests.helpers_layers import decoded_chunk_files

# --------------------------------------------------------------------------------------------
# helpers


def write_stack(folder: Path, depth: int, height: int, width: int, dtype=np.uint8, rgb=False, seed=0,
                compression=None) -> list[Path]:
    """Random sections with a bright square that moves with z (so z order matters)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    top = np.iinfo(dtype).max
    paths = []
    for z in range(depth):
        shape = (height, width, 3) if rgb else (height, width)
        section = rng.integers(0, top // 2, shape, dtype=dtype)
        section[5 + z: 25 + z, 7 + 2 * z: 30 + 2 * z] = top - z
        path = folder / f"{z:03d}.tif"
        tifffile.imwrite(path, section, photometric="rgb" if rgb else "minisblack", compression=compression)
        paths.append(path)
    return paths


def stack_xyzc(paths: list[Path]) -> np.ndarray:
    planes = [tifffile.imread(p) for p in paths]
    planes = [p[:, :, None] if p.ndim == 2 else p for p in planes]
    return np.stack(planes, axis=0).transpose(2, 1, 0, 3)  # (z, y, x, c) -> (x, y, z, c)


def floor_mean(volume: np.ndarray, factor) -> np.ndarray:
    """Truncated block mean by strided sums; an odd edge repeats its last plane (for a factor of
    2 that is the mean of the voxels present). Larger factors only on exact multiples."""
    vol = volume.astype(np.int64)
    for axis, f in enumerate(factor):
        if f == 1:
            continue
        extra = (-vol.shape[axis]) % f
        assert f == 2 or extra == 0, "test reference: partial blocks only for factor 2"
        if extra:
            edge = np.take(vol, [-1], axis=axis)
            vol = np.concatenate([vol, edge], axis=axis)
        vol = sum(np.take(vol, range(i, vol.shape[axis], f), axis=axis) for i in range(f))
    n = int(np.prod(factor))
    return (vol // n).astype(volume.dtype)


def read_mip(layer: Path, mip: int) -> np.ndarray:
    from cloudvolume import CloudVolume

    vol = CloudVolume(pc.file_url(layer), mip=mip, progress=False, fill_missing=False)
    return np.asarray(vol[vol.bounds])


def read_mip_filled(layer: Path, mip: int) -> np.ndarray:
    """A level with its background chunks (no file) read as zeros."""
    from cloudvolume import CloudVolume

    vol = CloudVolume(pc.file_url(layer), mip=mip, progress=False, fill_missing=True)
    return np.asarray(vol[vol.bounds])


def make_step1(src: Path, sections: list[Path], voxel, final_chunk) -> pc.StackShape:
    """The step-1 layer of `sections`, padding included, written in this process."""
    stack = pc.inspect_stack(sections)
    pc.create_rechunkme_layer(src, stack, voxel, final_chunk)
    for z, path in enumerate(sections):
        pc.write_rechunkme_section(str(src), str(path), z, stack.width, stack.height)
    for z in pc.padding_sections(src, len(sections)):
        pc.write_padding_section(str(src), z)
    return stack


def build(tmp: Path, name: str, *, depth, height, width, dtype=np.uint8, rgb=False, xy_um, z_um, chunk,
          memory_target=pc.DEFAULT_MEMORY_TARGET, workers=1, compression=None, sharded=False):
    sections = write_stack(tmp / name / "aligned", depth, height, width, dtype, rgb, compression=compression)
    dest = tmp / name / "C1T"
    src = tmp / name / "C1T_rechunkme"
    make_step1(src, sections, pc.voxel_size_nm(xy_um, z_um), chunk)
    result = pc.publish_layer(src, dest, sections, chunk_size=chunk, workers=workers, sample=None,
                              keep_rechunkme=True, memory_target=memory_target, params={"test": name},
                              sharded=sharded)
    return {"sections": sections, "dest": dest, "src": src, "result": result, "chunk": chunk}


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("precomputed")
    return {
        # odd width and height (padding), transfer makes the 2x2x1 level, then a 2x2x2 round on odd z
        "grey": build(tmp, "grey", depth=5, height=203, width=301, xy_um=10.4, z_um=20, chunk=(32, 32, 2)),
        # uint16, compressed TIFFs: the transfer tasks make two levels at once, then a 2x2x2 round
        "uint16": build(tmp, "uint16", depth=9, height=150, width=230, dtype=np.uint16, xy_um=2.5, z_um=10,
                        chunk=(16, 16, 2), memory_target=200_000, compression="zlib"),
        # RGB, a memory target so small that each 2x2x1 level needs its own round
        "rgb": build(tmp, "rgb", depth=4, height=90, width=133, rgb=True, xy_um=5, z_um=20, chunk=(16, 16, 2),
                     memory_target=10_000),
        # --sharded: the uint16 stack again (same seed); 200 kB shards: several shards per level,
        # igneous's shard downsampling makes two levels from mip 0 in one round
        "sharded": build(tmp, "sharded", depth=9, height=150, width=230, dtype=np.uint16, xy_um=2.5, z_um=10,
                         chunk=(16, 16, 2), memory_target=200_000, compression="zlib", sharded=True),
    }


ALL = ["grey", "uint16", "rgb"]
WITH_SHARDED = ALL + ["sharded"]

# --------------------------------------------------------------------------------------------
# pure planning


def test_pyramid_is_2x2x1_until_xy_nears_z_then_2x2x2_and_stops_when_small():
    plan = plan_pyramid((60001, 40003, 400), (325, 325, 20000), (256, 256, 16))
    assert plan.factors == ((2, 2, 1),) * 6 + ((2, 2, 2),), "0.325 um -> 20.8 um in six 2x2x1 steps, then isotropic"
    top = plan.sizes()[-1]
    assert min(top[:2]) < 2 * 256 <= min(plan.sizes()[-2][:2]), "stops once the smaller side is under two chunks"
    assert plan.resolutions()[6] == (20800, 20800, 20000)
    # thumbnails (x32): one 2x2x1 step reaches z, and z is only halved while it spans two chunks
    thumb = plan_pyramid((1875, 1251, 40), (10400, 10400, 20000), (128, 128, 16))
    assert thumb.factors == ((2, 2, 1), (2, 2, 2), (2, 2, 1))
    assert plan_pyramid((100, 100, 3), (1000, 1000, 1000), (64, 64, 1)).factors == ()
    assert len(plan_pyramid((60001, 40003, 400), (325, 325, 20000), (256, 256, 16), max_mips=2).factors) == 2


def test_padding_makes_every_halved_size_even_and_is_a_fixpoint():
    plan = plan_pyramid((60001, 40003, 401), (325, 325, 20000), (256, 256, 16))
    assert plan.size == (60032, 40064, 402), "x, y to multiples of 2**7 (7 steps); z of 2 (one z halving)"
    for size, factor in zip(plan.sizes(), plan.factors):
        assert all(s % 2 == 0 for s, f in zip(size, factor) if f == 2)
    assert plan_pyramid(plan.size, plan.resolution, (256, 256, 16)) == plan
    with pytest.raises(ValueError):
        plan_pyramid((10, 10, 1), (1, 1, 1), (63, 64, 1))


def test_verify_catches_a_wrong_voxel_in_a_valid_shard(layers, tmp_path):
    """A chunk inside a shard rewritten as valid gzip with one voxel changed, the shard's indexes
    rewritten to match: only the comparison of decoded voxels can see it, and it names the chunk."""
    layer = layers["sharded"]
    copy = tmp_path / "C1T"
    shutil.copytree(layer["dest"], copy)
    scale = json.loads((copy / "info").read_text())["scales"][0]
    assert scale["sharding"]["minishard_bits"] == 0 and scale["sharding"]["minishard_index_encoding"] == "gzip"
    victim = copy / scale["key"] / "0.shard"
    data = victim.read_bytes()
    # One minishard: the shard index is its [start, end); its table holds ids, offsets (each
    # relative to the end of the previous chunk, so only sizes change below) and sizes.
    start, end = (int(v) for v in np.frombuffer(data[:16], dtype="<u8"))
    table = np.frombuffer(gzip.decompress(data[16 + start:16 + end]), dtype="<u8").reshape(3, -1).copy()
    region = data[16:16 + start]
    first, size = int(table[1][0]), int(table[2][0])
    assert first + int(table[1:].sum()) <= start, "chunk data lies before the minishard index"
    raw = bytearray(gzip.decompress(region[first:first + size]))
    raw[len(raw) // 2] ^= 0x01
    chunk = gzip.compress(bytes(raw))  # valid gzip of one changed voxel, any length
    region = region[:first] + chunk + region[first + size:]
    table[2][0] = len(chunk)
    index = gzip.compress(table.astype("<u8").tobytes())
    victim.write_bytes(np.array([len(region), len(region) + len(index)], dtype="<u8").tobytes() + region + index)
    # still a valid shard: cloud-volume reads it, one voxel different from the published layer
    assert int((read_mip(copy, 0) != read_mip(layer["dest"], 0)).sum()) == 1
    with pytest.raises(LayerVerificationError, match=r"mip 0: .*: mip 0 differs from the sections: 1 voxel values differ"):
        verify_layer(copy, layer["sections"], sample=None)


def test_shard_shape_of_a_brain_level_and_the_morton_codes_of_a_grid():
    """igneous's recommended 512 MiB shard of a brain-sized uint16 level is 2048 x 2048 x 64
    voxels: 4 default slabs deep, so a slab-wise sharded build holds at most 64 sections of loose
    mip-0 chunks before packing them. The vectorised Morton codes the packer groups chunks by are
    the verifier's, chunk for chunk."""
    from pipeline.publish.shards import compressed_morton_code, compressed_morton_codes

    brain = plan_pyramid((30000, 20000, 480), (325, 325, 20000), (256, 256, 16))
    assert pc.shard_shape(brain.sizes()[0], (256, 256, 16), "uint16", pc.DEFAULT_MEMORY_TARGET) == (2048, 2048, 64)
    grid = (5, 3, 9)
    positions = np.array([(x, y, z) for z in range(9) for y in range(3) for x in range(5)])
    assert compressed_morton_codes(positions, grid).tolist() == [compressed_morton_code(p, grid) for p in positions]


def test_block_mean_floor_truncates_and_averages_the_voxels_of_cut_blocks():
    a = np.array([[1, 2, 9], [2, 2, 9]], dtype=np.uint8).T[:, :, None, None]  # x=3, y=2
    out = block_mean_floor(a, (2, 2, 1))
    assert out[:, 0, 0, 0].tolist() == [1, 9], "7/4 -> 1 (truncated, not rounded); the cut block is mean(9, 9)"
    big = np.full((2, 2, 2, 1), 65535, dtype=np.uint16)
    big[0, 0, 0, 0] = 65534
    assert block_mean_floor(big, (2, 2, 2))[0, 0, 0, 0] == 65534, "no overflow, truncation"


# --------------------------------------------------------------------------------------------
# the published layers


@pytest.mark.parametrize("name", WITH_SHARDED)
def test_mip0_read_back_through_cloudvolume_equals_the_stack(layers, name):
    layer = layers[name]
    got = read_mip(layer["dest"], 0)
    want = stack_xyzc(layer["sections"])
    x, y, z = want.shape[:3]
    assert np.array_equal(got[:x, :y, :z], want), "voxel for voxel, z order kept"
    assert not got[x:].any() and not got[:, y:].any() and not got[:, :, z:].any(), "padding beyond the stack is zero"


@pytest.mark.parametrize("name", WITH_SHARDED)
def test_every_mip_is_the_truncated_average_of_the_level_below(layers, name):
    layer = layers[name]
    dest, rounds = layer["dest"], layer["result"]["rounds"]
    info = json.loads((dest / "info").read_text())
    plan_factors = [tuple(f) for f in layer["result"]["plan"]["factors"]]
    assert len(info["scales"]) == len(plan_factors) + 1
    mips = [read_mip(dest, m) for m in range(len(info["scales"]))]
    for m in range(1, len(mips)):
        below = floor_mean(mips[m - 1], plan_factors[m - 1])
        delta = mips[m].astype(np.int64) - below.astype(np.int64)
        assert mips[m].shape == below.shape
        assert delta.min() >= 0 and delta.max() <= 1, "truncation: at most 1 above the mean of the truncated level"
        base = next(r["from_mip"] for r in rounds if m in r["mips"])
        factor = tuple(int(np.prod([plan_factors[i][a] for i in range(base, m)])) for a in range(3))
        assert np.array_equal(mips[m], floor_mean(mips[base], factor)), f"mip {m} = mean of mip {base} (its task's input)"
        if base == m - 1:
            assert not delta.any()


def test_rounds_cover_transfer_levels_separate_rounds_and_2x2x2(layers):
    grey = layers["grey"]["result"]
    assert grey["plan"]["factors"] == [[2, 2, 1], [2, 2, 2]]
    assert grey["rounds"][0]["kind"] == "transfer" and grey["rounds"][0]["mips"] == [1]
    u16 = layers["uint16"]["result"]
    assert [r["mips"] for r in u16["rounds"]] == [[1, 2], [3]], "two levels from one transfer task"
    rgb = layers["rgb"]["result"]
    assert [r["mips"] for r in rgb["rounds"]] == [[1], [2]] and rgb["rounds"][1]["kind"] == "downsample"


@pytest.mark.parametrize("name", ALL)
def test_expected_chunk_files_exist_and_are_gzip(layers, name):
    dest = layers[name]["dest"]
    info = json.loads((dest / "info").read_text())
    for scale in info["scales"]:
        x, y, z = scale["size"]
        cx, cy, cz = scale["chunk_sizes"][0]
        want = {f"{a}-{min(a + cx, x)}_{b}-{min(b + cy, y)}_{c}-{min(c + cz, z)}.gz"
                for a in range(0, x, cx) for b in range(0, y, cy) for c in range(0, z, cz)}
        files = {p.name for p in (dest / scale["key"]).iterdir()}
        assert files == want
        for name_ in sorted(files)[:5]:
            assert (dest / scale["key"] / name_).read_bytes()[:2] == b"\x1f\x8b"


def test_info_holds_voxel_size_type_and_channels(layers):
    info = json.loads((layers["grey"]["dest"] / "info").read_text())
    assert info["type"] == "image" and info["data_type"] == "uint8" and info["num_channels"] == 1
    s0 = info["scales"][0]
    assert s0["resolution"] == [10400, 10400, 20000] and s0["key"] == "10400_10400_20000"
    assert s0["voxel_offset"] == [0, 0, 0] and s0["encoding"] == "raw" and s0["chunk_sizes"] == [[32, 32, 2]]
    rgb = json.loads((layers["rgb"]["dest"] / "info").read_text())
    assert rgb["num_channels"] == 3 and rgb["data_type"] == "uint8"
    u16 = json.loads((layers["uint16"]["dest"] / "info").read_text())
    assert u16["data_type"] == "uint16" and u16["scales"][0]["resolution"] == [2500, 2500, 10000]


def test_provenance_file_is_filled(layers):
    layer = layers["grey"]
    prov = json.loads((layer["dest"] / "provenance").read_text())
    assert prov["description"]
    ours = [p for p in prov["processing"] if p["method"].get("task") == pc.PROVENANCE_STEP]
    assert len(ours) == 1
    step = ours[0]["method"]
    assert step["params"] == {"test": "grey"} and step["rounds"] == layer["result"]["rounds"]
    assert ours[0]["software"]["igneous-pipeline"] and ours[0]["software"]["cloud-volume"]
    assert {p["method"]["task"] for p in prov["processing"]} >= {"TransferTask", "DownsampleTask"}
    assert "tmp-" not in json.dumps(prov), "the temporary build directory is not what the provenance names"
    # served: paths relative to the folder holding layer and sections, no user, host or absolute path
    root = Path(os.path.commonpath([layer["dest"], *layer["sections"]]))
    assert prov["sources"] == [Path(s).relative_to(root).as_posix() for s in layer["sections"]]
    assert step["sections"] == prov["sources"]
    text = json.dumps(prov)
    assert str(root) not in text and str(tempfile.gettempdir()) + "/" not in text
    assert prov["owners"] == [] and not any("by" in p for p in prov["processing"])
    import socket

    assert f"@{socket.gethostname()}" not in text


def test_manifest_digest_matches_the_runners_directory_checksum(layers):
    from pipeline.runner import path_stats

    dest = layers["grey"]["dest"]
    for manifest in layers["grey"]["result"]["mips"]:
        size, _, digest = path_stats(dest / manifest["key"])
        assert (manifest["bytes"], manifest["sha256"]) == (size, digest)
        assert manifest["chunks"] == manifest["expected_chunks"] == len(list((dest / manifest["key"]).iterdir()))


def test_sharded_layer_same_voxels_as_unsharded_in_few_shard_files(layers):
    """--sharded: igneous's sharded format at every mip, decoded voxels identical to the
    unsharded layer of the same stack, far fewer files; provenance and manifests say so."""
    layer, plain = layers["sharded"], layers["uint16"]
    dest, result = layer["dest"], layer["result"]
    info = json.loads((dest / "info").read_text())
    assert result["sharded"] is True and len(info["scales"]) == len(result["mips"]) == 4
    for mip, (scale, manifest) in enumerate(zip(info["scales"], result["mips"])):
        assert scale["sharding"]["@type"] == "neuroglancer_uint64_sharded_v1"
        assert scale["sharding"]["data_encoding"] == "gzip" and scale["encoding"] == "raw"
        files = sorted(p.name for p in (dest / scale["key"]).iterdir())
        assert files and all(f.endswith(".shard") for f in files)
        assert manifest["files"] == len(files) < manifest["chunks"] == manifest["expected_chunks"]
        assert np.array_equal(read_mip(dest, mip), read_mip(plain["dest"], mip)), f"mip {mip}"
    from pipeline.runner import path_stats

    assert path_stats(dest / result["mips"][0]["key"])[2] == result["mips"][0]["sha256"]
    prov = json.loads((dest / "provenance").read_text())
    ours = next(p["method"] for p in prov["processing"] if p["method"]["task"] == pc.PROVENANCE_STEP)
    assert ours["sharded"] is True and ours["rounds"] == result["rounds"]
    assert [r["mips"] for r in result["rounds"]] == [r["mips"] for r in plain["result"]["rounds"]] == [[1, 2], [3]]
    shards = ours["shards"]
    assert shards["shards"] == sum(m["files"] for m in result["mips"]) and shards["chunks"] == sum(
        m["chunks"] for m in result["mips"]), "the unsharded build's chunks packed, every one indexed"


def test_sharded_rgb_through_an_fq_queue_equals_the_unsharded_rgb_layer(layers, tmp_path):
    """RGB (3 channels) sharded, its igneous shard tasks run from an fq:// queue: every level
    decodes to the unsharded RGB layer of the same stack (publish_layer verified it, sample=None)."""
    plain = layers["rgb"]
    src, dest = tmp_path / "C1T_rechunkme", tmp_path / "C1T"
    make_step1(src, plain["sections"], pc.voxel_size_nm(5, 20), plain["chunk"])
    result = pc.publish_layer(src, dest, plain["sections"], chunk_size=plain["chunk"], sample=None, memory_target=10_000,
                              queue_url="fq://" + str(tmp_path / "queue"), workers=2, sharded=True)
    assert result["sharded"] and len(result["mips"]) == len(plain["result"]["mips"])
    for mip, manifest in enumerate(result["mips"]):
        assert manifest["files"] < manifest["chunks"] == manifest["expected_chunks"]
        assert np.array_equal(read_mip(dest, mip), read_mip(plain["dest"], mip)), f"mip {mip}"


@pytest.mark.parametrize("how", ["deleted", "bitflip", "truncated"])
def test_verify_catches_a_damaged_shard_file(layers, tmp_path, how):
    layer = layers["sharded"]
    copy = tmp_path / "C1T"
    shutil.copytree(layer["dest"], copy)  # publish_layer verified the original with sample=None
    key = json.loads((copy / "info").read_text())["scales"][0]["key"]
    victim = copy / key / "0.shard"
    data = victim.read_bytes()
    if how == "deleted":
        victim.unlink()
    elif how == "bitflip":  # in the chunk data, past the shard and minishard indexes
        middle = len(data) // 2
        victim.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])
    else:
        victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(LayerVerificationError, match=r"0\.shard") as caught:
        verify_layer(copy, layer["sections"], sample=None)
    if how == "deleted":
        assert any("shard file is missing" in p for p in caught.value.problems)


# --------------------------------------------------------------------------------------------
# verification catches damage


@pytest.fixture
def damaged(layers, tmp_path):
    layer = layers["grey"]
    copy = tmp_path / "C1T"
    shutil.copytree(layer["dest"], copy)
    return copy, layer["sections"]


def test_verify_passes_on_an_intact_copy(damaged):
    layer, sections = damaged
    report = verify_layer(layer, sections, sample=None)
    assert report["checked"][0] == len(list(expected_chunks(json.loads((layer / "info").read_text())["scales"][0])))


def test_verify_catches_a_deleted_chunk(damaged):
    layer, sections = damaged
    info = json.loads((layer / "info").read_text())
    victim = layer / info["scales"][1]["key"] / "32-64_32-64_2-4.gz"
    victim.unlink()
    with pytest.raises(LayerVerificationError, match=r"mip 1: chunk .*32-64_32-64_2-4 is missing"):
        verify_layer(layer, sections, sample=3)


@pytest.mark.parametrize("how", ["bitflip", "regzipped", "truncated"])
def test_verify_catches_a_corrupted_chunk(damaged, how):
    layer, sections = damaged
    info = json.loads((layer / "info").read_text())
    victim = layer / info["scales"][0]["key"] / "64-96_0-32_2-4.gz"
    data = victim.read_bytes()
    if how == "bitflip":
        data = data[:20] + bytes([data[20] ^ 0xFF]) + data[21:]
    elif how == "regzipped":  # a valid gzip file with one wrong voxel
        raw = bytearray(gzip.decompress(data))
        raw[100] ^= 0x01
        data = gzip.compress(bytes(raw))
    else:
        data = data[: len(data) // 2]
    victim.write_bytes(data)
    with pytest.raises(LayerVerificationError, match="64-96_0-32_2-4"):
        verify_layer(layer, sections, sample=None)


def test_verify_catches_a_wrong_upper_level(damaged):
    layer, sections = damaged
    info = json.loads((layer / "info").read_text())
    key = info["scales"][2]["key"]
    victim = layer / key / "0-32_0-32_0-2.gz"
    raw = bytearray(gzip.decompress(victim.read_bytes()))
    raw[0] = (raw[0] + 2) % 256
    victim.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(LayerVerificationError, match="mip 2 != mean of mip 1"):
        verify_layer(layer, sections, sample=None)


def test_verify_catches_igneous_odd_edge_downsampling_which_padding_avoids(tmp_path):
    """Why the stack is padded: igneous's 2x2x1 averaging on an odd-sized volume writes wrong
    edge values (tinybrain <= 1.7). Built here without the padding, verification must fail."""
    import igneous.task_creation as tc

    sections = write_stack(tmp_path / "aligned", 3, 203, 301)
    stack = pc.inspect_stack(sections)
    info = pc.make_info(stack, (1000, 1000, 20000), final_chunk_size=(64, 64, 1))
    info["scales"][0]["size"] = [301, 203, 3]  # no padding
    src, dest = tmp_path / "src", tmp_path / "dest"
    pc.write_info(src, info)
    for z, p in enumerate(sections):
        pc.write_rechunkme_section(str(src), str(p), z, stack.width, stack.height)
    tasks = tc.create_transfer_tasks(pc.file_url(src), pc.file_url(dest), chunk_size=[64, 64, 1], shape=[256, 256, 1],
                                     compress="gzip", factor=(2, 2, 1))
    pc.run_tasks(tasks)
    assert len(json.loads((dest / "info").read_text())["scales"]) == 2
    with pytest.raises(LayerVerificationError, match="mip 1"):
        verify_layer(dest, sections, sample=None)


# --------------------------------------------------------------------------------------------
# step 1 details, the rechunkme lifecycle, errors


def test_step1_in_bands_writes_the_same_voxels(tmp_path):
    sections = write_stack(tmp_path / "aligned", 2, 150, 97, compression="zlib")
    stack = pc.inspect_stack(sections)
    src = tmp_path / "src"
    pc.create_rechunkme_layer(src, stack, (1000, 1000, 20000), final_chunk_size=(32, 32, 1))
    for z, p in enumerate(sections):
        out = pc.write_rechunkme_section(str(src), str(p), z, stack.width, stack.height, band_bytes=1)
        assert out["z"] == z
    got = read_mip(src, 0)
    want = stack_xyzc(sections)
    assert np.array_equal(got[:97, :150, :2], want) and not got[97:].any()
    files = list((src / "1000_1000_20000").iterdir())
    assert files and not any(f.name.endswith(".gz") for f in files), "the temporary layer is raw, uncompressed"


@pytest.mark.parametrize("dtype, rgb, height, width", [(np.uint8, False, 203, 301), (np.uint16, False, 150, 97),
                                                      (np.uint8, True, 90, 133)], ids=["uint8-odd", "uint16", "rgb"])
def test_step1_chunk_files_are_cloudvolumes_bytes_except_background(tmp_path, dtype, rgb, height, width):
    """Step 1's own writer: every chunk file cloud-volume writes for the same voxels (compress=False,
    the raw encoding) with the same name and bytes, except the all-zero ones, which have none (a
    background band 70 px wide, so one whole chunk column); the chunk records list exactly the
    files; a rewrite of a section removes the chunks that became background."""
    from cloudvolume import CloudVolume

    sections = write_stack(tmp_path / "aligned", 3, height, width, dtype, rgb)
    for path in sections[:2]:  # a background band 70 px wide (one whole 64-px chunk column and a bit)
        image = tifffile.imread(path)
        image[:, :70] = 0
        tifffile.imwrite(path, image, photometric="rgb" if rgb else "minisblack")
    stack = pc.inspect_stack(sections)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    make_step1(ours, sections, (10400, 10400, 20000), (32, 32, 2))
    info = pc.read_info(ours)
    key, size = info["scales"][0]["key"], info["scales"][0]["size"]
    assert size[0] > width, "padding columns in the last chunk column"
    pc.write_info(theirs, info)
    volume = np.zeros((*size, stack.channels), dtype, order="F")
    volume[:width, :height, :3] = stack_xyzc(sections)
    CloudVolume(pc.file_url(theirs), progress=False, compress=False, parallel=1)[:, :, :] = volume
    want = {f.name: f.read_bytes() for f in (theirs / key).iterdir()}
    got = {f.name: f.read_bytes() for f in (ours / key).iterdir()}
    background = {name for name, data in want.items() if not any(data)}
    assert background and got.keys() == want.keys() - background
    assert [name for name in got if got[name] != want[name]] == []
    assert pc.check_step1(ours)["chunks"] == len(got)
    # section 2 again, now blank: its chunk files go, its record says so
    blank = tmp_path / "blank.tif"
    tifffile.imwrite(blank, np.zeros(tifffile.imread(sections[2]).shape, dtype), photometric="rgb" if rgb else "minisblack")
    out = pc.write_rechunkme_section(str(ours), str(blank), 2, stack.width, stack.height)
    assert out["chunks"] == 0 and not list((ours / key).glob("*_2-3")) and pc.check_step1(ours)


def test_a_missing_step1_chunk_or_record_is_told_from_background(tmp_path):
    """The transfer reads a step-1 chunk without a file as zeros; check_step1, run before it, fails on
    a deleted chunk that holds data (naming it) and on a section without its record, never on a
    background chunk, which has no file by design."""
    sections = write_stack(tmp_path / "aligned", 2, 64, 130)
    image = tifffile.imread(sections[0])
    image[:, :64] = 0
    tifffile.imwrite(sections[0], image)
    src = tmp_path / "C1T_rechunkme"
    make_step1(src, sections, (1000, 1000, 4000), (16, 16, 1))
    folder = src / "1000_1000_4000"
    assert not (folder / "0-64_0-64_0-1").exists() and pc.check_step1(src) == {"sections": 2, "chunks": 5}
    (folder / "64-128_0-64_0-1").unlink()
    with pytest.raises(pc.PrecomputedError, match="1 step-1 chunk.*holding data are missing: 64-128_0-64_0-1"):
        pc.check_step1(src)
    assert pc.check_step1(src, (1, 2))["chunks"] == 3
    (src / pc.CHUNK_RECORDS / "00001.json").unlink()
    with pytest.raises(pc.PrecomputedError, match=r"section\(s\) \[1\] of the step-1 layer were not written"):
        pc.check_step1(src, (1, 2))


def test_step1_layers_are_read_directly_as_cloudvolume_reads_them(tmp_path):
    """read_step1_directly (set in every igneous process): cloud-volume reads of a step-1 layer,
    at and off chunk edges, RGB included, give what cloud-volume's own download gives; without
    fill_missing a background chunk is an error naming it, as in cloud-volume; a chunk of the
    wrong size is an error naming it. Other layers keep cloud-volume's download."""
    from cloudvolume import CloudVolume
    from cloudvolume.datasource.precomputed.image import rx

    from pipeline.publish.common import read_step1_directly

    sections = write_stack(tmp_path / "aligned", 3, 90, 133, np.uint8, rgb=True)
    image = tifffile.imread(sections[1])
    image[:, :70] = 0
    tifffile.imwrite(sections[1], image, photometric="rgb")
    src = tmp_path / "src"
    make_step1(src, sections, (1000, 1000, 20000), (16, 16, 1))
    boxes = [np.s_[0:64, 0:64, 0:3], np.s_[5:131, 3:89, 1:3], np.s_[:, :, :]]
    plain = CloudVolume(pc.file_url(src), progress=False, fill_missing=True)
    want = [np.asarray(plain[box]) for box in boxes]
    read_step1_directly()
    try:
        calls, original = [], rx.download.slidepipe_original
        rx.download.slidepipe_original = lambda *a, **k: calls.append(1) or original(*a, **k)
        vol = CloudVolume(pc.file_url(src), progress=False, fill_missing=True)
        got = [np.asarray(vol[box]) for box in boxes]
        assert calls == [] and all(np.array_equal(g, w) and g.dtype == w.dtype for g, w in zip(got, want))
        assert want[2][:133, :90, :3].tolist() == stack_xyzc(sections).tolist()
        strict = CloudVolume(pc.file_url(src), progress=False, fill_missing=False)
        with pytest.raises(OSError, match="step-1 chunk .*0-64_0-64_1-2 is missing"):
            strict[0:64, 0:64, 1:2]
        (src / "1000_1000_20000" / "64-128_0-64_1-2").write_bytes(b"not a chunk")
        with pytest.raises(ValueError, match="64-128_0-64_1-2 has 11 bytes"):
            vol[64:128, 0:64, 1:2]
        shutil.rmtree(src / pc.CHUNK_RECORDS)  # not a step-1 layer any more: cloud-volume's own download
        vol[0:16, 0:16, 0:1]
        assert calls == [1]
    finally:
        rx.download.slidepipe_original = original


def test_rechunkme_deleted_only_after_a_verified_transfer(tmp_path):
    sections = write_stack(tmp_path / "aligned", 3, 60, 70)
    dest = tmp_path / "C1T"
    pc.publish_stack(sections, dest, 5, 20, chunk_size=(16, 16, 1), keep_rechunkme=True)
    assert (tmp_path / "C1T_rechunkme" / "info").is_file()
    out = pc.publish_stack(sections, dest, 5, 20, chunk_size=(16, 16, 1))
    assert out["rechunkme_deleted"] and not (tmp_path / "C1T_rechunkme").exists()
    # A failed verification (sections given in the wrong order) keeps the step-1 layer and
    # publishes nothing under the final name.
    shutil.rmtree(dest)
    src = tmp_path / "C1T_rechunkme"
    make_step1(src, sections, pc.voxel_size_nm(5, 20), (16, 16, 1))
    with pytest.raises(LayerVerificationError, match="mip 0 differs from the sections"):
        pc.publish_layer(src, dest, list(reversed(sections)), chunk_size=(16, 16, 1))
    assert (src / "info").is_file() and not dest.exists()
    assert not list(tmp_path.glob("C1T.tmp-*")), "no half-built layer left behind"


@pytest.mark.parametrize("name, slab_chunks", [("grey", 1), ("uint16", 1), ("uint16", 2), ("rgb", 1), ("sharded", 1)])
def test_slab_wise_publishing_gives_the_same_files_and_voxels_at_every_level(layers, tmp_path, name, slab_chunks):
    """Issue 8.1: one z-slab at a time (step-1 chunks written, transferred, its 2x2x1 levels made,
    verified and deleted before the next slab; the z-halving levels once at the end) gives the
    same chunk files with the same decoded bytes at every level as the whole build: odd sizes
    and z padding (grey), uint16 with two levels per transfer task and a 2x2x2 round, RGB whose
    every level is its own round; sharded: the uint16 stack in 200 kB shards, packed as the slabs
    complete them, the same shard files holding the same chunks as the whole sharded build."""
    layer = layers[name]
    whole = layer["dest"]
    info = json.loads((whole / "info").read_text())
    chunk = layer["chunk"]
    res = info["scales"][0]["resolution"]
    memory = {"grey": pc.DEFAULT_MEMORY_TARGET, "uint16": 200_000, "rgb": 10_000, "sharded": 200_000}[name]
    dest = tmp_path / "C1T"
    out = pc.publish_stack(layer["sections"], dest, res[0] / 1000, res[2] / 1000, chunk_size=chunk, sample=None,
                           slab_depth=chunk[2] * slab_chunks, memory_target=memory, sharded=name == "sharded")
    size_z = info["scales"][0]["size"][2]
    assert len(out["plan"]["factors"]) == len(info["scales"]) - 1
    assert [tuple(z) for z in json.loads((dest / "provenance").read_text())["processing"][-1]["method"]["slabs"]] \
        == pc.slab_ranges(size_z, chunk[2], chunk[2] * slab_chunks) and size_z > chunk[2] * slab_chunks
    assert [(r["from_mip"], r["mips"]) for r in out["rounds"]] == \
        [(r["from_mip"], r["mips"]) for r in layer["result"]["rounds"]], "the same rounds, so the same rule per level"
    assert json.loads((dest / "info").read_text()) == info
    got, want = decoded_chunk_files(dest), decoded_chunk_files(whole)
    assert got.keys() == want.keys()
    assert [k for k in want if got[k] != want[k]] == []
    assert out["rechunkme_deleted"] and not (tmp_path / "C1T_rechunkme").exists()
    verify_layer(dest, layer["sections"], sample=None)


def test_stack_with_a_different_section_is_refused(tmp_path):
    sections = write_stack(tmp_path / "aligned", 3, 60, 70)
    tifffile.imwrite(sections[1], np.zeros((60, 71), dtype=np.uint8))
    with pytest.raises(pc.PrecomputedError, match="001.tif.*60x71x1 uint8.*60x70x1 uint8"):
        pc.inspect_stack(sections)
    tifffile.imwrite(sections[1], np.zeros((60, 70), dtype=np.float32))
    with pytest.raises(pc.PrecomputedError, match="float32 is not published"):
        pc.inspect_stack(sections)


# --------------------------------------------------------------------------------------------
# execution: local pool and fq:// queue


def test_parallel_local_queue_gives_the_same_layer_and_keeps_the_start_method(tmp_path):
    before = multiprocessing.get_start_method(allow_none=True)
    sections = write_stack(tmp_path / "aligned", 3, 130, 140)
    one = pc.publish_stack(sections, tmp_path / "one" / "C1T", 2, 4, chunk_size=(16, 16, 1), workers=1)
    two = pc.publish_stack(sections, tmp_path / "two" / "C1T", 2, 4, chunk_size=(16, 16, 1), workers=2)
    assert [m["sha256"] for m in one["mips"]] != []
    assert [(m["chunks"], m["bytes"]) for m in one["mips"]] == [(m["chunks"], m["bytes"]) for m in two["mips"]]
    for a, b in zip(one["mips"], two["mips"]):
        for f in (tmp_path / "one" / "C1T" / a["key"]).iterdir():
            assert gzip.decompress(f.read_bytes()) == gzip.decompress((tmp_path / "two" / "C1T" / b["key"] / f.name).read_bytes())
    assert multiprocessing.get_start_method(allow_none=True) == before


def test_fq_queue_is_processed_by_a_separate_worker_process(tmp_path):
    import igneous.task_creation as tc
    from taskqueue import TaskQueue

    sections = write_stack(tmp_path / "aligned", 2, 64, 64)
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_step1(src, sections, (1000, 1000, 4000), (16, 16, 1))
    queue_url = "fq://" + str(tmp_path / "queue")
    tasks = list(tc.create_transfer_tasks(pc.file_url(src), pc.file_url(dest), chunk_size=[16, 16, 1],
                                          shape=[32, 32, 1], compress="gzip", skip_downsamples=True))
    # as the stage does: into a build's own sub-queue; the worker is given the shared queue's URL
    build_url, _ = pc.build_queue(queue_url, "dest")
    assert TaskQueue(build_url, progress=False).insert(tasks[:5]) == 5
    assert TaskQueue(queue_url, progress=False).insert(tasks[5:]) == len(tasks) - 5 == 3
    code = ("import sys; from pipeline.publish.precomputed import run_worker; "
            "print(run_worker(sys.argv[1], lease_seconds=60, stop_when_empty=True))")
    done = subprocess.run([sys.executable, "-c", code, queue_url], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "8", "the worker process ran every task, builds' included"
    assert TaskQueue(queue_url, progress=False).is_empty() and TaskQueue(build_url, progress=False).is_empty()
    assert np.array_equal(read_mip(dest, 0)[:64, :64], stack_xyzc(sections))


def test_publish_through_an_fq_queue_drains_it_here(tmp_path):
    sections = write_stack(tmp_path / "aligned", 3, 70, 90)
    out = pc.publish_stack(sections, tmp_path / "C1T", 5, 20, chunk_size=(16, 16, 1),
                           queue_url="fq://" + str(tmp_path / "queue"), sample=None)
    assert out["verified"][0] == out["mips"][0]["expected_chunks"]


@pytest.mark.parametrize("queue", [False, True], ids=["local", "fq"])
def test_a_missing_step1_chunk_fails_the_transfer_loudly(tmp_path, queue):
    """No fill_missing: a hole in the step-1 layer must stop the build, not become black voxels."""
    from taskqueue import TaskQueue

    sections = write_stack(tmp_path / "aligned", 2, 64, 64)
    src, dest = tmp_path / "C1T_rechunkme", tmp_path / "C1T"
    make_step1(src, sections, (1000, 1000, 4000), (16, 16, 1))
    next((src / "1000_1000_4000").glob("0-64_0-64_1-2*")).unlink()
    queue_url = "fq://" + str(tmp_path / "queue") if queue else None
    with pytest.raises(pc.PrecomputedError, match="step-1 chunk.*holding data are missing: 0-64_0-64_1-2"):
        pc.publish_layer(src, dest, sections, chunk_size=(16, 16, 1), queue_url=queue_url)
    assert not dest.exists() and (src / "info").is_file()
    if queue:
        assert TaskQueue(queue_url, progress=False).is_empty(), "the abandoned build's tasks are purged"
        assert not any((tmp_path / "queue" / pc.BUILDS_DIR).iterdir()), "and its sub-queue removed"


_BUILD = '''
import json, sys
from pathlib import Path
from pipeline.publish import precomputed as pc
src, dest, queue, sections = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
try:
    pc.publish_layer(src, dest, sections, chunk_size=(16, 16, 1), queue_url=queue, sample=None, keep_rechunkme=True)
    print(json.dumps({"ok": True}))
except pc.PrecomputedError as exc:
    print(json.dumps({"ok": False, "error": str(exc)}))
'''


def test_two_builds_on_one_fq_queue_one_fails_the_other_completes_untouched(tmp_path):
    """Issue 13.6: a failed build used to purge the whole shared queue (and a build ran, and
    waited for, the other's tasks). Each build now has its own sub-queue: build B, whose step-1
    layer has a corrupt chunk, fails; build A, running at the same time on the same queue,
    completes, verifies exactly, and no task of either is left."""
    queue_url = "fq://" + str(tmp_path / "queue")
    builds = {}
    for name, depth in (("A", 6), ("B", 2)):
        sections = write_stack(tmp_path / name / "aligned", depth, 128, 128, seed=depth)
        src, dest = tmp_path / name / "C1T_rechunkme", tmp_path / name / "C1T"
        make_step1(src, sections, (1000, 1000, 4000), (16, 16, 1))
        builds[name] = (src, dest, sections)
    corrupt = next((builds["B"][0] / "1000_1000_4000").glob("0-64_0-64_1-2*"))
    corrupt.write_bytes(b"not a chunk")  # a real failure of B's igneous task, not a stub
    started = {name: subprocess.Popen([sys.executable, "-c", _BUILD, str(src), str(dest), queue_url, *map(str, sections)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=Path(__file__).resolve().parent.parent)
               for name, (src, dest, sections) in builds.items()}
    outcome = {}
    for name, process in started.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        outcome[name] = json.loads(out.strip().splitlines()[-1])
    assert not outcome["B"]["ok"] and "igneous task" in outcome["B"]["error"]
    assert outcome["A"]["ok"], outcome["A"]
    src, dest, sections = builds["A"]
    verify_layer(dest, sections, sample=None)
    assert np.array_equal(read_mip(dest, 0)[:128, :128, :6], stack_xyzc(sections))
    assert not builds["B"][1].exists()
    from taskqueue import TaskQueue

    assert TaskQueue(queue_url, progress=False).is_empty()
    assert not any((tmp_path / "queue" / pc.BUILDS_DIR).iterdir()), "both builds removed their sub-queues"


# --------------------------------------------------------------------------------------------
# independent reader: tensorstore over HTTP from a real Apache


def _apache_or_skip():
    try:
        from apache.launcher import ApacheServer, find_apache

        find_apache()
    except Exception as exc:  # module or binary missing
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"apache2 is required when CI=true: {exc}")
        pytest.skip(f"Apache not available: {exc}")
    return ApacheServer


@contextlib.contextmanager
def _served(layer_dir: Path):
    """`layer_dir` served by a test Apache as animal A1's C1T; yields the layer's base URL."""
    ApacheServer = _apache_or_skip()
    root = Path(tempfile.mkdtemp(prefix="slidepipe-ts-", dir="/tmp"))
    try:
        os.chmod(root, 0o755)
        shutil.copytree(layer_dir, AnimalLayout(root, "A1").precomputed_layer(1, True))
        for directory, _, _ in os.walk(root):
            os.chmod(directory, 0o755)
        with ApacheServer(root) as server:
            yield f"{server.url}/A1/neuroglancer_data/C1T/"
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.apache
def test_tensorstore_reads_the_sharded_layer_over_http_equal_to_the_stack_and_the_pyramid_rule(layers):
    """tensorstore's neuroglancer_precomputed driver on an http kvstore reads the shards from
    Apache in byte ranges: mip 0 is the aligned sections (zero padding), every level the
    truncated mean of the level its round read, computed here with numpy from what tensorstore read."""
    import tensorstore as ts

    layer = layers["sharded"]
    rounds, factors = layer["result"]["rounds"], [tuple(f) for f in layer["result"]["plan"]["factors"]]
    with _served(layer["dest"]) as url:
        mips = [np.asarray(ts.open({"driver": "neuroglancer_precomputed", "kvstore": {"driver": "http", "base_url": url},
                                    "scale_index": m}).result().read().result())
                for m in range(len(layer["result"]["mips"]))]
    want = stack_xyzc(layer["sections"])
    x, y, z = want.shape[:3]
    assert np.array_equal(mips[0][:x, :y, :z], want) and want.any()
    assert not mips[0][x:].any() and not mips[0][:, y:].any() and not mips[0][:, :, z:].any()
    for m in range(1, len(mips)):
        base = next(r["from_mip"] for r in rounds if m in r["mips"])
        factor = tuple(int(np.prod([factors[i][a] for i in range(base, m)])) for a in range(3))
        assert np.array_equal(mips[m], floor_mean(mips[base], factor)), f"mip {m} = mean of mip {base}"


@pytest.mark.apache
@pytest.mark.parametrize("name", ["grey", "rgb"])
def test_tensorstore_reads_mip0_over_http_from_apache_equal_to_the_stack(layers, name):
    """tensorstore reading the gzip layer from disk returns zeros silently (it looks for the
    extensionless names), so the independent read goes through Apache, as Neuroglancer's does."""
    import tensorstore as ts

    layer = layers[name]
    top_mip = len(layer["result"]["mips"]) - 1
    with _served(layer["dest"]) as url:
        def read(mip):
            return ts.open({"driver": "neuroglancer_precomputed", "kvstore": {"driver": "http", "base_url": url},
                            "scale_index": mip}).result().read().result()

        got, top = read(0), read(top_mip)
    want = stack_xyzc(layer["sections"])
    x, y, z = want.shape[:3]
    assert got.shape == read_mip(layer["dest"], 0).shape
    assert np.array_equal(got[:x, :y, :z], want) and want.any()
    assert np.array_equal(top, read_mip(layer["dest"], top_mip))


def test_published_chunks_are_gzipped_at_slidepipes_level_in_igneous_processes(tmp_path):
    """igneous's tasks run in their own processes (2 workers: a pool of processes) and open their own
    CloudVolume; the chunks they write are gzip level 1 (GZIP_LEVEL), not cloudfiles' default 9:
    each chunk's bytes equal a level-1 deflate of its decoded content and differ from level 9's."""
    from cloudfiles import compression

    assert pc.GZIP_LEVEL == 1
    sections = write_stack(tmp_path / "aligned", 4, 150, 140)
    dest = tmp_path / "C1T"
    out = pc.publish_stack(sections, dest, 5, 20, chunk_size=(32, 32, 2), workers=2, slab_depth=0,
                           memory_target=20_000)
    assert min(r["tasks"] for r in out["rounds"]) >= 2, "every round in the pool of 2 processes"
    original = getattr(compression.gzip_compress, "slidepipe_original", compression.gzip_compress)
    info = json.loads((dest / "info").read_text())
    checked = 0
    for scale in info["scales"]:
        for path in sorted((dest / scale["key"]).glob("*.gz")):
            data = path.read_bytes()
            raw = gzip.decompress(data)
            assert data == original(raw, 1) != original(raw, 9), path
            checked += 1
    assert checked >= 10


# --------------------------------------------------------------------------------------------
# background chunks (all zero after masking) are not written (issue 8.1, item 3)
def _masked_stack(folder: Path) -> list[Path]:
    """6 uint16 sections 200 x 150: tissue (random) at x >= 128, a faint column x 96..127 (a 1 at
    every even x and y: its 2x2 truncated mean is 0), zeros elsewhere; sections 4 and 5 blank."""
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True)
    paths = []
    for z in range(6):
        section = np.zeros((150, 200), np.uint16)
        if z < 4:
            section[:, 128:] = rng.integers(1, 60000, (150, 72), dtype=np.uint16)
            section[::2, 96:128:2] = 1
        paths.append(folder / f"{z:03d}.tif")
        tifffile.imwrite(paths[-1], section)
    return paths


@pytest.fixture(scope="module")
def masked(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("masked")
    sections = _masked_stack(tmp / "aligned")
    dest = tmp / "C1T"
    result = pc.publish_stack(sections, dest, 5, 20, chunk_size=(32, 32, 2), sample=None)
    return {"sections": sections, "dest": dest, "result": result}


def test_background_chunks_are_not_written_and_read_as_zeros(masked):
    """All-zero chunks have no file (cloud-volume's delete_black_uploads), at mip 0 and above;
    a level-1 chunk over faint voxels whose truncated mean is 0 has none either, while the mip-0
    chunk under it has one. cloud-volume with fill_missing reads every level back as the stack
    and the truncated means."""
    from cloudvolume import CloudVolume

    dest, result = masked["dest"], masked["result"]
    info = json.loads((dest / "info").read_text())
    key0, key1 = info["scales"][0]["key"], info["scales"][1]["key"]
    assert [m["background_chunks"] > 0 for m in result["mips"]] == [True] * len(result["mips"])
    for m in result["mips"]:
        assert m["files"] == m["chunks"] == m["expected_chunks"] - m["background_chunks"]
    assert not (dest / key0 / "0-32_0-32_0-2.gz").exists() and not (dest / key0 / "128-160_0-32_4-6.gz").exists()
    assert (dest / key0 / "96-128_0-32_0-2.gz").exists() and (dest / key0 / "128-160_0-32_0-2.gz").exists()
    assert not (dest / key1 / "32-64_0-32_0-2.gz").exists(), "the faint column averages to 0 at mip 1"
    want = stack_xyzc(masked["sections"])
    levels = []
    for mip in range(len(info["scales"])):
        vol = CloudVolume(pc.file_url(dest), mip=mip, progress=False, fill_missing=True)
        levels.append(np.asarray(vol[vol.bounds]))
    assert np.array_equal(levels[0][:200, :150, :6], want) and not levels[0][200:, 150:].any()
    assert np.array_equal(levels[1], floor_mean(levels[0], (2, 2, 1)))
    assert not levels[1][:64].any() and levels[0][96:128].any()


def test_verification_accepts_a_missing_chunk_only_where_the_source_is_zero(masked, tmp_path):
    info = json.loads((masked["dest"] / "info").read_text())
    key0, key1 = info["scales"][0]["key"], info["scales"][1]["key"]
    report = verify_layer(masked["dest"], masked["sections"], sample=None)
    assert report["mips"][0]["background_chunks"] == masked["result"]["mips"][0]["background_chunks"]
    for victim, why in ((f"{key0}/96-128_32-64_2-4.gz", "is missing, but the sections hold 512 non-zero values"),
                        (f"{key0}/160-192_64-96_0-2.gz", "is missing, but the sections hold 2048 non-zero values"),
                        (f"{key1}/64-96_0-32_0-2.gz", "is missing, but the mean of mip 0 under it has")):
        copy = tmp_path / victim.replace("/", "_")
        shutil.copytree(masked["dest"], copy)
        (copy / victim).unlink()
        with pytest.raises(LayerVerificationError, match=victim.split("/")[1].removesuffix(".gz") + ".*" + why):
            verify_layer(copy, masked["sections"], sample=None)
    # and a background chunk that is missing is what a complete layer looks like: it passes
    assert not (masked["dest"] / key0 / "0-32_32-64_0-2.gz").exists()


def test_slab_wise_publishing_with_background_chunks_gives_the_same_files(masked, tmp_path):
    dest = tmp_path / "C1T"
    pc.publish_stack(masked["sections"], dest, 5, 20, chunk_size=(32, 32, 2), sample=None, slab_depth=2)
    assert decoded_chunk_files(dest) == decoded_chunk_files(masked["dest"])


def test_sharded_slab_wise_publishing_stores_background_chunks_as_zeros(masked, tmp_path):
    """A background chunk has no file in the unsharded build; packed into a shard it is a gzip
    chunk of zeros (as igneous's shard tasks stored every chunk), so every expected chunk is
    indexed and every level decodes to the unsharded layer's voxels (missing chunks as zeros)."""
    dest = tmp_path / "C1T"
    out = pc.publish_stack(masked["sections"], dest, 5, 20, chunk_size=(32, 32, 2), sample=None, slab_depth=2,
                           sharded=True, shard_bytes=16384)
    assert out["sharded"] and all(m["chunks"] == m["expected_chunks"] and m["files"] > 1 for m in out["mips"][:1])
    prov = json.loads((dest / "provenance").read_text())["processing"][-1]["method"]
    assert prov["shards"]["background_chunks"] == sum(m["background_chunks"] for m in masked["result"]["mips"])
    for mip in range(len(out["mips"])):
        assert np.array_equal(read_mip(dest, mip), read_mip_filled(masked["dest"], mip)), f"mip {mip}"


@pytest.mark.apache
def test_tensorstore_reads_a_layer_with_background_chunks_over_http_as_zeros(masked):
    """Apache answers 404 for a chunk that has no file; tensorstore's neuroglancer_precomputed
    driver reads that as the fill value 0: every level equals what cloud-volume decodes."""
    import tensorstore as ts

    layer = masked["dest"]
    count = len(masked["result"]["mips"])
    with _served(layer) as url:
        got = [np.asarray(ts.open({"driver": "neuroglancer_precomputed", "kvstore": {"driver": "http", "base_url": url},
                                   "scale_index": m}).result().read().result()) for m in range(count)]
    want = stack_xyzc(masked["sections"])
    assert np.array_equal(got[0][:200, :150, :6], want) and want.any()
    for m in range(1, count):
        base = next(r["from_mip"] for r in masked["result"]["rounds"] if m in r["mips"])
        f = 2 ** (m - base)
        assert np.array_equal(got[m], floor_mean(got[base], (f, f, 1))), f"mip {m} = mean of mip {base}"
