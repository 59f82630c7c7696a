"""A seeded random mix of good and broken sections through every per-section stage (issue 12):
every good section completes, every broken one is reported by name in each stage that needs it
(and no good one is), the exit code is 1 exactly when something was broken, and nothing is
written outside the data root (the working directory, HOME and TMPDIR are watched; the database
is the default SQLite file inside the data root). Through the real command line, one process
per stage as a user runs them."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from db.models import FileLog, PipelineRun
from db.session import init_db, session_scope
from pipeline.layout import AnimalLayout
from pipeline.sample import build_sample
from tests.helpers_czi import corrupt_scene

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:builtin type [Ss]wig")]

REPO = Path(__file__).resolve().parents[1]
STAGES = ("extract", "mask", "clean", "histogram", "align", "create_metrics")

# How a section is broken, when (before which stage), and which stages then cannot make it.
BREAKAGES = {
    "czi scene undecodable": ("extract", set(STAGES)),
    "extracted files deleted": ("mask", set(STAGES[1:])),
    "extracted thumbnail overwritten": ("mask", set(STAGES[1:])),
    "mask deleted": ("clean", set(STAGES[2:])),
    "mask overwritten": ("clean", set(STAGES[2:])),
}
# Changes that must NOT make a section bad: a file touched (copied without times) but unchanged.
HARMLESS = {"extracted thumbnail touched": "mask", "mask touched": "clean"}

# Per-user caches that libraries keep under HOME whatever program uses them (matplotlib's font
# list); everything else new outside the data root is a failure.
LIBRARY_CACHES = (".cache/matplotlib", ".config/matplotlib")


@pytest.fixture(scope="module")
def tiny_sample(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    build_sample(root, animal="DEMO", seed=0, size="tiny")
    return root


def outputs(layout: AnimalLayout, stage: str, key: str) -> list[Path]:
    slide, scene = key.rsplit("_S", 1)
    return {
        "extract": [layout.extracted_tif(slide, int(scene) - 1, 1), layout.extracted_thumbnail(slide, int(scene) - 1, 1)],
        "mask": [layout.mask(key)],
        "clean": [layout.cleaned(1, True, key)],
        "histogram": [layout.histogram_data(1, True, key)],
        "align": [layout.aligned(1, True, key)],
        "create_metrics": [layout.metrics_data(1, True, key)],
    }[stage]


def break_section(layout: AnimalLayout, how: str, key: str) -> None:
    slide, scene = key.rsplit("_S", 1)
    scene_index = int(scene) - 1
    if how == "czi scene undecodable":
        corrupt_scene(layout.czi_dir / f"{slide}.czi", scene=scene_index)
    elif how == "extracted files deleted":
        layout.extracted_tif(slide, scene_index, 1).unlink()
        layout.extracted_thumbnail(slide, scene_index, 1).unlink()
    elif how == "extracted thumbnail overwritten":
        layout.extracted_thumbnail(slide, scene_index, 1).write_bytes(b"II*\x00 not what extract wrote" * 40)
    elif how == "mask deleted":
        layout.mask(key).unlink()
    elif how == "mask overwritten":
        path = layout.mask(key)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how in ("extracted thumbnail touched", "mask touched"):
        path = layout.extracted_thumbnail(slide, scene_index, 1) if how.startswith("extracted") else layout.mask(key)
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 7_000_000_000))
    else:
        raise ValueError(how)


def named_sections(stderr: str) -> list[str]:
    """The section each error line names: by key from mask on; extract names the slide and scene."""
    named = []
    for line in stderr.splitlines():
        if not line.startswith("error:"):
            continue
        found = re.search(r"section (\S+) \(position \d+\)", line) or re.search(r"/(\w+)\.czi: scene (\d+) ", line)
        assert found, f"an error line that names no section: {line}"
        named.append(found[1] if found.lastindex == 1 else f"{found[1]}_S{found[2]}")
    return named


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("seed", [7, 20])  # between them: every breakage and both harmless touches
def test_random_mix_of_good_and_broken_sections(tiny_sample, tmp_path, seed):
    rng = random.Random(seed)
    root = tmp_path / "data"
    shutil.copytree(tiny_sample / "DEMO", root / "DEMO")
    layout = AnimalLayout(root, "DEMO")
    keys = sorted(p.stem for p in layout.czi_dir.glob("*.czi"))
    keys = [f"{slide}_S{scene}" for slide in keys for scene in (1, 2, 3)]
    shuffled = rng.sample(keys, len(keys))
    broken = {key: rng.choice(sorted(BREAKAGES)) for key in shuffled[: rng.randint(1, 3)]}
    harmless = {key: rng.choice(sorted(HARMLESS)) for key in shuffled[len(broken) : len(broken) + 1]}
    good = [k for k in keys if k not in broken]

    cwd, home, tmp = tmp_path / "cwd", tmp_path / "home", tmp_path / "tmp"
    for folder in (cwd, home, tmp):
        folder.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HOME": str(home), "TMPDIR": str(tmp)}
    env = {k: v for k, v in env.items() if not k.startswith("SLIDEPIPE_")}
    outside_before = tree(tmp_path) - {p for p in tree(tmp_path) if p == "data" or p.startswith("data/")}

    for stage in STAGES:
        for key, how in {**broken, **harmless}.items():
            when = BREAKAGES[how][0] if how in BREAKAGES else HARMLESS[how]
            if when == stage:
                break_section(layout, how, key)
        proc = subprocess.run([sys.executable, "-m", "pipeline", "--animal", "DEMO", "--task", stage,
                               "--data-root", str(root), "--workers", "2"],
                              cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        expected_bad = {key for key, how in broken.items() if stage in BREAKAGES[how][1]}
        context = f"seed {seed}, stage {stage}, broken {broken}, harmless {harmless}:\n{proc.stderr}"

        assert proc.returncode == (1 if expected_bad else 0), context
        named = named_sections(proc.stderr)
        assert sorted(named) == sorted(expected_bad), context  # each bad one once, no good one
        with session_scope(init_db(f"sqlite:///{root / 'slidepipe.db'}")) as s:
            run = s.scalars(select(PipelineRun).order_by(PipelineRun.id.desc())).first()
            assert run.stage == stage and run.status == ("failed" if expected_bad else "success"), context
            assert run.tasks_failed == len(expected_bad), context
            for key in good if stage != "create_metrics" else good[1:]:  # the first has nothing before it
                for path in outputs(layout, stage, key):
                    row = s.scalars(select(FileLog).where(FileLog.path == layout.relative(path))
                                    .order_by(FileLog.id.desc())).first()
                    assert path.is_file() and row is not None and row.kind == "output", f"{path}: {context}"
                    assert row.size == path.stat().st_size, f"{path}: {context}"

        # Nothing outside the data root: no new file in the working directory, HOME (but for
        # libraries' own caches) or anywhere else under the test's folder, and TMPDIR left empty.
        outside = tree(tmp_path) - {p for p in tree(tmp_path) if p == "data" or p.startswith("data/")}
        new = {p for p in outside - outside_before
               if not any(f"home/{cache}".startswith(p) or p.startswith(f"home/{cache}") for cache in LIBRARY_CACHES)}
        assert not new, f"written outside the data root: {sorted(new)}"
        assert not any(tmp.iterdir()), f"left in TMPDIR: {sorted(tree(tmp))}"

    with session_scope(init_db(f"sqlite:///{root / 'slidepipe.db'}")) as s:
        recorded = s.scalars(select(FileLog.path)).all()
    assert recorded and all(not p.startswith(("/", "..")) and ".." not in Path(p).parts for p in recorded)
    assert all((root / p).resolve().is_relative_to(root.resolve()) for p in recorded)
