"""Per-stage cost at full resolution: the real stages through the CLI on a generated slide.

A CZI slide of `--stage-sections` scenes (each `--stage-width` x `--stage-height`, 3 channels,
zstd like ZEN, overlapping mosaic tiles) is written with pylibCZIrw one tile at a time (so a
30000 x 20000 scene never sits in memory), into a data root with its own SQLite database. Then:
extract; mask, clean, align at thumbnail size (not measured: the full-resolution stages reuse
their masks and transforms); and, measured, mask/clean/align at full resolution, neuroglancer
and omezarr of channel 1. Seconds are each stage's own pipeline_run row; CPU seconds are its
command's whole process tree; each stage is then run again, finds everything done, and that
rerun's cost (start-up, imports, planning, database) is subtracted before dividing by the
megapixels (worker imports, e.g. itk's ~10 s, still count: small sizes overstate the cost per
megapixel). Peak RSS is per process (bench.measure).

The per-section and per-brain figures are EXTRAPOLATED linearly in pixels from the measured
size; `--full-section` measures sections of 30000 x 20000 px instead (two: align needs two).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.publish import ANIMAL, failed_row, progress, stage_cli, stage_seconds

FULL_SECTION = (30000, 20000)
BRAIN_SECTIONS = 480
BRAIN_CHANNELS = 3
CHANNELS = ("DAPI", "Cy3", "Cy5")
TILE, OVERLAP, GAP = 2048, 64, 320

MEASURED = [  # (stage, runs per brain section: x3 for the per-channel ones)
    ("extract", 1), ("mask", 1), ("clean", BRAIN_CHANNELS), ("align", BRAIN_CHANNELS),
    ("neuroglancer", BRAIN_CHANNELS), ("omezarr", BRAIN_CHANNELS),
]


def parse_args(rest: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench (stage options)")
    parser.add_argument("--stage-sections", type=int, default=3, help="sections of the generated slide")
    parser.add_argument("--stage-width", type=int, default=6000,
                        help="scene width (px); 1500 x 1000 works, at 1024 x 768 the 1/32 thumbnails are too "
                             "small for the masker to find tissue")
    parser.add_argument("--stage-height", type=int, default=4000, help="scene height (px)")
    parser.add_argument("--stage-xy-um", type=float, default=0.325, help="pixel size written in the CZI")
    parser.add_argument("--full-section", action="store_true",
                        help=f"sections of {FULL_SECTION[0]} x {FULL_SECTION[1]} px instead: two, the fewest align "
                             "takes (not run by the author: slow, and it needs many GB of disk)")
    args = parser.parse_args(rest)
    if args.full_section:
        args.stage_sections, (args.stage_width, args.stage_height) = 2, FULL_SECTION
    if args.stage_sections < 2:
        parser.error("--stage-sections: align needs at least two sections")
    return args


def tissue_tile(x0: int, y0: int, w: int, h: int, width: int, height: int, section: int, channel: int,
                rng: np.random.Generator) -> np.ndarray:
    """Pixels [y0:y0+h, x0:x0+w] of a section: a function of the coordinates (so overlapping
    mosaic tiles agree) plus a little noise; an ellipse of textured tissue on a dark background,
    moved a few pixels per section so that align has something to find."""
    yy, xx = np.ogrid[y0:y0 + h, x0:x0 + w]
    cy, cx = height / 2 + 3 * section, width / 2 - 2 * section
    inside = ((yy - cy) / (0.42 * height)) ** 2 + ((xx - cx) / (0.45 * width)) ** 2 <= 1
    texture = (9000 + 4000 * np.sin((yy + 3 * section) / 37.0) * np.cos((xx - 2 * section) / 53.0)
               + 2000 * np.sin(xx / 301.0 + yy / 211.0))
    image = np.where(inside, texture / (1 + channel), 300.0)
    image += rng.normal(0, 150, image.shape)
    return np.clip(image, 0, 65535).astype(np.uint16)


def write_slide(path: Path, sections: int, width: int, height: int, xy_um: float, seed: int = 0) -> Path:
    from pylibCZIrw import czi as pyczi

    from pipeline.sample import COMPRESSION, tile_origins

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with pyczi.create_czi(str(path), exist_ok=True, compression_options=COMPRESSION) as writer:
        for s in range(sections):
            ox = s * (width + GAP)
            for ty, tx in tile_origins((height, width), TILE, OVERLAP):
                h, w = min(TILE, height - ty), min(TILE, width - tx)
                for c in range(len(CHANNELS)):
                    tile = tissue_tile(tx, ty, w, h, width, height, s, c, rng)
                    writer.write(tile, location=(ox + tx, ty), plane={"C": c}, scene=s)
        writer.write_metadata(document_name=path.stem, channel_names=dict(enumerate(CHANNELS)),
                              scale_x=xy_um * 1e-6, scale_y=xy_um * 1e-6)
    return path


def run(work: Path, args: argparse.Namespace, workers: int) -> list[dict]:
    """Measure every stage; print the table; return its rows."""
    from bench.measure import run_measured
    from pipeline.layout import AnimalLayout

    root = work / "stages"
    data = root / "data"
    root.mkdir(parents=True, exist_ok=True)
    db_url = f"sqlite:///{(root / 'slidepipe.db').as_posix()}"
    layout = AnimalLayout(data, ANIMAL)
    progress(f"writing a CZI of {args.stage_sections} scenes of {args.stage_width} x {args.stage_height} px")
    write_slide(layout.czi_dir / f"{ANIMAL}_slide01.czi", args.stage_sections, args.stage_width,
                args.stage_height, args.stage_xy_um)

    def cli(task: str, downsample: bool, **kw):
        return run_measured(stage_cli(data, db_url, task, workers, downsample=downsample), **kw)

    rows = []
    for stage, per_section in MEASURED:
        progress(f"{stage} at full resolution")
        # A failing stage is reported and the harness goes on (it runs unattended); the stages
        # after it then fail for want of its outputs, each saying so.
        measured = cli(stage, True, check=False) if stage in ("mask", "clean", "align") else None
        if measured is None or not measured.returncode:  # the thumbnail pass the full-resolution one reuses
            measured = cli(stage, False, check=False)
        if measured.returncode:
            rows.append(failed_row(stage, args.stage_sections, 0.0, measured) | {"stage": stage, "runs": per_section})
            continue
        seconds = stage_seconds(db_url, stage)
        # The same command again finds everything done: what it costs is the fixed part (start-up,
        # imports, planning, the database), which does not grow with the sections.
        again = cli(stage, False)
        rows.append({"stage": stage, "runs": per_section, "seconds": seconds, "cpu": measured.cpu,
                     "fixed_seconds": stage_seconds(db_url, stage), "fixed_cpu": again.cpu,
                     "rss_main": measured.peak_main, "rss_worker": measured.peak_worker})
    megapixels = args.stage_sections * args.stage_width * args.stage_height / 1e6
    print(f"## Stages at full resolution: {args.stage_sections} sections of {args.stage_width} x "
          f"{args.stage_height} px, {len(CHANNELS)} channels uint16, {workers} workers\n")
    print("\n".join(table(rows, megapixels, workers, args.full_section)))
    print()
    return rows


COLUMNS = ["stage", "s", "CPU s", "rerun s", "rerun CPU s", "peak RSS main MB", "peak RSS worker MB",
           "s/MP", "CPU s/MP", "s per 30000x20000 section", "brain h per core"]


def table(rows: list[dict], megapixels: float, workers: int, full: bool) -> list[str]:
    """Markdown table: measured columns, then per megapixel and extrapolated ones (per 30000 x
    20000 section, and per brain of 480 sections x 3 channels on one core), all net of the
    rerun's fixed cost."""
    section_mp = FULL_SECTION[0] * FULL_SECTION[1] / 1e6
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    total = 0.0
    for r in rows:
        if "failed" in r:
            lines.append("| " + " | ".join([r["stage"], "FAILED"] + ["-"] * (len(COLUMNS) - 2)) + " |")
            continue
        wall = max(0.0, r["seconds"] - r["fixed_seconds"]) / megapixels
        cpu = max(0.0, r["cpu"] - r["fixed_cpu"]) / megapixels
        hours = cpu * section_mp * BRAIN_SECTIONS * r["runs"] / 3600
        total += hours
        cells = [r["stage"], f"{r['seconds']:.1f}", f"{r['cpu']:.1f}", f"{r['fixed_seconds']:.1f}", f"{r['fixed_cpu']:.1f}",
                 f"{r['rss_main'] / 1e6:.0f}", f"{r['rss_worker'] / 1e6:.0f}" if r["rss_worker"] else "-",
                 f"{wall:.3f}", f"{cpu:.3f}", f"{wall * section_mp:.0f}", f"{hours:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in rows if "failed" in r]
    lines.append("| all six |" + "  |" * (len(COLUMNS) - 2) + (" - |" if failed else f" {total:.1f} |"))
    lines += [""] * bool(failed) + [f"- {r['stage']} FAILED ({r['failed']})" for r in failed]
    how = "measured on such sections" if full else f"EXTRAPOLATED linearly from the {megapixels:.1f} MP measured"
    lines += ["", f"- s: the stage's pipeline_run, start to end ({workers} workers); CPU s: its command's process tree "
              "(user + system; start-up, imports and, for neuroglancer, the web pages it refreshes included). "
              "rerun: the same command again, everything already done: the fixed cost, subtracted below. "
              "Peak RSS per process at the measured size ('-': no worker process).",
              f"- s/MP, CPU s/MP: net of the rerun. 's per 30000x20000 section' (wall, {workers} workers) and "
              f"'brain h per core' (CPU s/MP x {section_mp:.0f} MP x {BRAIN_SECTIONS} sections, x {BRAIN_CHANNELS} for "
              f"the per-channel stages clean to omezarr, / 3600) are {how}."]
    return lines
