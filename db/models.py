"""The provenance database: the lab's familiar tables plus pipeline_run / file_log.

Table and column names (FK_ prefixes included) match the lab pipeline slidepipe replaces, so
users' existing SQL keeps working. Types stay portable between SQLite and MySQL/MariaDB: every
String has a length (MySQL needs one), indexed strings stay <= 700 characters (3072-byte index
limit under utf8mb4), and the few MySQL-only refinements are type variants.
"""

from __future__ import annotations

import os
import socket
import datetime as dt
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

_MYSQL = ("mysql", "mariadb")

# Deterministic constraint names: Alembic batch mode on SQLite and downgrades on MySQL need to
# name the constraints they drop. All generated names stay under MySQL's 64-character limit.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Provenance timestamps keep microseconds on MySQL (DATETIME defaults to whole seconds there),
# so runs and files started within one second still sort correctly.
Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), *_MYSQL)

# TEXT is 64 KiB on MySQL: too small for the error list of a big failed run or a task result.
LongText = Text().with_variant(mysql.MEDIUMTEXT(), *_MYSQL)

# File paths are case-sensitive on the file systems we write to; MySQL's default collation is not.
PathString = String(700).with_variant(mysql.VARCHAR(700, charset="utf8mb4", collation="utf8mb4_bin"), *_MYSQL)


def _now() -> datetime:
    return datetime.now()


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _active() -> Mapped[bool]:
    return mapped_column(Boolean, default=True, server_default=text("1"), nullable=False)


def _created() -> Mapped[datetime]:
    # server_default too, so rows a user inserts by hand in the mysql client get a date.
    return mapped_column(DateTime, default=_now, server_default=func.now(), nullable=False)


def _comments() -> Mapped[str | None]:
    return mapped_column(Text, nullable=True)


# --------------------------------------------------------------------------------------------
# Familiar lab tables
# --------------------------------------------------------------------------------------------


class Animal(Base):
    __tablename__ = "animal"

    prep_id: Mapped[str] = mapped_column(String(20), primary_key=True)
    performance_center: Mapped[str | None] = mapped_column(String(100))
    species: Mapped[str | None] = mapped_column(String(100))
    strain: Mapped[str | None] = mapped_column(String(100))
    sex: Mapped[str | None] = mapped_column(String(10))
    date: Mapped[dt.date | None] = mapped_column(Date)
    comments: Mapped[str | None] = _comments()
    active: Mapped[bool] = _active()
    created: Mapped[datetime] = _created()

    histologies: Mapped[list[Histology]] = relationship(back_populates="animal")
    scan_runs: Mapped[list[ScanRun]] = relationship(back_populates="animal")

    def __repr__(self) -> str:
        return f"Animal({self.prep_id!r})"


class Histology(Base):
    __tablename__ = "histology"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    FK_prep_id: Mapped[str] = mapped_column(String(20), ForeignKey("animal.prep_id"), index=True)
    anatomist: Mapped[str | None] = mapped_column(String(100))
    virus: Mapped[str | None] = mapped_column(String(100))
    label: Mapped[str | None] = mapped_column(String(100))
    cutting_plane: Mapped[str | None] = mapped_column(String(20))
    orientation: Mapped[str] = mapped_column(String(20), default="coronal", server_default="coronal")
    section_thickness: Mapped[float] = mapped_column(Float, default=20.0, server_default=text("20"))
    """Micrometres."""
    side_sectioned_first: Mapped[str | None] = mapped_column(String(20))
    scene_order: Mapped[str] = mapped_column(String(4), default="ASC", server_default="ASC")
    comments: Mapped[str | None] = _comments()
    active: Mapped[bool] = _active()
    created: Mapped[datetime] = _created()

    animal: Mapped[Animal] = relationship(back_populates="histologies")


