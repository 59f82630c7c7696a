"""DB rows every stage needs: the animal and its active scan run (created on first use, so no
separate portal is needed), and the scan-run fields a user may set from the command line."""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any, Mapping

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Animal, ScanRun
from pipeline.errors import StageError

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
    """The aligned sections a publishing stage reads, with the pixel size (um) at the stage's
    resolution and the section thickness (um); a clear error when anything is missing."""
    from db.queries import ordered_sections
    from pipeline.layout import THUMBNAIL_FACTOR

    with ctx.session() as session:
        scan_run = require_scan_run(session, ctx.animal)
        xy_um, z_um = scan_run.resolution, scan_run.zresolution
        count = len(ordered_sections(session, ctx.animal, ctx.channel))
    if not xy_um:
        raise StageError(f"the scan run of {ctx.animal} has no pixel size: set it with --resolution UM")
    if count == 0:
        raise StageError(f"animal {ctx.animal} has no active sections in channel {ctx.channel}")
    sections = [ctx.layout.aligned(ctx.channel, ctx.downsample, i) for i in range(count)]
    missing = [p for p in sections if not p.is_file()]
    if missing:
        raise StageError(f"{len(missing)} of {count} aligned sections are missing (first: {missing[0]}); "
                         f"run --task align --channel {ctx.channel} --downsample {str(ctx.downsample).lower()} first")
    return sections, xy_um * (THUMBNAIL_FACTOR if ctx.downsample else 1), z_um
