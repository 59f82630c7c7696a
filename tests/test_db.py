"""Schema migrations, provenance queries and connection errors, on SQLite and on MariaDB."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import multiprocessing
import socket

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError

from db import queries
from db.models import (
    Animal,
    Base,
    ElastixTransformation,
    FileLog,
    Histology,
    PipelineRun,
    ScanRun,
    Slide,
    SlideCziToTif,
)
from db.session import _head_revision, alembic_config, init_db, make_engine, session_scope
from pipeline.errors import ConfigError, SlidepipeError

TABLES = {
    "animal",
    "histology",
    "scan_run",
    "slide",
    "slide_czi_to_tif",
    "elastix_transformation",
    "pipeline_run",
    "file_log",
    "file_input",
    "stage_lock",
}


@pytest.fixture
def engine(db_url):
    engine = init_db(db_url)
    yield engine
    engine.dispose()


def _now_like(default: str | None) -> bool:
    return (default or "").strip("() ").lower() in {"now", "now()", "current_timestamp", "current_timestamp()"}


def _compare_defaults(context, inspected_column, metadata_column, inspected, metadata, rendered):
    # Each backend reflects now() back in its own spelling; everything else is compared normally.
    if _now_like(inspected) and _now_like(rendered):
        return False
    return None


def _schema_differences(engine) -> list:
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": _compare_defaults}
        )
        return compare_metadata(context, Base.metadata)


# --------------------------------------------------------------------------------------------
# migrations


def test_upgrade_creates_schema_matching_models(engine):
    assert TABLES <= set(inspect(engine).get_table_names())
    with engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == _head_revision()
    assert _schema_differences(engine) == []


def test_downgrade_to_base_then_upgrade_again(engine, db_url):
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    assert set(inspect(engine).get_table_names()) - {"alembic_version"} == set()
    engine.dispose()
    again = init_db(db_url)
    try:
        assert TABLES <= set(inspect(again).get_table_names())
        assert _schema_differences(again) == []
    finally:
        again.dispose()


def test_upgrade_from_0002_keeps_sections_as_one_time_point(engine, db_url):
    """Revision 0003 adds time_points / time_point: rows extracted before it read as (1, 0)."""
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0002")
    assert "time_points" not in {c["name"] for c in inspect(engine).get_columns("slide_czi_to_tif")}
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO animal (prep_id) VALUES ('OLD')"))
        conn.execute(text("INSERT INTO scan_run (id, FK_prep_id) VALUES (1, 'OLD')"))
        conn.execute(text("INSERT INTO slide (id, FK_scan_run_id, slide_physical_id, file_name) VALUES (1, 1, 1, 'a.czi')"))
        conn.execute(text("INSERT INTO slide_czi_to_tif (FK_slide_id, file_name, scene_number, scene_index, scene_order, "
                          "channel, width, height, bbox_x, bbox_y, dtype, z_planes, z_plane) "
                          "VALUES (1, 'a_S1_C1.tif', 1, 0, 1, 1, 10, 10, 0, 0, 'uint16', 3, 1)"))
    engine.dispose()
    again = init_db(db_url)
    try:
        with session_scope(again) as session:
            row = session.scalars(select(SlideCziToTif)).one()
            assert (row.z_planes, row.z_plane, row.time_points, row.time_point) == (3, 1, 1, 0)
        assert _schema_differences(again) == []
    finally:
        again.dispose()


def test_init_db_again_keeps_rows(engine, db_url):
    with session_scope(engine) as session:
        session.add(Animal(prep_id="DK1", comments="hand-entered"))
    second = init_db(db_url)
    try:
        with session_scope(second) as session:
            assert session.get(Animal, "DK1").comments == "hand-entered"
    finally:
        second.dispose()


def _init_in_child(url: str) -> str:
    try:
        init_db(url).dispose()
        return "ok"
    except Exception as exc:  # returned, so the parent shows it
        return repr(exc)


def test_concurrent_init_db_on_empty_database(db_url):
    with multiprocessing.get_context("fork").Pool(3) as pool:
        assert pool.map(_init_in_child, [db_url] * 3) == ["ok"] * 3
    engine = make_engine(db_url)
    try:
        assert _schema_differences(engine) == []
    finally:
        engine.dispose()


def test_foreign_keys_are_enforced(engine):
    with pytest.raises(IntegrityError):
        with session_scope(engine) as session:
            session.add(Histology(FK_prep_id="NOSUCH"))


def test_session_scope_rolls_back_on_error(engine):
    with pytest.raises(RuntimeError):
        with session_scope(engine) as session:
            session.add(Animal(prep_id="DK2"))
            session.flush()
            raise RuntimeError("boom")
    with session_scope(engine) as session:
        assert session.get(Animal, "DK2") is None


def test_defaults_and_microsecond_timestamps(engine):
    started = dt.datetime(2026, 1, 2, 3, 4, 5, 678901)
    with session_scope(engine) as session:
        session.add(Animal(prep_id="DK3"))
        session.flush()
        session.add(ScanRun(FK_prep_id="DK3"))
        session.add(PipelineRun(FK_prep_id="DK3", stage="extract", started=started))
    with session_scope(engine) as session:
        scan_run = session.scalars(select(ScanRun)).one()
        assert (scan_run.zresolution, scan_run.file_type, scan_run.rotation, scan_run.flip) == (20.0, "CZI", 0, False)
        assert scan_run.active is True and isinstance(scan_run.created, dt.datetime)
        run = session.scalars(select(PipelineRun)).one()
        assert run.started == started
        assert (run.status, run.params, run.tasks_total) == ("running", "{}", 0)


def test_provenance_columns_hold_microseconds_and_long_text(engine):
    """MySQL DATETIME drops microseconds and TEXT stops at 64 KiB unless the schema says otherwise."""
    when = dt.datetime(2026, 1, 2, 3, 4, 5, 123456)
    errors = "\n".join(f"DK3/preps/tif/slide{i:05d}.tif: cannot decode scene {i}" for i in range(3000))
    assert len(errors) > 100_000
    with session_scope(engine) as session:
        run = PipelineRun(stage="extract", started=when, ended=when, error=errors, params=json.dumps({"x": errors}))
        session.add(run)
        session.add(FileLog(path="DK3/x.tif", kind="output", run=run, size=1, checksum="0" * 64, mtime_ns=1,
                            created=when, result=json.dumps({"log": errors})))  # fmt: skip
    with session_scope(engine) as session:
        run = session.scalars(select(PipelineRun)).one()
        assert (run.started, run.ended, run.error) == (when, when, errors)
        assert json.loads(run.params) == {"x": errors}
        row = session.scalars(select(FileLog)).one()
        assert row.created == when and json.loads(row.result) == {"log": errors}


def test_rows_inserted_by_hand_get_server_defaults(engine):
    """Users add animals and edit rows in the mysql client: defaults must live in the schema."""
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO animal (prep_id) VALUES ('DK4')"))
        conn.execute(text("INSERT INTO histology (FK_prep_id) VALUES ('DK4')"))
    with session_scope(engine) as session:
        animal = session.get(Animal, "DK4")
        assert animal.active is True and animal.created is not None
        histology = session.scalars(select(Histology)).one()
        assert (histology.orientation, histology.section_thickness, histology.scene_order) == ("coronal", 20.0, "ASC")


def test_file_paths_are_case_sensitive(engine):
    with session_scope(engine) as session:
        run = PipelineRun(stage="extract")
        session.add(run)
        session.flush()
        for name, size in (("DK5/a.tif", 1), ("DK5/A.tif", 2)):
            session.add(FileLog(path=name, kind="output", run=run, size=size, checksum="0" * 64, mtime_ns=0))
    with session_scope(engine) as session:
        assert queries.current_file(session, "DK5/a.tif").size == 1
        assert queries.current_file(session, "DK5/A.tif").size == 2


# --------------------------------------------------------------------------------------------
# ordered sections


def _section(slide: Slide, scene_index: int, scene_order: int, channel: int = 1, active: bool = True) -> SlideCziToTif:
    return SlideCziToTif(
        slide=slide,
        file_name=f"{slide.file_name[:-4]}_S{scene_index}_C{channel}.tif",
        scene_number=scene_index + 1,
        scene_index=scene_index,
        scene_order=scene_order,
        channel=channel,
        width=100,
        height=80,
        bbox_x=-5,
        bbox_y=7,
        dtype="uint16",
        active=active,
    )


def _slides(session) -> None:
    """Slides inserted out of order, scene_order edited against scene_index, inactive rows."""
    session.add(Animal(prep_id="DK7"))
    session.flush()
    old = ScanRun(FK_prep_id="DK7", active=False)
    scan = ScanRun(FK_prep_id="DK7")
    session.add_all([old, scan])
    slide2 = Slide(scan_run=scan, slide_physical_id=2, file_name="DK7_slide002.czi", file_size=1, checksum="a")
    slide1 = Slide(scan_run=scan, slide_physical_id=1, file_name="DK7_slide001.czi", file_size=1, checksum="b")
    bad = Slide(scan_run=scan, slide_physical_id=3, file_name="DK7_slide003.czi", file_size=1, checksum="c", active=False)
    retired = Slide(scan_run=old, slide_physical_id=0, file_name="DK7_old.czi", file_size=1, checksum="d")
    session.add_all([slide2, slide1, bad, retired])
    session.add_all(
        [
            _section(slide2, 0, 2),
            _section(slide2, 1, 1),
            _section(slide2, 2, 1),  # same scene_order: scene_index breaks the tie
            _section(slide1, 0, 1),
            _section(slide1, 1, 2, active=False),
            _section(slide1, 0, 1, channel=2),
            _section(bad, 0, 1),
            _section(retired, 0, 1),
        ]
    )


def _names(sections) -> list[str]:
    return [s.file_name for s in sections]


def test_ordered_sections_follow_slide_number_then_scene_order(engine):
    with session_scope(engine) as session:
        _slides(session)
    with session_scope(engine) as session:
        sections = queries.ordered_sections(session, "DK7")
        assert _names(sections) == [
            "DK7_slide001_S0_C1.tif",
            "DK7_slide002_S1_C1.tif",
            "DK7_slide002_S2_C1.tif",
            "DK7_slide002_S0_C1.tif",
        ]
        assert _names(queries.ordered_sections(session, "DK7", channel=2)) == ["DK7_slide001_S0_C2.tif"]
        everything = queries.ordered_sections(session, "DK7", active_only=False)
        assert _names(everything) == [
            "DK7_slide001_S0_C1.tif",
            "DK7_slide001_S1_C1.tif",
            "DK7_slide002_S1_C1.tif",
            "DK7_slide002_S2_C1.tif",
            "DK7_slide002_S0_C1.tif",
            "DK7_slide003_S0_C1.tif",
        ]
        assert queries.ordered_sections(session, "NOSUCH") == []
    assert sections[0].slide.slide_physical_id == 1  # loaded with the section, usable after the session


def test_ordered_sections_follow_user_edits(engine):
    with session_scope(engine) as session:
        _slides(session)
    with session_scope(engine) as session:
        first, second, *_ = queries.ordered_sections(session, "DK7")
        first.active = False
        session.scalars(select(SlideCziToTif).where(SlideCziToTif.file_name == "DK7_slide002_S0_C1.tif")).one().scene_order = 0
    with session_scope(engine) as session:
        assert _names(queries.ordered_sections(session, "DK7")) == [
            "DK7_slide002_S0_C1.tif",
            "DK7_slide002_S1_C1.tif",
            "DK7_slide002_S2_C1.tif",
        ]


def test_ordered_sections_keep_positions_equal_across_channels(engine):
    """An edit made on one channel row of a scene moves or removes the scene in every channel."""
    with session_scope(engine) as session:
        _slides(session)
        slide1 = session.scalars(select(Slide).where(Slide.slide_physical_id == 1)).one()
        slide2 = session.scalars(select(Slide).where(Slide.slide_physical_id == 2)).one()
        session.add_all([_section(slide2, i, order, channel=2) for i, order in ((0, 2), (1, 1), (2, 1))])
        session.flush()
        # Channel 1 of scene 2 moves first; channel 2 of slide 1's scene 0 is marked bad.
        row = session.scalars(select(SlideCziToTif).where(SlideCziToTif.FK_slide_id == slide2.id,
                                                          SlideCziToTif.scene_index == 2, SlideCziToTif.channel == 1)).one()  # fmt: skip
        row.scene_order = 0
        session.scalars(select(SlideCziToTif).where(SlideCziToTif.FK_slide_id == slide1.id,
                                                    SlideCziToTif.channel == 2)).one().active = False  # fmt: skip
    with session_scope(engine) as session:
        one = [(s.slide.slide_physical_id, s.scene_index) for s in queries.ordered_sections(session, "DK7", channel=1)]
        two = [(s.slide.slide_physical_id, s.scene_index) for s in queries.ordered_sections(session, "DK7", channel=2)]
    assert one == two == [(2, 2), (2, 1), (2, 0)]


def test_unique_scene_channel_per_slide(engine):
    with pytest.raises(IntegrityError):
        with session_scope(engine) as session:
            _slides(session)
            session.flush()
            slide = session.scalars(select(Slide).where(Slide.slide_physical_id == 1)).one()
            session.add(_section(slide, 0, 5))


# --------------------------------------------------------------------------------------------
# provenance


def _file(session, path: str, run: PipelineRun | None, inputs=(), checksum: str | None = None) -> FileLog:
    row = FileLog(
        path=path,
        kind="output" if run else "external",
        run=run,
        task_key=path.rsplit("/", 1)[-1] if run else None,
        fingerprint="f" * 64 if run else None,
        size=len(path),
        checksum=checksum or path.encode().hex()[:64].ljust(64, "0"),
        mtime_ns=1_700_000_000_000_000_000,
        result=json.dumps({"made": path}) if run else None,
    )
    row.inputs.extend(inputs)
    session.add(row)
    session.flush()
    return row


def _provenance(session) -> dict[str, int]:
    """czi (external) -> extract -> tif -> align -> aligned -> neuroglancer -> layer directory."""
    extract = PipelineRun(
        FK_prep_id="DK9",
        stage="extract",
        channel=1,
        params=json.dumps({"downsample": False}),
        software_versions=json.dumps({"pylibCZIrw": "6.1"}),
        code_version="abc123",
        started=dt.datetime(2026, 1, 1, 10, 0, 0, 1),
        ended=dt.datetime(2026, 1, 1, 10, 5),
        status="success",
    )
    align = PipelineRun(FK_prep_id="DK9", stage="align", channel=1, started=dt.datetime(2026, 1, 1, 11), status="success")
    publish = PipelineRun(
        FK_prep_id="DK9",
        stage="neuroglancer",
        channel=1,
        resolution="full",
        params=json.dumps({"chunk": [64, 64, 1]}),
        software_versions=json.dumps({"cloud-volume": "12.15"}),
        started=dt.datetime(2026, 1, 1, 12),
        status="success",
    )
    other = PipelineRun(FK_prep_id="DK8", stage="extract", started=dt.datetime(2026, 1, 1, 13), status="failed")
    session.add_all([extract, align, publish, other])
    session.flush()
    czi = _file(session, "DK9/czi/DK9_slide001.czi", None)
    tif0 = _file(session, "DK9/preps/tif/DK9_slide001_S0_C1.tif", extract, [czi])
    tif1 = _file(session, "DK9/preps/tif/DK9_slide001_S1_C1.tif", extract, [czi])
    old = _file(session, "DK9/preps/CH1/full_aligned/000.tif", align, [tif0], checksum="1" * 64)
    aligned0 = _file(session, "DK9/preps/CH1/full_aligned/000.tif", align, [tif0], checksum="2" * 64)
    aligned1 = _file(session, "DK9/preps/CH1/full_aligned/001.tif", align, [tif1, tif0])
    layer = _file(session, "DK9/www/neuroglancer_data/C1", publish, [aligned0, aligned1])
    return {"extract": extract.id, "align": align.id, "publish": publish.id, "other": other.id,
            "czi": czi.id, "tif0": tif0.id, "tif1": tif1.id, "old": old.id, "aligned0": aligned0.id,
            "aligned1": aligned1.id, "layer": layer.id}  # fmt: skip


def test_files_of_run_and_current_file(engine):
    with session_scope(engine) as session:
        ids = _provenance(session)
    with session_scope(engine) as session:
        assert [f.id for f in queries.files_of_run(session, ids["extract"])] == [ids["tif0"], ids["tif1"]]
        assert [f.id for f in queries.files_of_run(session, ids["align"])] == [ids["old"], ids["aligned0"], ids["aligned1"]]
        assert queries.files_of_run(session, ids["other"]) == []
        assert queries.current_file(session, "DK9/preps/CH1/full_aligned/000.tif").id == ids["aligned0"]
        assert queries.current_file(session, "./DK9/preps/CH1/full_aligned/000.tif").id == ids["aligned0"]
        assert queries.current_file(session, "DK9/preps/CH1/full_aligned/999.tif") is None


def test_runs_newest_first(engine):
    with session_scope(engine) as session:
        ids = _provenance(session)
    with session_scope(engine) as session:
        assert [r.id for r in queries.runs(session)] == [ids["other"], ids["publish"], ids["align"], ids["extract"]]
        assert [r.id for r in queries.runs(session, animal="DK9")] == [ids["publish"], ids["align"], ids["extract"]]
        assert [r.id for r in queries.runs(session, stage="extract")] == [ids["other"], ids["extract"]]
        assert [r.id for r in queries.runs(session, animal="DK9", stage="extract")] == [ids["extract"]]


def test_how_was_made_a_chunk_of_a_published_layer(engine, tmp_path):
    with session_scope(engine) as session:
        ids = _provenance(session)
    chunk = "DK9/www/neuroglancer_data/C1/1000_1000_20000/0-64_0-64_0-1"
    on_disk = tmp_path / (chunk + ".gz")
    on_disk.parent.mkdir(parents=True)
    on_disk.write_bytes(b"chunk bytes")
    with session_scope(engine) as session:
        made = queries.how_was_made(session, chunk, data_root=tmp_path)
        with pytest.raises(SlidepipeError, match="no such file"):
            queries.how_was_made(session, chunk.replace("0-1", "1-2"), data_root=tmp_path)
    json.dumps(made)  # a CLI prints it as JSON
    assert made["path"] == chunk and made["recorded_path"] == "DK9/www/neuroglancer_data/C1"
    assert made["file"] == chunk + ".gz" and made["size"] == len(b"chunk bytes")
    assert made["checksum"] == hashlib.sha256(b"chunk bytes").hexdigest()
    assert made["covered_by"]["id"] == ids["layer"]
    assert made["run"]["id"] == ids["publish"] and made["run"]["stage"] == "neuroglancer"
    assert made["run"]["params"] == {"chunk": [64, 64, 1]}
    assert made["run"]["software_versions"] == {"cloud-volume": "12.15"}
    assert (made["run"]["resolution"], made["run"]["channel"], made["run"]["status"]) == ("full", 1, "success")
    assert made["inputs"] == [
        {"path": "DK9/preps/CH1/full_aligned/000.tif", "checksum": "2" * 64, "kind": "output", "stage": "align"},
        {"path": "DK9/preps/CH1/full_aligned/001.tif", "checksum": made["inputs"][1]["checksum"], "kind": "output", "stage": "align"},
    ]


def test_how_was_made_a_section_tiff(engine, tmp_path):
    with session_scope(engine) as session:
        _provenance(session)
    with session_scope(engine) as session:
        made = queries.how_was_made(session, str(tmp_path / "DK9/preps/tif/DK9_slide001_S0_C1.tif"), data_root=tmp_path)
    assert made["recorded_path"] == made["path"] == "DK9/preps/tif/DK9_slide001_S0_C1.tif"
    assert made["result"] == {"made": "DK9/preps/tif/DK9_slide001_S0_C1.tif"}
    run = made["run"]
    assert (run["stage"], run["code_version"], run["params"]) == ("extract", "abc123", {"downsample": False})
    assert run["software_versions"] == {"pylibCZIrw": "6.1"}
    assert run["started"] == "2026-01-01T10:00:00.000001" and run["ended"] == "2026-01-01T10:05:00"
    assert made["inputs"] == [
        {"path": "DK9/czi/DK9_slide001.czi", "checksum": made["inputs"][0]["checksum"], "kind": "external", "stage": None}
    ]


def test_lineage_walks_back_to_the_slide(engine):
    with session_scope(engine) as session:
        ids = _provenance(session)
    with session_scope(engine) as session:
        full = queries.lineage(session, "DK9/www/neuroglancer_data/C1/1000_1000_20000/0-64_0-64_0-1")
        short = queries.lineage(session, "DK9/www/neuroglancer_data/C1", depth=1)
    by_id = {e["id"]: e for e in full}
    assert [e["id"] for e in full] == [ids["layer"], ids["aligned0"], ids["aligned1"], ids["tif0"], ids["tif1"], ids["czi"]]
    assert [e["depth"] for e in full] == [0, 1, 1, 2, 2, 3]
    assert by_id[ids["layer"]]["input_ids"] == [ids["aligned0"], ids["aligned1"]]
    assert by_id[ids["aligned1"]]["input_ids"] == [ids["tif0"], ids["tif1"]]
    assert by_id[ids["tif0"]]["input_ids"] == [ids["czi"]] and by_id[ids["czi"]]["input_ids"] == []
    assert (by_id[ids["czi"]]["stage"], by_id[ids["czi"]]["kind"]) == (None, "external")
    assert by_id[ids["tif1"]]["stage"] == "extract" and ids["old"] not in by_id
    assert [e["id"] for e in short] == [ids["layer"], ids["aligned0"], ids["aligned1"]]
    json.dumps(full)


def test_how_was_made_unknown_file_is_a_clear_error(engine):
    with session_scope(engine) as session:
        _provenance(session)
    with session_scope(engine) as session:
        with pytest.raises(SlidepipeError, match="DK9/preps/nothing.tif: no record of this file"):
            queries.how_was_made(session, "DK9/preps/nothing.tif")
        with pytest.raises(SlidepipeError, match="relative to the data root"):
            queries.lineage(session, "/abs/DK9/preps/nothing.tif")


def test_elastix_transformation_links_sections_and_run(engine):
    with session_scope(engine) as session:
        _slides(session)
        run = PipelineRun(FK_prep_id="DK7", stage="align")
        session.add(run)
        session.flush()
        fixed, moving, *_ = queries.ordered_sections(session, "DK7")
        session.add(ElastixTransformation(FK_prep_id="DK7", moving_section=moving, fixed_section=fixed, section="001",
                                          rotation=0.05, xshift=3.5, yshift=-2.0, metric=-0.8, iteration=200, run=run))  # fmt: skip
    with session_scope(engine) as session:
        row = session.scalars(select(ElastixTransformation)).one()
        assert (row.moving_section.id, row.fixed_section.id) == (moving.id, fixed.id)
        assert (row.rotation, row.manual, row.resolution, row.run.stage) == (0.05, False, "thumbnail", "align")


# --------------------------------------------------------------------------------------------
# connection errors


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _one_line_without_password(error: ConfigError, password: str) -> str:
    message = str(error)
    assert "\n" not in message and password not in message
    assert message.startswith("cannot connect to database ")
    return message


def test_unreachable_mysql_server_is_one_clear_line():
    port = _closed_port()
    with pytest.raises(ConfigError) as caught:
        init_db(f"mysql+pymysql://slidepipe:Sup3rSecret@127.0.0.1:{port}/slidepipe")
    message = _one_line_without_password(caught.value, "Sup3rSecret")
    assert f"mysql+pymysql://slidepipe:***@127.0.0.1:{port}/slidepipe" in message
    assert "Can't connect" in message


@pytest.mark.mysql
def test_wrong_mysql_password_is_one_clear_line(_mysql_server):
    url = _mysql_server.set(password="Wr0ngPassword", database="slidepipe_never").render_as_string(hide_password=False)
    with pytest.raises(ConfigError) as caught:
        init_db(url)
    assert "Access denied" in _one_line_without_password(caught.value, "Wr0ngPassword")


def test_sqlite_directory_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError) as caught:
        init_db(f"sqlite:///{blocker}/sub/slidepipe.db", create_dir=True)
    message = _one_line_without_password(caught.value, "\0")
    assert f"cannot create directory {blocker}/sub" in message


@pytest.mark.parametrize(
    "url, reason",
    [
        ("postgresql://user:Secr3t@localhost/db", "unsupported database 'postgresql'"),
        ("not a url at all", "not a valid database URL"),
        ("mysql+nosuchdriver://user:Secr3t@localhost/db", "nosuchdriver"),
    ],
)
def test_unusable_urls(url, reason):
    with pytest.raises(ConfigError) as caught:
        init_db(url)
    assert reason in _one_line_without_password(caught.value, "Secr3t")
