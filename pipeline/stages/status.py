"""status: what has been done for an animal, read from the DB (the default when no --task).

Per stage, channel and resolution: the last run's done / failed / pending task counts, its last
errors, duration and throughput; the locks held now; and the one command to run next. Everything
comes from `pipeline_run`, `file_log` and `stage_lock`, so it answers for runs on any machine.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import socket
from typing import Iterable, Mapping, Sequence

from sqlalchemy import func, select

from db.locks import LockKey, held_locks, holder_line, stale_reason
from db.models import FileLog, PipelineRun, ScanRun, Slide, SlideCziToTif
from db.session import session_scope
from pipeline.config import Settings
from pipeline.layout import AnimalLayout
from pipeline.stages.common import active_scan_run

ERRORS_SHOWN = 3
RESOLUTIONS = ("thumbnail", "full")


@dataclasses.dataclass(frozen=True)
class StageInfo:
    """What status needs of a stage module: its name, whether `--task all` runs it per channel,
    and whether its files depend on channel / resolution (its `LOCK_BY`)."""

    name: str
    per_channel: bool = False
    by_channel: bool = True
    by_resolution: bool = True

    def scope(self, channel: int | None, resolution: str | None) -> tuple[str, str]:
        """How a run's (channel, resolution) reads for this stage: 'C*' / 'any' where its files
        do not depend on them, so one extract line stands for every channel and resolution."""
        return (f"C{channel}" if self.by_channel else "C*", (resolution or "") if self.by_resolution else "any")

    @classmethod
    def of(cls, module) -> "StageInfo":
        by = getattr(module, "LOCK_BY", ("channel", "resolution"))
        return cls(module.NAME, getattr(module, "PER_CHANNEL", False), "channel" in by, "resolution" in by)


@dataclasses.dataclass(frozen=True)
class RunFacts:
    """A run with what file_log adds: tasks that recorded outputs (also those of a run killed
    before it updated its counts) and the bytes they wrote."""

    run: PipelineRun
    tasks_recorded: int = 0
    bytes_written: int = 0


def task_counts(facts: RunFacts) -> tuple[int, int, int]:
    """(done, failed, pending) tasks of a run: done = run now or found done before."""
    run = facts.run
    done = max(run.tasks_run or 0, facts.tasks_recorded) + (run.tasks_skipped or 0)
    failed = run.tasks_failed or 0
    return done, failed, max(0, (run.tasks_total or 0) - done - failed)


def duration_and_throughput(facts: RunFacts, now: dt.datetime) -> str:
    """'12.3 s, 4.1 tasks/s, 2.0 MB/s' over the run's wall time (until now while it runs)."""
    run = facts.run
    seconds = max(((run.ended or now) - run.started).total_seconds(), 1e-3)
    ran = max(run.tasks_run or 0, facts.tasks_recorded)
    return f"{seconds:.1f} s{'' if run.ended else ' so far'}, {ran / seconds:.2f} tasks/s, {facts.bytes_written / seconds / 1e6:.2f} MB/s"


def error_lines(run: PipelineRun, limit: int = ERRORS_SHOWN) -> list[str]:
    """The run's last `limit` error lines, and how to see the rest."""
    lines = (run.error or "").splitlines()
    shown = [f"! {line}" for line in lines[-limit:]]
    if len(lines) > limit:
        shown.insert(0, f"! ... {len(lines) - limit} more: SELECT error FROM pipeline_run WHERE id = {run.id}")
    return shown


def newest_run(runs: Sequence[RunFacts], info: StageInfo, channel: int, resolution: str) -> RunFacts | None:
    """The last run of a stage that made the files of (channel, resolution); a stage whose files
    do not depend on them (extract) counts whatever its run was started with."""
    found = None
    for facts in runs:
        run = facts.run
        if run.stage != info.name:
            continue
        if info.by_channel and run.channel != channel:
            continue
        if info.by_resolution and run.resolution != resolution:
            continue
        if found is None or run.id > found.run.id:
            found = facts
    return found


def not_run(chain: Sequence[StageInfo], runs: Sequence[RunFacts], channels: Iterable[int]) -> list[str]:
    """The stage, channel and resolution combinations of the chain with no run yet: thumbnails
    always, full resolution once a stage whose files depend on it ran there (not extract)."""
    channels = list(channels) or [1]
    per_resolution = {info.name for info in chain if info.by_resolution}
    full = any(f.run.resolution == "full" and f.run.stage in per_resolution for f in runs)
    resolutions = RESOLUTIONS if full else RESOLUTIONS[:1]
    missing = []
    for resolution in resolutions:
        for info in chain:
            if resolution == "full" and not info.by_resolution:
                continue
            for channel in channels if info.per_channel else [1]:
                if newest_run(runs, info, channel, resolution) is None:
                    missing.append(" ".join([info.name, *info.scope(channel, resolution)]))
    return missing


def command(animal: str, info: StageInfo, channel: int, resolution: str) -> str:
    flags = ""
    if info.by_channel and channel != 1:
        flags += f" --channel {channel}"
    if info.by_resolution and resolution == "full":
        flags += " --downsample false"
    return f"create_pipeline --animal {animal} --task {info.name}{flags}"


