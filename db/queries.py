"""The questions users ask of the database, as functions taking a Session.

Paths are relative to the data root with POSIX separators, as `file_log` stores them. A file
inside a recorded directory (a chunk of a Neuroglancer layer, say) has no row of its own: stages
record a layer as one output. It is answered by the record of the nearest recorded directory
above it ("covered_by"), with the file's own size and checksum read from disk and the inputs
narrowed to the sections its z range holds (see `how_was_made`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session, aliased, contains_eager, selectinload

from db.models import FileLog, PipelineRun, ScanRun, Slide, SlideCziToTif, file_input
from pipeline.atomic import sha256_file
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
    times) that made it and the files it was made from. JSON-serialisable (times as ISO text).

    A file inside a recorded directory (a chunk of a published layer or OME-Zarr store) must
    exist under `data_root` (as named, or as `<name>.gz`; see `part_of_directory` for no data
    root): its own size and sha256 are read from disk, `covered_by` is the directory's file_log
    row (whose size is the directory's total and whose checksum is over its files' names and
    sizes), and `inputs` are narrowed to the sections in the chunk's z range when the name is a
    chunk key of a level the record's manifest lists.
    """
    asked = normalise_path(relpath, data_root)
    row = recorded_file(session, asked)
    part = None if row.path == asked else part_of_directory(row, asked, data_root)
    if part is None:
        info = _file_info(row)
        info["path"] = asked
        info["recorded_path"] = row.path
    else:
        info = {**part.describe(asked), "recorded_path": row.path, "covered_by": _covering_record(row)}
    info["run"] = _run_info(row.run) if row.run is not None else None
    stack = [] if part is None else _stack_of(session, row)
    info["inputs"] = [
        {"path": i.path, "checksum": i.checksum, "kind": i.kind, "stage": i.run.stage if i.run else None}
        for i in sorted(row.inputs, key=lambda r: r.path)
        if part is None or part.uses(i.path, stack)
    ]
    return info


def lineage(
    session: Session, relpath: str, depth: int | None = None, data_root: str | Path | None = None
) -> list[dict[str, Any]]:
    """Every file a file was made from, walking inputs recursively (back to the raw slides when
    `depth` is None). Returns one entry per file_log row, the file itself first (depth 0), each
    row once even when several files used it, with `input_ids` linking the entries.

    For a file inside a recorded directory the first entry is the directory's row, with the
    file itself under `part` (as in `how_was_made`) and only the inputs the file depends on."""
    asked = normalise_path(relpath, data_root)
    start = recorded_file(session, asked)
    part = None if start.path == asked else part_of_directory(start, asked, data_root)
    used = None if part is None else {i.id for i in start.inputs if part.uses(i.path, _stack_of(session, start))}
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
        if used is not None and level_number == 0:
            links = [(f, i) for f, i in links if i in used]
        for file_id, input_id in links:
            seen[file_id]["input_ids"].append(input_id)
        new_ids = sorted({input_id for _, input_id in links} - set(seen))
        level = _load_files(session, new_ids)
        level_number += 1
    if part is not None:
        seen[start.id]["part"] = part.describe(asked)
    return list(seen.values())


@dataclasses.dataclass(frozen=True)
class DirectoryPart:
    """A file inside a recorded directory, as found on disk."""

    file: str | None  # the name on disk (a chunk asked for without .gz is stored as <name>.gz)
    size: int | None
    checksum: str | None
    chunk: dict[str, Any] | None  # level and z range, when the name is a chunk key
    sections: range | None  # full-resolution section positions the chunk covers; None: all

    def describe(self, asked: str) -> dict[str, Any]:
        return {"path": asked, "file": self.file, "size": self.size, "checksum": self.checksum, "chunk": self.chunk}

    def uses(self, input_path: str, stack: list[str]) -> bool:
        """Is this input one the part was made from? `stack`: the section keys in stack order
        (`section_keys`). An input named by a section key counts only when the section's position
        is in the chunk's z range; any other input counts for every part."""
        stem = PurePosixPath(input_path).stem
        if self.sections is None or stem not in stack:
            return True
        return stack.index(stem) in self.sections


def section_keys(session: Session, animal: str, channel: int = 1) -> list[str]:
    """The animal's active section keys (`<slide>_S<scene>`) in stack order: position -> key."""
    return [f"{PurePosixPath(s.slide.file_name).stem}_S{s.scene_index + 1}"
            for s in ordered_sections(session, animal, channel)]