class ScanRun(Base):
    __tablename__ = "scan_run"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    FK_prep_id: Mapped[str] = mapped_column(String(20), ForeignKey("animal.prep_id"), index=True)
    machine: Mapped[str | None] = mapped_column(String(100))
    objective: Mapped[str | None] = mapped_column(String(100))
    resolution: Mapped[float | None] = mapped_column(Float)
    """Micrometres per pixel in x and y at full resolution."""
    zresolution: Mapped[float] = mapped_column(Float, default=20.0, server_default=text("20"))
    """Micrometres between sections."""
    number_of_slides: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    scan_date: Mapped[dt.date | None] = mapped_column(Date)
    file_type: Mapped[str] = mapped_column(String(10), default="CZI", server_default="CZI")
    """'CZI' or 'TIFF'."""
    channels_per_scene: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))
    rotation: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    """Quarter turns (0-3) applied to every section by the clean stage."""
    flip: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("0"))
    """Vertical mirror (upside down)."""
    flop: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("0"))
    """Horizontal mirror (left-right)."""
    width: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    height: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    """Canvas size at full resolution, set by the clean stage."""
    comments: Mapped[str | None] = _comments()
    active: Mapped[bool] = _active()
    created: Mapped[datetime] = _created()

    animal: Mapped[Animal] = relationship(back_populates="scan_runs")
    slides: Mapped[list[Slide]] = relationship(back_populates="scan_run")


class Slide(Base):
    __tablename__ = "slide"
    __table_args__ = (UniqueConstraint("FK_scan_run_id", "file_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    FK_scan_run_id: Mapped[int] = mapped_column(Integer, ForeignKey("scan_run.id"), index=True)
    slide_physical_id: Mapped[int] = mapped_column(Integer)
    """Slide number: sections are ordered by this first."""
    file_name: Mapped[str] = mapped_column(String(255))
    file_size: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    checksum: Mapped[str | None] = mapped_column(String(64))
    """sha256 hex of the slide file."""
    scenes: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    processed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("0"))
    slide_status: Mapped[str] = mapped_column(String(10), default="Good", server_default="Good")
    acquisition_date: Mapped[datetime | None] = mapped_column(DateTime)
    objective: Mapped[str | None] = mapped_column(String(100))
    magnification: Mapped[float | None] = mapped_column(Float)
    pixel_size_x_um: Mapped[float | None] = mapped_column(Float)
    pixel_size_y_um: Mapped[float | None] = mapped_column(Float)
    comments: Mapped[str | None] = _comments()
    active: Mapped[bool] = _active()
    created: Mapped[datetime] = _created()

    scan_run: Mapped[ScanRun] = relationship(back_populates="slides")
    sections: Mapped[list[SlideCziToTif]] = relationship(back_populates="slide")

    def __repr__(self) -> str:
        return f"Slide(id={self.id}, {self.file_name!r}, physical={self.slide_physical_id})"


class SlideCziToTif(Base):
    """One section channel: scene x channel of a slide, and the TIFF extracted from it."""

    __tablename__ = "slide_czi_to_tif"
    __table_args__ = (UniqueConstraint("FK_slide_id", "scene_index", "channel"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    FK_slide_id: Mapped[int] = mapped_column(Integer, ForeignKey("slide.id"), index=True)
    file_name: Mapped[str] = mapped_column(String(255))
    """Name of the extracted full-resolution TIFF (stable: derived from slide and scene)."""
    scene_number: Mapped[int] = mapped_column(Integer)
    """1-based, as Zeiss numbers scenes."""
    scene_index: Mapped[int] = mapped_column(Integer)
    """0-based index of the scene in the CZI."""
    scene_order: Mapped[int] = mapped_column(Integer)
    """Order on the slide; users edit it to reorder sections."""
    channel: Mapped[int] = mapped_column(Integer)
    """1-based."""
    channel_name: Mapped[str | None] = mapped_column(String(100))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    bbox_x: Mapped[int] = mapped_column(Integer)
    bbox_y: Mapped[int] = mapped_column(Integer)
    """Scene bounding-box origin in CZI pixel coordinates (may be negative)."""
    dtype: Mapped[str] = mapped_column(String(16))
    samples_per_pixel: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))
    z_planes: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))
    z_plane: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    """The z plane (0-based) the extracted TIFF holds; set when the TIFF is written."""
    time_points: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))
    """Time points (T) of the scene in the source file. Added by revision 0003."""
    time_point: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    """The time point (0-based) the extracted TIFF holds; set when the TIFF is written."""
    file_size: Mapped[int | None] = mapped_column(BigInteger)
    checksum: Mapped[str | None] = mapped_column(String(64))
    processing_duration: Mapped[float | None] = mapped_column(Float)
    """Seconds spent extracting this TIFF."""
    mirrored: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("0"), nullable=False)
    """The user's word that the section is mounted face down (channel-1 row; `--task align --section S
    --mirrored true`): align mirrors it left-right before registering and in its output. Revision 0006."""
    active: Mapped[bool] = _active()
    comments: Mapped[str | None] = _comments()
    created: Mapped[datetime] = _created()

    slide: Mapped[Slide] = relationship(back_populates="sections")

    def __repr__(self) -> str:
        return f"SlideCziToTif(id={self.id}, {self.file_name!r}, active={self.active})"


