"""Test helper: DB rows of an animal whose aligned stack a test places on disk itself, so a
publishing stage can run without extract/mask/clean/align."""

from __future__ import annotations

import datetime as dt

from db.models import Animal, ScanRun, Slide, SlideCziToTif
from db.session import init_db, session_scope


def seed_sections(db_url: str, animal: str, sections: int, *, channels: int = 1, resolution_um: float = 0.325,
                  z_um: float = 20.0, dtype: str = "uint16") -> None:
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
