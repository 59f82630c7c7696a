"""The questions users ask of the database, as functions taking a Session.

Paths are relative to the data root with POSIX separators, as `file_log` stores them. A file
inside a recorded directory (a chunk of a Neuroglancer layer, say) is answered by the record of
the nearest recorded directory above it, since stages record a layer as one output.
"""

from __future__ import annotations

import contextlib

import json
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session, aliased, contains_eager, selectinload

from db.models import FileLog, PipelineRun, ScanRun, Slide, SlideCziToTif, file_input
from pipeline.errors import SlidepipeError
from pipeline.layout import section_key


def ordered_sections(
    session: Session, animal: str, channel: int = 1, active_only: bool = True
) -> list[SlideCziToTif]:
    """Sections of the animal's active scan run in stack order: slide number, then the
    user-editable scene_order, then the scene's index in the file. Position i in this list is
    the section's z index in the published volume; files are named by `section_key_of(row)`,
    which does not change when the order does.

    `active` and `scene_order` live on each channel row, but a position must mean the same
    tissue in every channel: a scene counts as inactive when any of its channel rows is, and
    the channel-1 row's scene_order orders the scene in every channel.
    """
    first = aliased(SlideCziToTif)  # the channel-1 row of the same scene
    query = (
        select(SlideCziToTif)
        .join(SlideCziToTif.slide)
        .join(Slide.scan_run)
        .outerjoin(
            first,
            and_(
                first.FK_slide_id == SlideCziToTif.FK_slide_id,
                first.scene_index == SlideCziToTif.scene_index,
                first.channel == 1,
            ),
        )
        .where(ScanRun.FK_prep_id == animal, ScanRun.active.is_(True), SlideCziToTif.channel == channel)
        .options(contains_eager(SlideCziToTif.slide))
        .order_by(
            ScanRun.id,
            Slide.slide_physical_id,
            func.coalesce(first.scene_order, SlideCziToTif.scene_order),
            SlideCziToTif.scene_index,
            Slide.id,
            SlideCziToTif.id,
        )
    )
    if active_only:
        sibling = aliased(SlideCziToTif)
        inactive_sibling = (
            select(sibling.id)
            .where(
                sibling.FK_slide_id == SlideCziToTif.FK_slide_id,
                sibling.scene_index == SlideCziToTif.scene_index,
                sibling.active.is_(False),
            )
            .exists()
        )
        query = query.where(Slide.active.is_(True), ~inactive_sibling)
    return list(session.scalars(query))


def section_key_of(row: SlideCziToTif) -> str:
    """The stable name of the section a slide_czi_to_tif row belongs to (`<slide>_S<scene>`):
    every per-section file after extract is named by it, never by the position."""
    return section_key(Path(row.slide.file_name).stem, row.scene_index)


def deactivate_sql(scenes: list[tuple[int, int]]) -> str:
    """The statement that takes sections (each a (slide id, scene index), all its channels) out
    of the stack, the documented way."""
    where = " OR ".join(f"(FK_slide_id = {slide} AND scene_index = {scene})" for slide, scene in scenes)
    return f"UPDATE slide_czi_to_tif SET active = 0 WHERE {where};"


def files_of_run(session: Session, run_id: int) -> list[FileLog]:
    """Every file row a run recorded, in the order they were recorded."""
    return list(session.scalars(select(FileLog).where(FileLog.FK_pipeline_run_id == run_id).order_by(FileLog.id)))


def current_file(session: Session, relpath: str) -> FileLog | None:
    """The newest record of exactly this path (None when it was never recorded)."""
    return session.scalars(
        select(FileLog).where(FileLog.path == normalise_path(relpath)).order_by(FileLog.id.desc()).limit(1)
    ).first()


def runs(session: Session, animal: str | None = None, stage: str | None = None) -> list[PipelineRun]:
    """Pipeline runs, newest first, optionally of one animal and/or one stage."""
    query = select(PipelineRun).order_by(PipelineRun.id.desc())
    if animal is not None:
        query = query.where(PipelineRun.FK_prep_id == animal)
    if stage is not None:
        query = query.where(PipelineRun.stage == stage)
    return list(session.scalars(query))


