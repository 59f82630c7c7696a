"""Smoke test of `make bench` (python -m bench) at a tiny size: it runs, and prints every row and
column of both tables with a number in each measured cell. No timing is asserted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from bench import publish, stages

ROOT = Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table of the output, as rows of cells (header first, separator dropped)."""
    found, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-"):
                current.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif current:
            found.append(current)
            current = []
    return found


def test_bench_prints_every_row_and_column(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--width", "512", "--height", "384", "--depths", "2,3",
         "--stage-sections", "2", "--stage-width", "1500", "--stage-height", "1000", "--dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    publishing, per_stage = tables(out)

    assert publishing[0] == publish.COLUMNS
    methods = ["lab recipe", "stage", "stage --sharded", "floor"]
    assert [(r[0], r[1]) for r in publishing[1:]] == [(m, d) for d in ("2", "3") for m in methods]
    for row in publishing[1:]:
        assert len(row) == len(publish.COLUMNS)
        assert all(NUMBER.match(cell) for cell in row[1:]), row
        assert float(row[4]) > 0 and int(row[5]) > 0  # MB/s and files of what it published
    for depth in ("2", "3"):
        for name in ("stage", "stage --sharded"):
            assert re.search(rf"^- {depth} sections, {re.escape(name)}: speed \d+\.\d+x the lab recipe's .* time "
                             rf"\d+\.\d+x the floor's", out, re.M), out

    assert per_stage[0] == stages.COLUMNS
    assert [r[0] for r in per_stage[1:]] == [name for name, _ in stages.MEASURED] + ["all six"]
    for row in per_stage[1:-1]:
        assert len(row) == len(stages.COLUMNS)
        assert all(NUMBER.match(cell) or (i == 6 and cell == "-") for i, cell in enumerate(row[1:], 1)), row
    assert NUMBER.match(per_stage[-1][-1])
    assert "EXTRAPOLATED linearly from the 3.0 MP measured" in out
    assert not any(tmp_path.iterdir()), "the work directory is left behind"
