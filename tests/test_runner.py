"""The runner: fingerprints decide what is skipped, failures are recorded, pools work."""

import json
import os
from pathlib import Path

import pytest
from sqlalchemy import select

from db.models import FileLog, PipelineRun
from db.queries import current_file
from db.session import init_db, session_scope
from pipeline.atomic import atomic_path
from pipeline.config import Settings
from pipeline.errors import SlidepipeError
from pipeline.runner import StageContext, Task, finish_run, start_run


def double(src: str, dst: str) -> dict:
    data = Path(src).read_text()
    if data.startswith("bad"):
        raise SlidepipeError("content starts with 'bad'", src)
    with atomic_path(Path(dst)) as tmp:
        tmp.write_text(data * 2)
    return {"chars": len(data) * 2, "pid": os.getpid()}


def forget_output(dst: str) -> None:
    return None


def crash(dst: str) -> None:
    raise ZeroDivisionError("a bug")


def make_ctx(tmp_path, db_url, workers=1, params=None):
    settings = Settings.load({"data_root": tmp_path / "data", "db_url": db_url, "workers": workers}, env={})
    engine = init_db(settings.database_url)
    run_id = start_run(engine, animal="A1", stage="unit", channel=1, resolution="thumbnail", params=params or {})
    return StageContext(settings=settings, engine=engine, animal="A1", stage="unit", version=1, run_id=run_id, params=params)


def inputs(tmp_path, n):
    folder = tmp_path / "data" / "A1" / "in"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{i}.txt"
        p.write_text(f"section {i};")
        paths.append(p)
    return paths


def tasks_for(ctx, srcs, params=None):
    out = ctx.layout.root / "out"
    return [Task(key=p.stem, func=double, kwargs={"src": str(p), "dst": str(out / p.name)},
                 inputs=[p], outputs=[out / p.name], params=params or {}) for p in srcs]


def test_rerun_skips_everything_and_rewrites_nothing(tmp_path, db_url):
    srcs = inputs(tmp_path, 4)
    ctx = make_ctx(tmp_path, db_url)
    results = ctx.execute(tasks_for(ctx, srcs))
    assert ctx.counts["tasks_run"] == 4 and results["2"]["chars"] == len("section 2;") * 2
    outs = sorted((ctx.layout.root / "out").iterdir())
    mtimes = [p.stat().st_mtime_ns for p in outs]
    ctx2 = make_ctx(tmp_path, db_url)
    again = ctx2.execute(tasks_for(ctx2, srcs))
    assert ctx2.counts == {"tasks_total": 4, "tasks_run": 0, "tasks_skipped": 4, "tasks_failed": 0}
    assert again == results, "skipped tasks return their recorded results"
    assert [p.stat().st_mtime_ns for p in outs] == mtimes
    with session_scope(ctx.engine) as s:
        rows = s.scalars(select(FileLog).where(FileLog.kind == "output")).all()
        assert len(rows) == 4
        assert all(r.inputs and r.inputs[0].path.startswith("A1/in/") for r in rows)


def test_changed_input_or_params_reruns_exactly_those(tmp_path, db_url):
    srcs = inputs(tmp_path, 3)
    ctx = make_ctx(tmp_path, db_url)
    ctx.execute(tasks_for(ctx, srcs))
    srcs[1].write_text("edited by hand;")
    ctx2 = make_ctx(tmp_path, db_url)
    ctx2.execute(tasks_for(ctx2, srcs))
    assert (ctx2.counts["tasks_run"], ctx2.counts["tasks_skipped"]) == (1, 2)
    assert (ctx.layout.root / "out" / "1.txt").read_text() == "edited by hand;" * 2
    ctx3 = make_ctx(tmp_path, db_url)
    ctx3.execute(tasks_for(ctx3, srcs, params={"gain": 2}))
    assert ctx3.counts["tasks_run"] == 3