class ElastixTransformation(Base):
    """Rigid transform of one section onto its fixed neighbour, in thumbnail pixels."""

    __tablename__ = "elastix_transformation"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    FK_prep_id: Mapped[str] = mapped_column(String(20), ForeignKey("animal.prep_id"), index=True)
    FK_section_id: Mapped[int] = mapped_column(Integer, ForeignKey("slide_czi_to_tif.id"), index=True)
    """The moving section's channel-1 row."""
    section: Mapped[str] = mapped_column(String(5))
    """Position of the moving section ('000'), as the lab pipeline stored it."""
    FK_fixed_section_id: Mapped[int | None] = mapped_column(
        Integer, ForeignKey("slide_czi_to_tif.id"), index=True
    )
    rotation: Mapped[float] = mapped_column(Float, default=0.0, server_default=text("0"))
    """Radians."""
    xshift: Mapped[float] = mapped_column(Float, default=0.0, server_default=text("0"))
    yshift: Mapped[float] = mapped_column(Float, default=0.0, server_default=text("0"))
    metric: Mapped[float | None] = mapped_column(Float)
    iteration: Mapped[int | None] = mapped_column(Integer)
    manual: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("0"))
    resolution: Mapped[str] = mapped_column(String(10), default="thumbnail", server_default="thumbnail")
    FK_pipeline_run_id: Mapped[int | None] = mapped_column(Integer, ForeignKey("pipeline_run.id"), index=True)
    active: Mapped[bool] = _active()
    created: Mapped[datetime] = _created()

    moving_section: Mapped[SlideCziToTif] = relationship(foreign_keys=[FK_section_id])
    fixed_section: Mapped[SlideCziToTif | None] = relationship(foreign_keys=[FK_fixed_section_id])
    run: Mapped[PipelineRun | None] = relationship()


class AlignmentMetric(Base):
    """How alike one section and its previous neighbour are as aligned (create_metrics): a dip
    along the stack points at a bad section or a bad transform. Added by revision 0002."""

    __tablename__ = "alignment_metric"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    FK_prep_id: Mapped[str] = mapped_column(String(20), ForeignKey("animal.prep_id"), index=True)
    FK_section_id: Mapped[int] = mapped_column(Integer, ForeignKey("slide_czi_to_tif.id"), index=True)
    """The section's row in the measured channel."""
    FK_fixed_section_id: Mapped[int | None] = mapped_column(Integer, ForeignKey("slide_czi_to_tif.id"), index=True)
    """Its previous neighbour's row."""
    section: Mapped[str] = mapped_column(String(5))
    channel: Mapped[int] = mapped_column(Integer)
    resolution: Mapped[str] = mapped_column(String(10))
    ncc: Mapped[float | None] = mapped_column(Float)
    """Normalised cross-correlation of the tissue both sections cover (-1..1)."""
    mutual_information: Mapped[float | None] = mapped_column(Float)
    """Bits, from a 32 x 32 joint histogram of the same pixels."""
    overlap_fraction: Mapped[float | None] = mapped_column(Float)
    """Shared tissue / the smaller section's tissue."""
    FK_pipeline_run_id: Mapped[int | None] = mapped_column(Integer, ForeignKey("pipeline_run.id"), index=True)
    created: Mapped[datetime] = _created()


# --------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------


