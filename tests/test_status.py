"""`create_pipeline --animal A --task status`: per stage, channel and resolution the last run's
done / failed / pending tasks, last errors, duration and throughput, the locks held and the next
command. Through the real command line on the tiny sample, SQLite and MariaDB; the pure parts
(counts, next command) directly."""

from __future__ import annotations

import datetime as dt
import re
import socket

from db import locks
from db.locks import LockKey
from db.models import PipelineRun
from db.session import init_db
from pipeline.layout import AnimalLayout
from pipeline.stages.status import RunFacts, StageInfo, next_step, not_run, task_counts
from tests.test_section_identity import copy_sample, run_cli, tiny_sample  # noqa: F401 (fixture)

CHAIN = [StageInfo("extract", by_channel=False, by_resolution=False), StageInfo("mask", by_channel=False),
         StageInfo("clean", per_channel=True), StageInfo("web", by_channel=False, by_resolution=False)]


def _run(id, stage, status, channel=1, resolution="thumbnail", **counts) -> RunFacts:
    return RunFacts(PipelineRun(id=id, stage=stage, status=status, channel=channel, resolution=resolution,
                                started=dt.datetime(2026, 1, 1), **counts))


def test_task_counts_of_a_killed_run_come_from_file_log():
    # Killed before it updated its counts: 3 tasks recorded their outputs, 2 were done before.
    facts = RunFacts(PipelineRun(tasks_total=10, tasks_run=0, tasks_skipped=2, tasks_failed=1), tasks_recorded=3)
    assert task_counts(facts) == (5, 1, 4)


def test_next_step_walks_the_chain_per_channel_then_full_resolution():
    assert next_step("A", CHAIN, [], [1, 2]) == "create_pipeline --animal A --task extract   (not run yet)"
    runs = [_run(1, "extract", "success", resolution="full"), _run(2, "mask", "success"), _run(3, "clean", "success")]
    assert next_step("A", CHAIN, runs, [1, 2]) == "create_pipeline --animal A --task clean --channel 2   (not run yet)"
    runs += [_run(4, "clean", "failed", channel=2)]
    assert next_step("A", CHAIN, runs, [1, 2]).startswith("create_pipeline --animal A --task clean --channel 2   (pipeline_run 4 failed")
    runs += [_run(5, "clean", "success", channel=2), _run(6, "web", "running")]
    assert next_step("A", CHAIN, runs, [1, 2]).startswith("create_pipeline --animal A --task web   (pipeline_run 6 is running")
    runs += [_run(7, "web", "success")]
    assert next_step("A", CHAIN, runs, [1, 2]) == "create_pipeline --animal A --task mask --downsample false   (not run yet)"
    assert not_run(CHAIN, runs, [1, 2]) == []  # full resolution is listed once something ran there
    runs += [_run(8, "mask", "success", resolution="full")]
    assert not_run(CHAIN, runs, [1, 2]) == ["clean C1 full", "clean C2 full"]
    runs += [_run(9 + c, "clean", "success", c, "full") for c in (1, 2)]
    assert next_step("A", CHAIN, runs, [1, 2]).startswith("nothing: every stage succeeded")


def test_status_after_a_partial_chain_with_one_failure(tiny_sample, tmp_path, db_url):
    root = copy_sample(tiny_sample, tmp_path)
    for task in ("extract", "mask"):
        assert run_cli(root, db_url, task).returncode == 0
    AnimalLayout(root, "DEMO").extracted_thumbnail("DEMO_slide02", 0, 1).unlink()  # one section cannot be cleaned
    assert run_cli(root, db_url, "clean").returncode == 1
    engine = init_db(db_url)
    locks.acquire(engine, LockKey("DEMO", "clean", 2, "thumbnail"), lease_seconds=300, run_id=99,
                         who=("ann", "scope-1", 4242))
    locks.acquire(engine, LockKey("DEMO", "histogram", 1, "thumbnail"), lease_seconds=300,
                  who=("bob", socket.gethostname(), 999999999))  # its process is gone
    engine.dispose()

    status = run_cli(root, db_url, "status")
    assert status.returncode == 0, status.stderr
    out = status.stdout
    number = r"\d+\.\d+ s, \d+\.\d\d tasks/s, \d+\.\d\d MB/s"
    assert re.search(rf"extract +C\*  any +success +run 1 \(.+\): 14 done, 0 failed, 0 pending; {number}", out), out
    assert re.search(rf"mask +C\*  thumbnail success +run 2 \(.+\): 6 done, 0 failed, 0 pending; {number}", out), out
    assert re.search(rf"clean +C1  thumbnail failed +run 3 \(.+\): 5 done, 1 failed, 0 pending; {number}", out), out
    errors = [line.strip() for line in out.splitlines() if line.strip().startswith("!")]
    assert len(errors) == 1 and "DEMO_slide02_S1" in errors[0], out
    assert "clean of DEMO (channel 2, thumbnail): pipeline_run 99 (user ann, host scope-1, pid 4242) since " in out
    assert "histogram of DEMO (channel 1, thumbnail): a runner starting (user bob" in out
    assert "stale (its process 999999999 on" in out
    assert "clean of DEMO (channel 2, thumbnail): pipeline_run 99" in out.split("stale")[0]  # the live one is not stale
    assert ("  not run yet: clean C2 thumbnail, histogram C1 thumbnail, histogram C2 thumbnail, align C1 thumbnail, "
            "align C2 thumbnail, create_metrics C1 thumbnail, neuroglancer C1 thumbnail, neuroglancer C2 thumbnail, "
            "omezarr C1 thumbnail, omezarr C2 thumbnail, web C* any\n") in out
    assert "  next: create_pipeline --animal DEMO --task clean   (pipeline_run 3 failed: " in out