def how_was_made(session: Session, relpath: str, data_root: str | Path | None = None) -> dict[str, Any]:
    """The record of a file: its checksum, the run (stage, params, software versions, host,
    times) that made it and the files it was made from. JSON-serialisable (times as ISO text)."""
    asked = normalise_path(relpath, data_root)
    row = recorded_file(session, asked)
    info = _file_info(row)
    info["path"] = asked
    info["recorded_path"] = row.path
    info["run"] = _run_info(row.run) if row.run is not None else None
    info["inputs"] = [
        {"path": i.path, "checksum": i.checksum, "kind": i.kind, "stage": i.run.stage if i.run else None}
        for i in sorted(row.inputs, key=lambda r: r.path)
    ]
    return info


def lineage(
    session: Session, relpath: str, depth: int | None = None, data_root: str | Path | None = None
) -> list[dict[str, Any]]:
    """Every file a file was made from, walking inputs recursively (back to the raw slides when
    `depth` is None). Returns one entry per file_log row, the file itself first (depth 0), each
    row once even when several files used it, with `input_ids` linking the entries."""
    start = recorded_file(session, normalise_path(relpath, data_root))
    seen: dict[int, dict[str, Any]] = {}
    level, level_number = [start], 0
    while level:
        for row in level:
            entry = _file_info(row)
            entry["depth"] = level_number
            entry["stage"] = row.run.stage if row.run else None
            entry["run_id"] = row.FK_pipeline_run_id
            entry["input_ids"] = []
            seen[row.id] = entry
        if depth is not None and level_number >= depth:
            break
        links = session.execute(
            select(file_input.c.file_id, file_input.c.input_id)
            .where(file_input.c.file_id.in_([r.id for r in level]))
            .order_by(file_input.c.file_id, file_input.c.input_id)
        ).all()
        for file_id, input_id in links:
            seen[file_id]["input_ids"].append(input_id)
        new_ids = sorted({input_id for _, input_id in links} - set(seen))
        level = _load_files(session, new_ids)
        level_number += 1
    return list(seen.values())


def recorded_file(session: Session, relpath: str) -> FileLog:
    """The newest record of `relpath`, or of the nearest recorded directory containing it."""
    path = PurePosixPath(relpath)
    candidates = [str(path)] + [str(p) for p in path.parents if str(p) != "."]
    row = session.scalars(
        select(FileLog)
        .where(FileLog.path.in_(candidates))
        .order_by(func.length(FileLog.path).desc(), FileLog.id.desc())
        .limit(1)
        .options(selectinload(FileLog.run), selectinload(FileLog.inputs).selectinload(FileLog.run))
    ).first()
    if row is None:
        raise SlidepipeError(
            "no record of this file (nor of a directory containing it) in file_log; "
            "give the path relative to the data root, e.g. DK39/preps/tif/...",
            relpath,
        )
    return row


def normalise_path(relpath: str | Path, data_root: str | Path | None = None) -> str:
    """The form file_log stores: relative to the data root, POSIX separators, no './'.

    Files outside the data root (e.g. a TIFF folder given to extract with --input) are stored
    with their absolute path, so an absolute path that is not under `data_root` stays absolute.
    """
    text = str(relpath).replace("\\", "/")
    path = Path(text)
    if path.is_absolute() and data_root is not None:
        with contextlib.suppress(ValueError):
            path = path.relative_to(Path(data_root).absolute())
    return PurePosixPath(path.as_posix()).as_posix().removeprefix("./")


# --------------------------------------------------------------------------------------------


def _load_files(session: Session, ids: list[int]) -> list[FileLog]:
    if not ids:
        return []
    return list(
        session.scalars(select(FileLog).where(FileLog.id.in_(ids)).order_by(FileLog.id).options(selectinload(FileLog.run)))
    )


def _file_info(row: FileLog) -> dict[str, Any]:
    return {
        "id": row.id,
        "path": row.path,
        "kind": row.kind,
        "size": row.size,
        "checksum": row.checksum,
        "created": _iso(row.created),
        "task_key": row.task_key,
        "fingerprint": row.fingerprint,
        "result": _parse_json(row.result),
    }


def _run_info(run: PipelineRun) -> dict[str, Any]:
    return {
        "id": run.id,
        "animal": run.FK_prep_id,
        "stage": run.stage,
        "status": run.status,
        "params": _parse_json(run.params),
        "software_versions": _parse_json(run.software_versions),
        "code_version": run.code_version,
        "host": run.host,
        "pid": run.pid,
        "command": run.command,
        "started": _iso(run.started),
        "ended": _iso(run.ended),
        "channel": run.channel,
        "resolution": run.resolution,
    }


def _parse_json(value: str | None) -> Any:
    """Parsed JSON; text that is not JSON (a hand-edited row) is returned as it is."""
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return value


def _iso(value) -> str | None:
    return None if value is None else value.isoformat()