def _stack_of(session: Session, row: FileLog) -> list[str]:
    run = row.run
    if run is None or not run.FK_prep_id:
        return []
    return section_keys(session, run.FK_prep_id, run.channel or 1)


def part_of_directory(row: FileLog, relpath: str, data_root: str | Path | None) -> DirectoryPart:
    """`relpath`, a file inside the directory recorded by `row`, as found under `data_root`.

    Without a data root nothing can be read from disk: file, size and checksum are then None
    (never the directory's); the CLI always gives the data root, so it refuses missing files."""
    inner = PurePosixPath(relpath).relative_to(row.path)
    chunk, sections = _chunk_z_range(inner, _parse_json(row.result))
    if data_root is None:
        return DirectoryPart(file=None, size=None, checksum=None, chunk=chunk, sections=sections)
    path = Path(data_root) / relpath
    if not path.is_file() and path.with_name(path.name + ".gz").is_file():
        path = path.with_name(path.name + ".gz")
    if not path.is_file():
        what = "a directory, not a file" if path.is_dir() else "no such file (nor .gz)"
        raise SlidepipeError(f"{what} on disk in {row.path} (recorded as file_log row {row.id})", relpath)
    return DirectoryPart(file=normalise_path(path, data_root), size=path.stat().st_size,
                         checksum=sha256_file(path), chunk=chunk, sections=sections)


_PRECOMPUTED_CHUNK = re.compile(r"(\d+)-(\d+)_(\d+)-(\d+)_(\d+)-(\d+)(?:\.gz)?")
_ZARR_KEY = re.compile(r"(?:c[./])?(\d+(?:[./]\d+)*)")


def _chunk_z_range(inner: PurePosixPath, result: Any) -> tuple[dict[str, Any] | None, range | None]:
    """The level and z range of a chunk named `inner` (relative to its layer or store), from the
    per-level manifest the stage recorded: precomputed `mips` (key, resolution, size) or OME-Zarr
    `levels` (path, shape, scale, file_shape; z is the third axis from the end). (None, None)
    when the name is not a chunk key (info, provenance, zarr.json ...)."""
    if not isinstance(result, dict) or len(inner.parts) < 2:
        return None, None
    level_name, rest = inner.parts[0], "/".join(inner.parts[1:])
    if isinstance(result.get("mips"), list) and result["mips"]:
        levels = result["mips"]
        found = next((m for m in levels if m.get("key") == level_name), None)
        match = _PRECOMPUTED_CHUNK.fullmatch(rest)
        if found is None or match is None:
            return None, None
        z0, z1 = int(match[5]), int(match[6])
        factor = found["resolution"][2] / levels[0]["resolution"][2]
        chunk = {"format": "precomputed", "mip": found.get("mip"), "key": level_name, "z": [z0, z1]}
    elif isinstance(result.get("levels"), list) and result["levels"]:
        levels = result["levels"]
        found = next((lv for lv in levels if lv.get("path") == level_name), None)
        match = _ZARR_KEY.fullmatch(rest)
        if found is None or match is None:
            return None, None
        index = [int(v) for v in re.split(r"[./]", match[1])]
        shape, file_shape = found["shape"], found["file_shape"]
        if len(index) != len(shape) or len(shape) < 3:
            return None, None
        axis = len(shape) - 3
        z0 = index[axis] * file_shape[axis]
        z1 = min(z0 + file_shape[axis], shape[axis])
        factor = found["scale"][axis] / levels[0]["scale"][axis]
        chunk = {"format": "ome-zarr", "level": found.get("level"), "path": level_name, "z": [z0, z1]}
    else:
        return None, None
    sections = range(round(z0 * factor), round(z1 * factor))
    chunk["sections"] = [sections.start, sections.stop - 1] if sections else []
    return chunk, sections


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


def _covering_record(row: FileLog) -> dict[str, Any]:
    """The directory's row, said as what it is (its manifest stays in `how_was_made` of the
    directory itself)."""
    info = _file_info(row)
    del info["result"]
    info["size_is"] = "total bytes of the directory's files"
    info["checksum_is"] = "sha256 over the sorted name<TAB>size lines of the directory's files"
    return info


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
