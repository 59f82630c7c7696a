"""Bad inputs through the real command line (`python -m pipeline ...` in a subprocess): animal
ids that would leave the data root, a database that fails (full disk, missing directory,
unreachable server), failures printed once, and `how` on a chunk of a published volume.

Each test asserts the exit status, that the error is one line (no traceback), what the database
recorded, and that good outputs are neither lost nor changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile

REPO = Path(__file__).resolve().parent.parent

SQLITE_CAP = '''
import os
from sqlalchemy import event
from sqlalchemy.engine import Engine

@event.listens_for(Engine, "connect")
def _cap(dbapi_connection, _record):
    """A SQLite database that is full at TEST_SQLITE_MAX_PAGES pages: SQLite itself answers
    SQLITE_FULL ("database or disk is full"), exactly as on a full disk."""
    if type(dbapi_connection).__module__.startswith("sqlite3"):
        dbapi_connection.execute("PRAGMA page_size = 512")  # finer steps; only a new file takes it
        if os.environ.get("TEST_SQLITE_MAX_PAGES"):
            dbapi_connection.execute(f"PRAGMA max_page_count = {int(os.environ['TEST_SQLITE_MAX_PAGES'])}")
'''


def cli(*args: str, cwd: Path, extra_path: Path | None = None, env: dict | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` with this checkout's code, run from `cwd` (never from the repo,
    whose directory would shadow PYTHONPATH)."""
    paths = ([str(extra_path)] if extra_path else []) + [str(REPO)]
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **(env or {})}
    full_env.pop("SLIDEPIPE_DB_URL", None)
    full_env.pop("SLIDEPIPE_DATA_ROOT", None)
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """The single `error:` line of a failed command; no traceback, no SQL, nothing else failing."""
    assert "Traceback" not in done.stderr and "[SQL" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    return errors[0]