def next_step(animal: str, chain: Sequence[StageInfo], runs: Sequence[RunFacts], channels: Iterable[int]) -> str:
    """The first stage of the chain (thumbnails, then full resolution) whose last run did not
    succeed, as the command to type and why."""
    channels = list(channels) or [1]
    for resolution in RESOLUTIONS:
        for info in chain:
            if resolution == "full" and not info.by_resolution:
                continue  # extract and web made everything in the thumbnail pass
            for channel in channels if info.per_channel else [1]:
                facts = newest_run(runs, info, channel, resolution)
                if facts is not None and facts.run.status == "success":
                    continue
                cmd = command(animal, info, channel, resolution)
                if facts is None:
                    return f"{cmd}   (not run yet)"
                if facts.run.status == "running":
                    return f"{cmd}   (pipeline_run {facts.run.id} is running it: wait for it, or rerun if it died)"
                return (f"{cmd}   (pipeline_run {facts.run.id} failed: fix or take out of the stack what it names, "
                        f"then run it again: it redoes only what is not done)")
    return f"nothing: every stage succeeded; serve it with `create_pipeline serve --animal {animal}`"


def run_lines(facts: RunFacts, info: StageInfo, now: dt.datetime) -> list[str]:
    run = facts.run
    done, failed, pending = task_counts(facts)
    started = f"{run.started:%Y-%m-%d %H:%M:%S}"
    channel, resolution = info.scope(run.channel, run.resolution)
    head = (f"{run.stage:<15} {channel:<3} {resolution:<9} {run.status:<8} run {run.id} ({started}): "
            f"{done} done, {failed} failed, {pending} pending; {duration_and_throughput(facts, now)}")
    return [head] + [f"  {line}" for line in error_lines(run)]


def status_lines(engine, settings: Settings, animal: str, chain: Sequence[StageInfo] = ()) -> list[str]:
    layout = AnimalLayout(settings.data_root, animal)
    lines = [f"animal {animal}", f"  data:     {layout.root}", f"  database: {settings.safe_database_url}"]
    now = dt.datetime.now()
    with session_scope(engine) as session:
        lines += _lock_lines(session, animal, now)
        scan_run: ScanRun | None = active_scan_run(session, animal)
        if scan_run is None:
            lines.append("  nothing recorded yet: run --task extract (or `create_pipeline sample` for the demo brain)")
            return lines
        lines.append(
            f"  scan run {scan_run.id}: {scan_run.file_type}, {scan_run.resolution or '?'} um/px, z {scan_run.zresolution} um, "
            f"rotation {scan_run.rotation}x90, flip {scan_run.flip}, flop {scan_run.flop}, canvas {scan_run.width}x{scan_run.height}"
        )
        slides = session.scalars(select(Slide).where(Slide.FK_scan_run_id == scan_run.id)).all()
        lines.append(f"  slides: {len(slides)} ({sum(1 for s in slides if s.active)} active, {sum(1 for s in slides if s.processed)} extracted)")
        per_channel = session.execute(
            select(SlideCziToTif.channel, SlideCziToTif.active, func.count())
            .join(Slide).where(Slide.FK_scan_run_id == scan_run.id)
            .group_by(SlideCziToTif.channel, SlideCziToTif.active)
        ).all()
        channels: dict[int, list[int]] = {}
        for channel, active, count in per_channel:
            channels.setdefault(channel, [0, 0])[0 if active else 1] += count
        for channel in sorted(channels):
            active, inactive = channels[channel]
            lines.append(f"  channel {channel}: {active} active sections, {inactive} inactive")
        infos = {info.name: info for info in chain}
        runs = _last_runs(session, animal, infos)
        if runs:
            lines.append("  last run of each stage, channel and resolution (tasks done / failed / pending, duration, throughput):")
        for facts in sorted(runs, key=lambda f: f.run.id):
            info = infos.get(facts.run.stage, StageInfo(facts.run.stage))
            lines += [f"    {line}" for line in run_lines(facts, info, now)]
        if chain:
            missing = not_run(chain, runs, sorted(channels))
            if missing:
                lines.append(f"  not run yet: {', '.join(missing)}")
            lines.append(f"  next: {next_step(animal, chain, runs, sorted(channels))}")
    return lines


def _lock_lines(session, animal: str, now: dt.datetime) -> list[str]:
    rows = held_locks(session, animal)
    if not rows:
        return ["  locks: none held"]
    lines = ["  locks held:"]
    host = socket.gethostname()
    for row in rows:
        key = LockKey(row.FK_prep_id, row.stage, row.channel, row.resolution)
        lines.append(f"    {key.describe()}: {holder_line(row, now)}")
        reason = stale_reason(row, host=host, now=now)
        if reason is not None:
            lines.append(f"      stale ({reason}): the next runner of this stage takes it over")
    return lines


def _last_runs(session, animal: str, infos: Mapping[str, StageInfo]) -> list[RunFacts]:
    """The newest run of each stage, channel and resolution (as far as the stage's files depend
    on them), with its file_log totals."""
    latest: dict[tuple, PipelineRun] = {}
    for run in session.scalars(select(PipelineRun).where(PipelineRun.FK_prep_id == animal).order_by(PipelineRun.id.desc())):
        info = infos.get(run.stage, StageInfo(run.stage))
        latest.setdefault((run.stage, *info.scope(run.channel, run.resolution)), run)
    if not latest:
        return []
    totals: Mapping[int, tuple[int, int]] = {
        run_id: (tasks, int(size or 0))  # MySQL sums to a Decimal
        for run_id, tasks, size in session.execute(
            select(FileLog.FK_pipeline_run_id, func.count(func.distinct(FileLog.task_key)), func.sum(FileLog.size))
            .where(FileLog.FK_pipeline_run_id.in_([r.id for r in latest.values()]))
            .group_by(FileLog.FK_pipeline_run_id)
        )
    }
    return [RunFacts(run, *totals.get(run.id, (0, 0))) for run in latest.values()]


def print_status(engine, settings: Settings, animal: str, chain: Sequence[StageInfo] = ()) -> None:
    print("\n".join(status_lines(engine, settings, animal, chain)))
