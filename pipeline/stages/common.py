"""DB rows every stage needs: the animal and its active scan run (created on first use, so no
separate portal is needed), and the scan-run fields a user may set from the command line."""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any, Mapping

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Animal, ScanRun
from pipeline.errors import SlidepipeError, StageError

SCAN_RUN_FLAGS = {
    # flag dest -> scan_run column
    "zresolution": "zresolution",
    "resolution": "resolution",
    "scan_rotation": "rotation",
    "flip": "flip",
    "flop": "flop",
    "objective": "objective",
    "machine": "machine",
}


def add_scan_run_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scan run (stored in the scan_run row; only changed when given)")
    group.add_argument("--zresolution", type=float, default=None, help="section thickness in um (default 20 for a new animal)")
    group.add_argument("--resolution", type=float, default=None, help="xy pixel size in um (default: from the CZI)")
    group.add_argument("--scan-rotation", type=int, choices=[0, 1, 2, 3], default=None, help="quarter turns applied by clean")
    group.add_argument("--flip", type=_bool, default=None, metavar="true|false", help="vertical mirror applied by clean")
    group.add_argument("--flop", type=_bool, default=None, metavar="true|false", help="horizontal mirror applied by clean")
    group.add_argument("--objective", default=None)
    group.add_argument("--machine", default=None)


def _bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in {"true", "1", "yes", "y", "on"}:
        return True
    if lowered in {"false", "0", "no", "n", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def ensure_animal(session: Session, animal: str) -> Animal:
    row = session.get(Animal, animal)
    if row is None:
        row = Animal(prep_id=animal, active=True, created=dt.datetime.now())
        session.add(row)
        session.flush()
    return row


def ensure_scan_run(session: Session, animal: str, file_type: str | None = None,
                    fields: Mapping[str, Any] | None = None) -> ScanRun:
    """The animal's active scan run, created with defaults the first time."""
    ensure_animal(session, animal)
    run = active_scan_run(session, animal)
    if run is None:
        run = ScanRun(FK_prep_id=animal, zresolution=20.0, rotation=0, flip=False, flop=False, width=0, height=0,
                      number_of_slides=0, channels_per_scene=1, file_type=file_type or "CZI", active=True,
                      created=dt.datetime.now())
        session.add(run)
        session.flush()
    elif file_type and run.file_type != file_type:
        run.file_type = file_type
    for name, value in (fields or {}).items():
        if value is not None:
            setattr(run, SCAN_RUN_FLAGS[name], value)
    return run


def active_scan_run(session: Session, animal: str) -> ScanRun | None:
    return session.scalars(
        select(ScanRun).where(ScanRun.FK_prep_id == animal, ScanRun.active.is_(True)).order_by(ScanRun.id.desc())
    ).first()


def require_scan_run(session: Session, animal: str) -> ScanRun:
    run = active_scan_run(session, animal)
    if run is None:
        raise StageError(f"animal {animal} has no scan run yet: run --task extract first")
    return run


def aligned_stack(ctx) -> tuple[list, float, float]:
    """The aligned sections a publishing stage reads, in the database's order now, with the
    pixel size (um) at the stage's resolution and the section thickness (um).

    The whole stack or nothing: every active section's aligned file must be recorded in
    file_log, unchanged on disk and made from the current version of its inputs, and the
    transforms must have been composed for the order the database gives now. Otherwise one
    line names the sections and the commands that fix them."""
    import json

    from db.queries import current_file, deactivate_sql
    from pipeline.layout import THUMBNAIL_FACTOR
    from pipeline.stages.section_files import list_sections

    with ctx.session() as session:
        scan_run = require_scan_run(session, ctx.animal)
        xy_um, z_um = scan_run.resolution, scan_run.zresolution
    try:
        sections = list_sections(ctx)
    except SlidepipeError as exc:
        raise StageError(exc.reason) from exc
    flags = f"--channel {ctx.channel} --downsample {str(ctx.downsample).lower()}"
    paths = [ctx.layout.aligned(ctx.channel, ctx.downsample, s.name) for s in sections]
    with ctx.session() as session:
        problems = [(s, problem) for s, path in zip(sections, paths)
                    if (problem := ctx.output_problem(session, path)) is not None]
        orders = set()
        for s in sections:
            composed = current_file(session, ctx.layout.relative(ctx.layout.section_transform(s.name)))
            if composed is not None and composed.result:
                orders.add(tuple(json.loads(composed.result).get("order") or ()))
    if problems:
        listed = "; ".join(f"{s.name} {problem}" for s, problem in problems[:5])
        more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
        sql = deactivate_sql([(s.slide_id, s.scene_index) for s, _ in problems])
        raise StageError(
            f"{len(problems)} of {len(sections)} aligned sections cannot be published ({listed}{more}): run --task align "
            f"{flags} (and the stages before it for those sections), or take them out of the stack: {sql}")
    names = tuple(s.name for s in sections)
    if orders and orders != {names}:
        raise StageError(f"the sections were reordered or (de)activated since align composed the transforms: "
                         f"run --task align {flags} again")
    if not xy_um:
        raise StageError(f"the scan run of {ctx.animal} has no pixel size: set it with --resolution UM")
    return paths, xy_um * (THUMBNAIL_FACTOR if ctx.downsample else 1), z_um
