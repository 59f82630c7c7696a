"""Test helpers: DB rows of an animal whose aligned stack a test places on disk itself, so a
publishing stage can run without extract/mask/clean/align (`seed_sections` + `record_outputs`)."""

from __future__ import annotations

import datetime as dt

from db.models import Animal, ScanRun, Slide, SlideCziToTif
from db.session import init_db, session_scope
from pipeline.layout import section_key


def seed_sections(db_url: str, animal: str, sections: int, *, channels: int = 1, resolution_um: float = 0.325,
                  z_um: float = 20.0, dtype: str = "uint16") -> list[str]:
    """One slide `slide1.czi` of `sections` scenes; returns the section keys (file names) in order."""
    engine = init_db(db_url)
    with session_scope(engine) as s:
        s.add(Animal(prep_id=animal))
        run = ScanRun(FK_prep_id=animal, resolution=resolution_um, zresolution=z_um, channels_per_scene=channels,
                      file_type="CZI")
        s.add(run)
        s.flush()
        slide = Slide(FK_scan_run_id=run.id, slide_physical_id=1, file_name="slide1.czi", scenes=sections)
        s.add(slide)
        s.flush()
        for i in range(sections):
            for c in range(1, channels + 1):
                s.add(SlideCziToTif(FK_slide_id=slide.id, file_name=f"slide1_S{i + 1}_C{c}.tif", scene_number=i + 1,
                                    scene_index=i, scene_order=i, channel=c, width=10, height=10, bbox_x=0,
                                    bbox_y=0, dtype=dtype, created=dt.datetime.now()))
    engine.dispose()
    return [section_key("slide1", i) for i in range(sections)]


def record_outputs(db_url: str, data_root, paths, stage: str = "align", animal: str | None = None) -> None:
    """Record files a test wrote itself as outputs of a successful run of `stage`, the way the
    runner records them (size, mtime, sha256; a directory by its names and sizes), so later
    stages, which trust only recorded and unchanged files, take them: the test plays `stage`."""
    from pathlib import Path

    from db.models import FileLog, PipelineRun
    from db.queries import normalise_path
    from pipeline.runner import path_stats

    engine = init_db(db_url)
    with session_scope(engine) as s:
        run = PipelineRun(FK_prep_id=animal, stage=stage, status="success", params="{}", software_versions="{}",
                          command="placed by a test", started=dt.datetime.now(), ended=dt.datetime.now())
        s.add(run)
        s.flush()
        for path in paths:
            size, mtime_ns, checksum = path_stats(Path(path))
            s.add(FileLog(path=normalise_path(Path(path).absolute(), Path(data_root).absolute()), kind="output",
                          FK_pipeline_run_id=run.id, task_key=f"test:{Path(path).name}", fingerprint="placed by a test",
                          size=size, checksum=checksum, mtime_ns=mtime_ns, result="{}", created=dt.datetime.now()))
    engine.dispose()
