"""status: what has been done for an animal, read from the DB (the default when no --task)."""

from __future__ import annotations

from sqlalchemy import func, select

from db.models import FileLog, PipelineRun, ScanRun, Slide, SlideCziToTif
from db.session import session_scope
from pipeline.config import Settings
from pipeline.layout import AnimalLayout
from pipeline.stages.common import active_scan_run


def status_lines(engine, settings: Settings, animal: str) -> list[str]:
    layout = AnimalLayout(settings.data_root, animal)
    lines = [f"animal {animal}", f"  data:     {layout.root}", f"  database: {settings.safe_database_url}"]
    with session_scope(engine) as session:
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
        runs = session.scalars(
            select(PipelineRun).where(PipelineRun.FK_prep_id == animal).order_by(PipelineRun.id.desc())
        ).all()
        latest: dict[tuple, PipelineRun] = {}
        for run in runs:
            latest.setdefault((run.stage, run.channel, run.resolution), run)
        if latest:
            lines.append("  last run of each stage:")
        for (stage, channel, resolution), run in sorted(latest.items(), key=lambda kv: kv[1].id):
            files = session.scalar(select(func.count()).select_from(FileLog).where(FileLog.FK_pipeline_run_id == run.id))
            lines.append(
                f"    {stage:<15} C{channel} {resolution or '':<9} {run.status:<8} run {run.id}: {run.tasks_run} run, "
                f"{run.tasks_skipped} skipped, {run.tasks_failed} failed, {files} files, ended {run.ended or '-'}"
            )
            if run.error:
                for line in run.error.splitlines()[:5]:
                    lines.append(f"      ! {line}")
    return lines


def print_status(engine, settings: Settings, animal: str) -> None:
    print("\n".join(status_lines(engine, settings, animal)))