def test_a_touched_but_unchanged_output_stays_trusted_by_the_next_stage(tmp_path, db_url):
    """Copying a data root without times (cp -r, rsync without -t) only changes mtimes: the next
    stage that reads such a file must still see it as the earlier stage's output, not as a file
    of unknown origin."""
    srcs = inputs(tmp_path, 2)
    ctx = make_ctx(tmp_path, db_url)
    ctx.execute(tasks_for(ctx, srcs))
    made = ctx.layout.root / "out" / "0.txt"
    os.utime(made, ns=(made.stat().st_atime_ns, made.stat().st_mtime_ns + 5_000_000_000))
    later = make_ctx(tmp_path, db_url)
    later.execute([Task(key="next", func=double, kwargs={"src": str(made), "dst": str(ctx.layout.root / "next.txt")},
                        inputs=[made], outputs=[ctx.layout.root / "next.txt"])])
    assert later.counts["tasks_run"] == 1
    with session_scope(later.engine) as s:
        assert later.output_problem(s, made) is None
        assert not s.scalars(select(FileLog).where(FileLog.kind == "external", FileLog.path.endswith("out/0.txt"))).all()
    made.write_text("section 0;edited")  # a real change is still seen
    fresh = make_ctx(tmp_path, db_url)
    with session_scope(fresh.engine) as s:
        assert fresh.output_problem(s, made) == "changed on disk since slidepipe wrote it"


def test_deleted_or_modified_output_is_redone(tmp_path, db_url):
    srcs = inputs(tmp_path, 2)
    ctx = make_ctx(tmp_path, db_url)
    ctx.execute(tasks_for(ctx, srcs))
    (ctx.layout.root / "out" / "0.txt").unlink()
    (ctx.layout.root / "out" / "1.txt").write_text("truncated")
    ctx2 = make_ctx(tmp_path, db_url)
    ctx2.execute(tasks_for(ctx2, srcs))
    assert ctx2.counts["tasks_run"] == 2


def test_output_rewritten_with_the_same_bytes_is_still_done(tmp_path, db_url):
    """A queue task done twice (its lease ran out while it still ran) renames the same bytes over
    the recorded output later: the task stays done, and the record takes the new mtime."""
    srcs = inputs(tmp_path, 2)
    ctx = make_ctx(tmp_path, db_url)
    ctx.execute(tasks_for(ctx, srcs))
    same, changed = ctx.layout.root / "out" / "0.txt", ctx.layout.root / "out" / "1.txt"
    same.write_bytes(same.read_bytes())
    os.utime(same, ns=(same.stat().st_atime_ns, same.stat().st_mtime_ns + 10**9))
    changed.write_text(changed.read_text().upper())
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    ctx2 = make_ctx(tmp_path, db_url)
    ctx2.execute(tasks_for(ctx2, srcs))
    assert (ctx2.counts["tasks_skipped"], ctx2.counts["tasks_run"]) == (1, 1)
    with session_scope(ctx2.engine) as s:
        row = current_file(s, ctx2.layout.relative(same))
        assert row.mtime_ns == same.stat().st_mtime_ns


@pytest.mark.parametrize("workers", [1, 2])
def test_failures_are_recorded_and_others_finish(tmp_path, db_url, workers):
    srcs = inputs(tmp_path, 4)
    srcs[2].write_text("bad data")
    ctx = make_ctx(tmp_path, db_url, workers=workers)
    out = ctx.layout.root / "out"
    tasks = tasks_for(ctx, srcs) + [
        Task(key="lazy", func=forget_output, kwargs={"dst": str(out / "never.txt")}, outputs=[out / "never.txt"], label="lazy-file"),
        Task(key="bug", func=crash, kwargs={"dst": "x"}, outputs=[out / "x"], label="buggy-file"),
    ]
    results = ctx.execute(tasks)
    assert set(results) == {"0", "1", "3"}
    lines = sorted(f.line() for f in ctx.failures)
    assert any(str(srcs[2]) in l and "starts with 'bad'" in l for l in lines)
    assert any("never.txt" in l and "without writing" in l for l in lines)
    assert any(l.startswith("buggy-file: ZeroDivisionError: a bug") for l in lines)
    if workers == 2:
        assert len({r["pid"] for r in results.values()} - {os.getpid()}) >= 1, "ran in worker processes"
    finish_run(ctx.engine, ctx.run_id, ctx.failures)
    with session_scope(ctx.engine) as s:
        run = s.get(PipelineRun, ctx.run_id)
        assert run.status == "failed" and run.tasks_failed == 3 and run.tasks_run == 3
        assert str(srcs[2]) in run.error
        assert json.loads(run.software_versions)["slidepipe"]
    assert not (out / "2.txt").exists()


def test_dead_running_run_is_marked_failed(tmp_path, db_url):
    ctx = make_ctx(tmp_path, db_url)
    with session_scope(ctx.engine) as s:
        s.get(PipelineRun, ctx.run_id).pid = 999999999
    start_run(ctx.engine, animal="A1", stage="unit", channel=1, resolution="thumbnail", params={})
    with session_scope(ctx.engine) as s:
        run = s.get(PipelineRun, ctx.run_id)
        assert run.status == "failed" and "killed" in run.error