class PipelineRun(Base):
    """One invocation of one stage."""

    __tablename__ = "pipeline_run"
    __table_args__ = (Index("ix_pipeline_run_prep_stage", "FK_prep_id", "stage"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Not a foreign key: a run may fail before the animal row exists, and must still be recorded.
    FK_prep_id: Mapped[str | None] = mapped_column(String(20))
    stage: Mapped[str] = mapped_column(String(40))
    channel: Mapped[int | None] = mapped_column(Integer)
    resolution: Mapped[str | None] = mapped_column(String(10))
    params: Mapped[str] = mapped_column(LongText, default="{}")
    """JSON."""
    software_versions: Mapped[str] = mapped_column(LongText, default="{}")
    """JSON: package -> version."""
    code_version: Mapped[str] = mapped_column(String(40), default="unknown")
    host: Mapped[str] = mapped_column(String(255), default=socket.gethostname)
    pid: Mapped[int] = mapped_column(Integer, default=os.getpid)
    command: Mapped[str | None] = mapped_column(LongText)
    started: Mapped[datetime] = mapped_column(Timestamp, default=_now)
    ended: Mapped[datetime | None] = mapped_column(Timestamp)
    status: Mapped[str] = mapped_column(String(10), default="running")
    """'running', 'success' or 'failed'."""
    error: Mapped[str | None] = mapped_column(LongText)
    """One line per failed task: '<file>: <reason>'."""
    summary: Mapped[str | None] = mapped_column(LongText)
    """JSON: what the stage found beyond the counts (`StageContext.summarise`), e.g. align's QC."""
    tasks_total: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    tasks_run: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    tasks_skipped: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    tasks_failed: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))

    files: Mapped[list[FileLog]] = relationship(back_populates="run")

    def __repr__(self) -> str:
        return f"PipelineRun(id={self.id}, {self.stage!r}, {self.FK_prep_id!r}, {self.status!r})"


class StageLock(Base):
    """The runner that holds an animal's stage (one row while it runs): acquired by INSERT, so
    the primary key makes one of two concurrent runners fail, on SQLite and MySQL alike and
    across machines. `channel` 0 / `resolution` 'any' mean every channel / resolution (for a
    stage whose files do not depend on them). `db.locks` takes, refreshes and releases it."""

    __tablename__ = "stage_lock"

    FK_prep_id: Mapped[str] = mapped_column(String(20), primary_key=True)
    stage: Mapped[str] = mapped_column(String(40), primary_key=True)
    channel: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    resolution: Mapped[str] = mapped_column(String(10), primary_key=True)
    token: Mapped[str] = mapped_column(String(32))
    """Random per acquisition: refresh, release and takeover change the row only while it holds."""
    # Not a foreign key: the lock is taken before the holder's run row is written.
    FK_pipeline_run_id: Mapped[int | None] = mapped_column(Integer)
    user: Mapped[str] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    acquired: Mapped[datetime] = mapped_column(Timestamp)
    heartbeat: Mapped[datetime] = mapped_column(Timestamp)
    lease_seconds: Mapped[int] = mapped_column(Integer)
    """The holder's lease: without a heartbeat for this long it may be taken over."""

    def __repr__(self) -> str:
        return f"StageLock({self.FK_prep_id!r}, {self.stage!r}, C{self.channel}, {self.resolution!r}, run {self.FK_pipeline_run_id})"


file_input = Table(
    "file_input",
    Base.metadata,
    Column("file_id", Integer, ForeignKey("file_log.id", ondelete="CASCADE"), primary_key=True),
    Column("input_id", Integer, ForeignKey("file_log.id", ondelete="CASCADE"), primary_key=True, index=True),
)
"""Which recorded files (file_log rows) a file was made from."""


class FileLog(Base):
    """One version of one artifact. A path gets a new row each time it is (re)made or (for an
    external input) re-hashed; the row with the highest id is current."""

    __tablename__ = "file_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(PathString, index=True)
    """Relative to the data root, POSIX separators."""
    kind: Mapped[str] = mapped_column(String(10))
    """'output' (made by a run) or 'external' (an input we only hashed, e.g. a CZI)."""
    FK_pipeline_run_id: Mapped[int | None] = mapped_column(Integer, ForeignKey("pipeline_run.id"), index=True)
    task_key: Mapped[str | None] = mapped_column(String(255))
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    checksum: Mapped[str] = mapped_column(String(64))
    """sha256 hex."""
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    result: Mapped[str | None] = mapped_column(LongText)
    """JSON the task returned."""
    created: Mapped[datetime] = mapped_column(Timestamp, default=_now)

    run: Mapped[PipelineRun | None] = relationship(back_populates="files")
    inputs: Mapped[list[FileLog]] = relationship(
        secondary=file_input,
        primaryjoin=lambda: FileLog.id == file_input.c.file_id,
        secondaryjoin=lambda: FileLog.id == file_input.c.input_id,
        back_populates="used_by",
    )
    used_by: Mapped[list[FileLog]] = relationship(
        secondary=file_input,
        primaryjoin=lambda: FileLog.id == file_input.c.input_id,
        secondaryjoin=lambda: FileLog.id == file_input.c.file_id,
        back_populates="inputs",
    )

    def __repr__(self) -> str:
        return f"FileLog(id={self.id}, {self.path!r}, {self.kind!r})"