def tree(root: Path) -> dict[str, str]:
    """Every file under `root` -> sha256 (a snapshot to compare before / after)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def query(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


@pytest.fixture(scope="module")
def tiny_tiffs(tmp_path_factory) -> Path:
    """Four sections of the tiny sample brain as OME-TIFFs (extract --input)."""
    from pipeline.sample import build_sample_tiffs

    folder = tmp_path_factory.mktemp("tiffs") / "in"
    build_sample_tiffs(folder, size="tiny", count=4)
    return folder


def extract(root: Path, animal: str, tiffs: Path, *extra: str, **kw) -> subprocess.CompletedProcess:
    return cli("--animal", animal, "--task", "extract", "--input", str(tiffs), "--data-root", str(root / "data"),
               "--workers", "2", *extra, cwd=root, **kw)


# --------------------------------------------------------------------------------------------
# 1. animal ids


BAD_IDS = ["../escape", "", "a/b", "a b", "x;y", "Mäus", "A" * 21]


def test_bad_animal_ids_are_refused_by_every_command(tmp_path, tiny_tiffs):
    assert extract(tmp_path, "GOOD", tiny_tiffs).returncode == 0
    root = str(tmp_path / "data")
    before = tree(tmp_path)
    commands = [["--animal", bad, "--task", "extract", "--input", str(tiny_tiffs), "--data-root", root]
                for bad in [*BAD_IDS, str(tmp_path / "abs")]]
    for bad in ("../escape", "Mäus", "A" * 21):
        commands += [["--animal", bad, "--data-root", root],
                     ["sample", "--animal", bad, "--data-root", root],
                     ["serve", "--status", "--animal", bad, "--data-root", root],
                     ["how", f"{bad}/preps/tif/DEMO_001.ome_S1_C1.tif", "--data-root", root]]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda args: cli(*args, cwd=tmp_path, timeout=120), commands))
    for args, done in zip(commands, results):
        assert done.returncode == 2, (args, done.stderr)
        line = one_error_line(done)
        if args[0] == "how" and args[1].startswith(".."):
            assert line == f"error: {args[1]}: outside the data root {root}: give a path under it, " \
                           "e.g. DK39/preps/tif/...", line
        else:
            bad = args[args.index("--animal") + 1] if "--animal" in args else args[1].split("/")[0]
            assert line.startswith(f"error: invalid animal id {bad!r}"), line
            assert "use 1 to 20 letters (A-Z, a-z), digits, '_' or '-', starting with a letter or digit" in line
    # Nothing was written anywhere (the database file included), the good animal is intact.
    assert tree(tmp_path) == before
    assert not (tmp_path / "escape").exists() and not (tmp_path / "abs").exists()
    db = tmp_path / "data" / "slidepipe.db"
    assert query(db, "SELECT prep_id FROM animal") == [("GOOD",)]
    assert query(db, "SELECT DISTINCT FK_prep_id FROM pipeline_run") == [("GOOD",)]
    assert all(p.startswith("GOOD/") or p.startswith(str(tiny_tiffs))
               for (p,) in query(db, "SELECT path FROM file_log"))
    # Defence in depth: no code path can build an animal's paths outside the data root.
    from pipeline.errors import UsageError
    from pipeline.layout import AnimalLayout

    for bad in BAD_IDS:
        with pytest.raises(UsageError, match="invalid animal id"):
            AnimalLayout(tmp_path / "data", bad)


# --------------------------------------------------------------------------------------------
# 9. the database fails


def test_full_sqlite_database_is_one_line_exit_3_and_a_rerun_completes(tmp_path, tiny_tiffs):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SQLITE_CAP)
    # A reference run without a limit: how many pages the schema and the whole extract take.
    ref = tmp_path / "ref"
    ref.mkdir()
    assert cli("--animal", "FULL", "--data-root", str(ref / "data"), cwd=ref, extra_path=hook).returncode == 0
    empty = query(ref / "data" / "slidepipe.db", "PRAGMA page_count")[0][0]
    assert extract(ref, "FULL", tiny_tiffs, extra_path=hook).returncode == 0
    complete = query(ref / "data" / "slidepipe.db", "PRAGMA page_count")[0][0]
    assert complete - empty > 10
    # The same on a database that is full halfway through the stage.
    run = tmp_path / "run"
    run.mkdir()
    db = run / "data" / "slidepipe.db"
    assert cli("--animal", "FULL", "--data-root", str(run / "data"), cwd=run, extra_path=hook).returncode == 0
    full = extract(run, "FULL", tiny_tiffs, extra_path=hook, env={"TEST_SQLITE_MAX_PAGES": str((empty + complete) // 2)})
    assert full.returncode == 3, full.stderr
    assert one_error_line(full) == f"error: database sqlite:///{db}: database or disk is full"
    # What the database holds is consistent and true: recorded outputs are on disk as recorded.
    assert query(db, "PRAGMA integrity_check") == [("ok",)]
    assert query(db, "SELECT status FROM pipeline_run WHERE stage = 'extract'") != [("success",)]
    recorded = query(db, "SELECT path, checksum FROM file_log WHERE kind = 'output'")
    reference = dict(query(ref / "data" / "slidepipe.db", "SELECT path, checksum FROM file_log WHERE kind = 'output'"))
    assert 0 < len(recorded) < len(reference)
    for path, checksum in recorded:
        assert hashlib.sha256((run / "data" / path).read_bytes()).hexdigest() == checksum
    # With room again, the rerun keeps what was recorded and ends with the reference's outputs.
    again = extract(run, "FULL", tiny_tiffs, extra_path=hook)
    assert again.returncode == 0, again.stderr
    kept = re.search(r"(\d+) already done", again.stderr)
    assert kept and int(kept[1]) > 0, again.stderr
    final = dict(query(db, "SELECT path, checksum FROM file_log WHERE kind = 'output' ORDER BY id"))
    assert final.keys() == reference.keys()
    assert tree(run / "data" / "FULL" / "preps") == tree(ref / "data" / "FULL" / "preps")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_database_problems_are_one_line_exit_3_and_create_nothing(tmp_path, tiny_tiffs):
    port = _closed_port()
    missing = tmp_path / "nonexistent" / "dir"
    cases = {
        f"sqlite:///{missing}/x.db": f"cannot connect to database sqlite:///{missing}/x.db: directory {missing} "
                                     "does not exist (create it, or fix the URL)",
        f"mysql+pymysql://u:Secr3t@127.0.0.1:{port}/slidepipe": f"cannot connect to database "
                                                                f"mysql+pymysql://u:***@127.0.0.1:{port}/slidepipe: ",
        "postgresql://u:Secr3t@localhost/db": "unsupported database 'postgresql'",
    }
    runs = [(url, message, args) for url, message in cases.items()
            for args in (["--animal", "DB1", "--task", "extract", "--input", str(tiny_tiffs)], ["how", "DB1/x.tif"])]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda r: cli(*r[2], "--data-root", str(tmp_path / "data"), "--db-url", r[0],
                                              cwd=tmp_path), runs))
    for (url, message, args), done in zip(runs, results):
        assert done.returncode == 3, (url, args, done.stderr)
        line = one_error_line(done)
        assert message in line and "Secr3t" not in line, line
    assert not (tmp_path / "nonexistent").exists(), "a mistyped SQLite URL created directories"
    assert not (tmp_path / "data").exists(), "nothing ran, so nothing was written"
    # The default database may create its data root: a new user needs no setup.
    assert extract(tmp_path, "DB1", tiny_tiffs).returncode == 0
    assert query(tmp_path / "data" / "slidepipe.db", "SELECT prep_id FROM animal") == [("DB1",)]


# --------------------------------------------------------------------------------------------
# 10. every failure printed once


def test_each_failure_is_printed_once(tmp_path, tiny_tiffs):
    folder = tmp_path / "in"
    folder.mkdir()
    for path in sorted(tiny_tiffs.iterdir()):
        (folder / path.name).write_bytes(path.read_bytes())
    truncated, empty = folder / "DEMO_002.ome.tif", folder / "DEMO_005.ome.tif"
    truncated.write_bytes(truncated.read_bytes()[:3000])
    empty.write_bytes(b"")
    done = extract(tmp_path, "TWICE", folder)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    for bad in (truncated, empty):
        lines = [line for line in done.stderr.splitlines() if str(bad) in line]
        assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: "), done.stderr
    assert done.stderr.count("empty file (0 bytes)") == 1
    db = tmp_path / "data" / "slidepipe.db"
    ((status, error),) = query(db, "SELECT status, error FROM pipeline_run")
    assert status == "failed" and error.count("\n") == 1
    assert f"{empty}: empty file (0 bytes)" in error and f"{truncated}: " in error
    # The good sections are extracted and recorded.
    tifs = {p for (p,) in query(db, "SELECT path FROM file_log WHERE path LIKE 'TWICE/preps/tif/%'")}
    assert {Path(p).name.split("_S")[0] for p in tifs} == {"DEMO_001.ome", "DEMO_003.ome", "DEMO_004.ome"}
    assert all((tmp_path / "data" / p).is_file() for p in tifs)


# --------------------------------------------------------------------------------------------
# 11. how on a chunk


SECTIONS = 20


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """20 aligned thumbnails published by the real CLI as a precomputed layer and an OME-Zarr
    store, both with 16-section chunks."""
    from pipeline.layout import AnimalLayout
    from tests.helpers_db import record_outputs, seed_sections

    root = tmp_path_factory.mktemp("published")
    data = root / "data"
    data.mkdir()
    url = f"sqlite:///{data / 'slidepipe.db'}"
    keys = seed_sections(url, "HOW1", SECTIONS, dtype="uint8")
    layout = AnimalLayout(data, "HOW1")
    rng = np.random.default_rng(0)
    paths = []
    for key in keys:
        path = layout.aligned(1, True, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(path, rng.integers(0, 200, (90, 130), dtype=np.uint8))
        paths.append(path)
    record_outputs(url, data, paths)
    for task in ("neuroglancer", "omezarr"):
        done = cli("--animal", "HOW1", "--task", task, "--data-root", str(data), "--workers", "1",
                   "--chunk-size", "32,32,16", cwd=root)
        assert done.returncode == 0, done.stderr
    return data


def aligned(data: Path, positions: range) -> list[str]:
    """file_log paths of the aligned sections at these stack positions, sorted as `how` lists them."""
    from db.queries import section_keys
    from db.session import init_db, session_scope

    engine = init_db(f"sqlite:///{data / 'slidepipe.db'}")
    with session_scope(engine) as s:
        keys = section_keys(s, "HOW1")
    engine.dispose()
    return sorted(f"HOW1/preps/CH1/thumbnail_aligned/{keys[z]}.tif" for z in positions)


def how(data: Path, path: str, *extra: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    done = cli("how", path, "--data-root", str(data), *extra, cwd=data.parent)
    return done, (json.loads(done.stdout) if done.returncode == 0 else None)


def test_how_on_a_chunk_is_about_that_chunk(published):
    data = published
    layer = "HOW1/www/neuroglancer_data/C1T"
    db = data / "slidepipe.db"
    ((layer_id, layer_size, layer_checksum),) = query(db, f"SELECT id, size, checksum FROM file_log WHERE path = '{layer}'")
    before = tree(data)
    mip0 = json.loads((data / layer / "info").read_text())["scales"][0]["key"]
    cases = [  # (chunk, the sections it holds)
        (f"{layer}/{mip0}/0-32_0-32_16-20", range(16, 20)),
        (f"{layer}/{mip0}/32-64_32-64_0-16", range(0, 16)),
        ("HOW1/www/omezarr/C1T.ome.zarr/0/c/1/0/0", range(16, 20)),
    ]
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda case: how(data, case[0]), cases))
    for (chunk, sections), (done, answer) in zip(cases, answers):
        assert done.returncode == 0, done.stderr
        on_disk = data / answer["file"]
        assert answer["file"] in (chunk, chunk + ".gz") and on_disk.is_file()
        assert answer["size"] == on_disk.stat().st_size
        assert answer["checksum"] == hashlib.sha256(on_disk.read_bytes()).hexdigest()
        store = chunk.split("/0/c/")[0] if "ome.zarr" in chunk else layer
        ((store_id, store_size),) = query(db, f"SELECT id, size FROM file_log WHERE path = '{store}'")
        assert answer["covered_by"]["id"] == store_id and answer["covered_by"]["path"] == store
        assert answer["size"] != store_size
        assert answer["chunk"]["sections"] == [sections.start, sections.stop - 1]
        assert [i["path"] for i in answer["inputs"]] == aligned(data, sections)
    # The layer itself is still answered whole.
    done, answer = how(data, layer)
    assert (answer["id"], answer["size"], answer["checksum"]) == (layer_id, layer_size, layer_checksum)
    assert len(answer["inputs"]) == SECTIONS
    # --lineage of a chunk follows only its sections.
    done, entries = how(data, f"{layer}/{mip0}/0-32_0-32_16-20", "--lineage")
    assert entries[0]["id"] == layer_id and entries[0]["part"]["chunk"]["sections"] == [16, 19]
    assert sorted(e["path"] for e in entries[1:5]) == aligned(data, range(16, 20))
    assert all(e["depth"] == 2 for e in entries[5:]), "beyond the sections: what they were made from"
    # Names that are not there are refused, with one line.
    missing_names = [f"{layer}/{mip0}/0-32_0-32_16-99", f"{layer}/{mip0}/nothing", "HOW1/www/omezarr/C1T.ome.zarr/0/c/9/0/0"]
    with ThreadPoolExecutor(3) as pool:
        refused = list(pool.map(lambda name: how(data, name), missing_names))
    for missing, (done, _) in zip(missing_names, refused):
        assert done.returncode == 1
        line = one_error_line(done)
        store = "HOW1/www/omezarr/C1T.ome.zarr" if "zarr" in missing else layer
        assert line.startswith(f"error: {missing}: no such file (nor .gz) on disk in {store} (recorded as file_log row")
    assert tree(data) == before
