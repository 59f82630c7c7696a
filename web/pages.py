"""Static QC and provenance pages of an animal, and an index of every animal of the data root.

`create_pipeline --animal A --task web` (and create_pipeline after the neuroglancer and omezarr
stages) writes them under `<animal>/www/`, so the Apache config that serves the data serves them
too (`/<animal>/` is the animal page, `/` the index of animals). No application server: Jinja2
templates (web/templates/) rendered once into HTML files.

What the pages may contain, and why:
- only what is under `www/`: the images they show are PNGs there (made by the stages, or
  rendered here from preps/ into `www/qc/`), never links into preps/, czi/ or the database;
- no generation time, no host name, no absolute path (paths are shown relative to the data
  root, anything else absolute by its last component): unchanged inputs give byte-identical
  pages, and a page is rewritten only when its bytes change;
- Neuroglancer states built by `web.state.build_state` with `web.state.ORIGIN_PLACEHOLDER` as
  the server: a few lines of script in the page put `location.origin` in its place (and the z of
  a section link), so the links work whatever host and port serve the pages.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.atomic import write_text_if_changed
from pipeline.errors import SlidepipeError
from pipeline.layout import AnimalLayout, resolution_name, site_index

PAGES = ("index", "sections", "alignment", "histograms", "provenance")
"""Pages of an animal (www/<name>.html); `sections` is written once per channel as
sections-C<c>.html."""

WEB_STAGE = "web"
"""Runs of the web stage only render these pages: they are left out of the run lists, so
rendering again does not change what is rendered."""


# ------------------------------------------------------------------------------ what is public
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s/'\"<>]+/)+([^\s/'\"<>]*)")


class Scrubber:
    """Text made fit for a served page: the data root removed from paths (they become relative
    to it, as file_log stores them), other absolute paths cut to their last component, the
    recording hosts' names replaced."""

    def __init__(self, data_root: Path, hosts: set[str]):
        roots = {str(Path(data_root).absolute()), str(Path(data_root).resolve())}
        self.roots = sorted(roots, key=len, reverse=True)
        self.hosts = sorted((h for h in hosts if h), key=len, reverse=True)

    def __call__(self, text: str | None) -> str:
        if not text:
            return ""
        for root in self.roots:
            text = text.replace(root + "/", "").replace(root, "<data root>")
        text = _ABSOLUTE_PATH.sub(lambda m: "…/" + m.group(1), text)
        for host in self.hosts:
            text = re.sub(rf"(?<![\w.-]){re.escape(host)}(?![\w-])", "<host>", text)
        return text

    def path(self, stored: str) -> str:
        """A file_log path: relative ones as they are, absolute ones (inputs from outside the
        data root) by their name."""
        return stored if not stored.startswith("/") else "…/" + PurePosixPath(stored).name

    def json(self, value: Any) -> str:
        return self(json.dumps(value, indent=1, sort_keys=True, default=str)) if value not in (None, {}, []) else ""


# ------------------------------------------------------------------------------ rendering
def _environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("web", "templates"), autoescape=True,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["num"] = _number
    return env


def _number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _script_json(value: Any):
    """JSON to embed in <script type="application/json"> (no "</" can end the element)."""
    from markupsafe import Markup

    return Markup(json.dumps(value, sort_keys=True, separators=(",", ":")).replace("</", "<\\/"))


def render_png(source: str, output: str) -> dict:
    """Worker: a QC PNG of a TIFF the pages must not link to (8-bit, as the stages' own PNGs)."""
    from pipeline.stages.section_files import read_image, write_png

    image = read_image(source)
    write_png(output, image)
    return {"shape": list(image.shape)}


# ------------------------------------------------------------------------------ collecting
@dataclass
class Layer:
    name: str
    kind: str                 # "precomputed" or "OME-Zarr"
    channel: int
    resolution: str
    path: Path
    relative: str             # under www/
    size: tuple = ()
    voxel_nm: tuple = ()
    data_type: str = ""
    state: dict | None = None
    z_offset: float = 0.5
    error: str = ""
    chain: list = field(default_factory=list)        # grouped lineage, nearest first
    sources: list = field(default_factory=list)      # the raw slides it was made from
    made_by: dict | None = None


def _sections(session, animal: str):
    """Every scene the extract stage found (slide order, then scene order), each with its
    channel rows and its position in the stack used downstream (None when inactive)."""
    from sqlalchemy import select

    from db.models import ScanRun, Slide, SlideCziToTif
    from db.queries import ordered_sections

    scan_run = session.scalars(select(ScanRun).where(ScanRun.FK_prep_id == animal, ScanRun.active.is_(True))
                               .order_by(ScanRun.id.desc())).first()
    if scan_run is None:
        return None
    slides = list(session.scalars(select(Slide).where(Slide.FK_scan_run_id == scan_run.id)
                                  .order_by(Slide.slide_physical_id, Slide.id)))
    rows = list(session.scalars(select(SlideCziToTif).join(Slide).where(Slide.FK_scan_run_id == scan_run.id)
                                .order_by(SlideCziToTif.FK_slide_id, SlideCziToTif.scene_index, SlideCziToTif.channel)))
    order = ordered_sections(session, animal, 1)
    position = {(r.FK_slide_id, r.scene_index): i for i, r in enumerate(order)}
    by_scene: dict[tuple[int, int], list] = {}
    for row in rows:
        by_scene.setdefault((row.FK_slide_id, row.scene_index), []).append(row)
    return scan_run, [(slide, sorted(((k, v) for k, v in by_scene.items() if k[0] == slide.id),
                                             key=lambda kv: (_first(kv[1]).scene_order, kv[0][1])))
                              for slide in slides], position, order


def _first(rows):
    return next((r for r in rows if r.channel == 1), rows[0])


def _url(layout: AnimalLayout, path: Path) -> str | None:
    """The page-relative URL of a file under www/, None when it does not exist."""
    return path.relative_to(layout.www).as_posix() if path.is_file() else None


class AnimalSite:
    """Everything the pages of one animal show, collected once in the main process."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.layout: AnimalLayout = ctx.layout
        self.animal = ctx.animal

    # -- images -------------------------------------------------------------------------------
    def render_images(self, sections: list[str], channels: list[int]) -> None:
        """Mask overlays and aligned thumbnails as PNGs under www/qc/ (runner tasks: redone
        only when their TIFF changed); PNGs of sections no longer in the stack are removed."""
        from pipeline.runner import Task

        ly = self.layout
        wanted: list[tuple[Path, Path]] = []
        for key in sections:
            wanted.append((ly.mask(key, True, "colored"), ly.mask_png(key)))
            for channel in channels:
                wanted.append((ly.aligned(channel, True, key), ly.aligned_png(channel, key)))
        tasks = [Task(key=f"png:{ly.relative(out)}", func=render_png, kwargs={"source": str(src), "output": str(out)},
                      inputs=[src], outputs=[out], params={"display": "to_display_uint8"}, label=str(src))
                 for src, out in wanted if src.is_file()]
        if tasks:
            self.ctx.execute(tasks, desc="QC images")
        keep = {out for _, out in wanted if out.is_file()}
        if ly.web_image_dir.is_dir():
            for png in ly.web_image_dir.rglob("*.png"):
                if png not in keep:
                    png.unlink()

    # -- data ---------------------------------------------------------------------------------
    def collect(self) -> dict[str, Any]:
        from sqlalchemy import func, select

        from db.models import AlignmentMetric, ElastixTransformation, FileLog, PipelineRun
        from db.queries import current_file, deactivate_sql, ordered_sections, runs, section_key_of

        ly, animal = self.layout, self.animal
        with self.ctx.session() as session:
            found = _sections(session, animal)
            if found is None:
                raise SlidepipeError(f"animal {animal} has no scan run yet: run --task extract first")
            channels = sorted({r.channel for _, scenes in found[1] for _, rows in scenes for r in rows}) or [1]
            keys = [section_key_of(r) for r in found[3]]
        self.render_images(keys, channels)   # runner tasks: their own sessions
        with self.ctx.session() as session:
            hosts = {h for (h,) in session.execute(select(PipelineRun.host).distinct())}
            scrub = Scrubber(ly.data_root, hosts)
            scan_run, grouped, position, order = _sections(session, animal)

            # slides and scenes as extract found them
            slide_views = []
            for slide, scenes in grouped:
                scene_views = []
                for (slide_id, scene_index), rows in scenes:
                    first = _first(rows)
                    active = slide.active and all(r.active for r in rows)
                    pos = position.get((slide_id, scene_index))
                    stem = Path(slide.file_name).stem
                    scene_views.append({
                        "scene": scene_index + 1, "scene_index": scene_index, "scene_order": first.scene_order,
                        "width": first.width, "height": first.height, "dtype": first.dtype,
                        "samples": first.samples_per_pixel, "z_planes": first.z_planes, "z_plane": first.z_plane,
                        "channels": [{"channel": r.channel, "name": r.channel_name or "", "active": r.active,
                                      "id": r.id} for r in rows],
                        "active": active, "position": pos, "name": section_key_of(first),
                        "thumbnail": _url(ly, ly.scene_png(stem, scene_index)),
                        "deactivate": deactivate_sql([(slide_id, scene_index)]),
                        "activate": (f"UPDATE slide_czi_to_tif SET active = 1 WHERE FK_slide_id = {slide_id} "
                                     f"AND scene_index = {scene_index};"),
                        "reorder": (f"UPDATE slide_czi_to_tif SET scene_order = {first.scene_order} "
                                    f"WHERE FK_slide_id = {slide_id} AND scene_index = {scene_index} AND channel = 1;"),
                    })
                slide_views.append({"id": slide.id, "file": slide.file_name, "number": slide.slide_physical_id,
                                    "active": slide.active, "checksum": slide.checksum or "", "size": slide.file_size,
                                    "pixel": (slide.pixel_size_x_um, slide.pixel_size_y_um),
                                    "objective": slide.objective or "", "scenes": scene_views,
                                    "drop": f"UPDATE slide SET active = 0 WHERE id = {slide.id};",
                                    "renumber": (f"UPDATE slide SET slide_physical_id = {slide.slide_physical_id} "
                                                 f"WHERE id = {slide.id};")})
            stack = [{"position": i, "name": section_key_of(r), "slide": r.slide.file_name, "scene": r.scene_index + 1,
                      "slide_id": r.FK_slide_id, "scene_index": r.scene_index, "row_id": r.id}
                     for i, r in enumerate(order)]
            per_channel_rows = {c: {r.id: i for i, r in enumerate(ordered_sections(session, animal, c))}
                                for c in channels}

            # alignment: transforms (channel 1) and metrics per channel and resolution
            transforms = {}
            for row in session.scalars(select(ElastixTransformation).where(
                    ElastixTransformation.FK_prep_id == animal, ElastixTransformation.active.is_(True))
                    .order_by(ElastixTransformation.id)):
                pos = per_channel_rows[1].get(row.FK_section_id) if 1 in per_channel_rows else None
                if pos is None:
                    continue
                fixed = per_channel_rows[1].get(row.FK_fixed_section_id, -1)
                current = transforms.get(pos)
                # the manual row, else the registration onto the nearest earlier section (k-1, not k-2)
                if current is None or (row.manual and not current["manual"]) or (
                        not current["manual"] and not row.manual and fixed >= current["fixed_position"]):
                    transforms[pos] = {"rotation": math.degrees(row.rotation), "xshift": row.xshift,
                                       "yshift": row.yshift, "manual": row.manual, "metric": row.metric,
                                       "fixed_position": fixed}
            # align's QC and the transform in use of each section onto its previous one (the pose solve)
            from pipeline.stages.align import composed_result

            composed = (composed_result(session, ly, section_key_of(order[0])) or {}) if order else {}
            align_flags = composed.get("flags") or {}
            composed_order = composed.get("order") or []
            metrics = []
            for channel in channels:
                for downsample in (True, False):
                    resolution = resolution_name(downsample)
                    rows = list(session.scalars(select(AlignmentMetric).where(
                        AlignmentMetric.FK_prep_id == animal, AlignmentMetric.channel == channel,
                        AlignmentMetric.resolution == resolution)))
                    if not rows:
                        continue
                    plot = ly.metrics_png(channel, downsample)
                    recorded = current_file(session, ly.relative(plot))
                    result = json.loads(recorded.result) if recorded is not None and recorded.result else {}
                    flagged = set(result.get("flagged_sections") or [])
                    pairs = []
                    for row in rows:
                        moving = per_channel_rows[channel].get(row.FK_section_id)
                        fixed = per_channel_rows[channel].get(row.FK_fixed_section_id)
                        if moving is None or fixed is None:
                            continue   # a section no longer in the stack
                        t = transforms.get(moving, {"rotation": 0.0, "xshift": 0.0, "yshift": 0.0,
                                                    "manual": False, "metric": None})
                        name, fixed_name = section_key_of(order[moving]), section_key_of(order[fixed])
                        if name in composed_order and composed_order.index(name) > 0 and \
                                composed_order[composed_order.index(name) - 1] == fixed_name:
                            rotation, xshift, yshift = composed["relative"][name]
                            t = {**t, "rotation": rotation, "xshift": xshift, "yshift": yshift}
                        pairs.append({"fixed": fixed_name, "moving": name, "position": moving,
                                      "ncc": row.ncc, "mi": row.mutual_information, "overlap": row.overlap_fraction,
                                      "flagged": name in flagged or name in align_flags,
                                      "align_flag": align_flags.get(name), "transform": t,
                                      "fix": (f"create_pipeline --animal {animal} --task align --section {name} "
                                              f"--rotation {t['rotation']:.3f} --xshift {t['xshift']:.2f} "
                                              f"--yshift {t['yshift']:.2f}")})
                    pairs.sort(key=lambda p: p["position"])
                    metrics.append({"channel": channel, "resolution": resolution, "plot": _url(ly, plot),
                                    "pairs": pairs, "flagged": [p["moving"] for p in pairs if p["flagged"]]})

            # runs (all but this page-rendering stage)
            file_counts = dict(session.execute(select(FileLog.FK_pipeline_run_id, func.count()).join(
                PipelineRun, PipelineRun.id == FileLog.FK_pipeline_run_id).where(PipelineRun.FK_prep_id == animal)
                .group_by(FileLog.FK_pipeline_run_id)).all())
            run_views = [self._run_view(run, file_counts.get(run.id, 0), scrub)
                         for run in runs(session, animal) if run.stage != WEB_STAGE]

            layers = self._layers(session, channels, scrub)
            summary = {
                "animal": animal, "sections": len(order), "scenes": sum(len(s["scenes"]) for s in slide_views),
                "inactive": sum(1 for s in slide_views for sc in s["scenes"] if not sc["active"]),
                "slides": len(slide_views), "channels": channels, "file_type": scan_run.file_type,
                "resolution": scan_run.resolution, "zresolution": scan_run.zresolution,
                "rotation": scan_run.rotation, "flip": scan_run.flip, "flop": scan_run.flop,
                "canvas": (scan_run.width, scan_run.height),
            }
        return {"summary": summary, "slides": slide_views, "stack": stack, "metrics": metrics, "runs": run_views,
                "layers": layers, "channels": channels, "transforms": transforms}

    @staticmethod
    def _run_view(run, files: int, scrub: Scrubber) -> dict[str, Any]:
        from db.queries import _parse_json

        seconds = (run.ended - run.started).total_seconds() if run.ended and run.started else None
        versions = _parse_json(run.software_versions) or {}
        return {
            "id": run.id, "stage": run.stage, "channel": run.channel, "resolution": run.resolution or "",
            "status": run.status, "started": run.started.isoformat(sep=" ", timespec="seconds") if run.started else "",
            "duration": _duration(seconds), "total": run.tasks_total, "ran": run.tasks_run,
            "skipped": run.tasks_skipped, "failed": run.tasks_failed, "files": files,
            "params": scrub.json(_parse_json(run.params)), "code_version": scrub(run.code_version or ""),
            "versions": scrub(", ".join(f"{k} {v}" for k, v in sorted(versions.items()))) if isinstance(versions, dict)
            else scrub(str(versions)),
            "errors": scrub(run.error or ""),
        }

    def _layers(self, session, channels: list[int], scrub: Scrubber) -> list[Layer]:
        from web.state import ORIGIN_PLACEHOLDER, ViewerStateError, build_state, read_omezarr, read_precomputed, \
            section_z_offset

        ly = self.layout
        found: list[Layer] = []
        for channel in channels:
            for downsample in (True, False):
                resolution = resolution_name(downsample)
                precomputed = ly.precomputed_layer(channel, downsample)
                if (precomputed / "info").is_file():
                    found.append(Layer(precomputed.name, "precomputed", channel, resolution, precomputed,
                                       precomputed.relative_to(ly.www).as_posix()))
                store = ly.omezarr(channel, downsample)
                if (store / "zarr.json").is_file() or (store / ".zattrs").is_file():
                    found.append(Layer(store.name, "OME-Zarr", channel, resolution, store,
                                       store.relative_to(ly.www).as_posix()))
        for layer in found:
            try:
                volume = (read_precomputed if layer.kind == "precomputed" else read_omezarr)(layer.path, layer.channel)
                layer.size, layer.voxel_nm, layer.data_type = volume.size, volume.voxel_nm, volume.data_type
                source = "precomputed" if layer.kind == "precomputed" else {layer.channel: layer.path}
                layer.state = build_state(ly.data_root, self.animal, ORIGIN_PLACEHOLDER, channels=[layer.channel],
                                          downsample=layer.resolution == "thumbnail", layer_source=source)
                layer.z_offset = section_z_offset(layer.state)
            except (ViewerStateError, SlidepipeError, OSError, ValueError) as exc:
                layer.error = scrub(str(exc))
            self._provenance(session, layer, scrub)
        return found

    def _provenance(self, session, layer: Layer, scrub: Scrubber) -> None:
        """The chain of inputs of a published layer back to the raw slides (db.queries.lineage),
        grouped by depth, stage and folder; the raw slides listed one by one with checksums."""
        from db.queries import how_was_made, lineage

        relative = self.layout.relative(layer.path)
        try:
            made = how_was_made(session, relative)
            entries = lineage(session, relative)
        except SlidepipeError:
            return
        if made["recorded_path"] != relative:
            return  # only a folder above it is recorded: not this layer
        run = made.get("run") or {}
        layer.made_by = {"run": run.get("id"), "stage": run.get("stage"), "checksum": made["checksum"],
                         "started": (run.get("started") or "").replace("T", " ")[:19]}
        groups: dict[tuple, dict] = {}
        for entry in entries:
            if entry["depth"] == 0:
                continue
            folder = str(PurePosixPath(scrub.path(entry["path"])).parent)
            key = (entry["depth"], entry["stage"] or "", entry["kind"], folder)
            group = groups.setdefault(key, {"depth": entry["depth"], "stage": entry["stage"] or "(not made here)",
                                            "kind": entry["kind"], "folder": folder, "files": 0, "example": ""})
            group["files"] += 1
            group["example"] = group["example"] or PurePosixPath(entry["path"]).name
        layer.chain = [groups[k] for k in sorted(groups)]
        layer.sources = sorted(({"path": scrub.path(e["path"]), "checksum": e["checksum"], "size": e["size"]}
                                for e in entries if not e["input_ids"] and e["depth"] > 0),
                               key=lambda s: s["path"])

    # -- pages --------------------------------------------------------------------------------
    def write(self) -> list[Path]:
        """Render every page; returns the pages whose bytes changed."""
        data = self.collect()
        ly = self.layout
        env = _environment()
        states = {"placeholder": _placeholder(), "offline": _offline_path(), "public": _public(),
                  "layers": {l.name: {"state": l.state, "z_offset": l.z_offset} for l in data["layers"] if l.state}}
        common = {**data, "ng": _script_json(states), "pages": self._nav(data["channels"]),
                  "clients": {"offline": states["offline"], "public": states["public"]}}
        written = []
        for name in PAGES:
            if name == "sections":
                for channel in data["channels"]:
                    page = f"sections-C{channel}"
                    html = env.get_template("sections.html").render(
                        **common, page=page, channel=channel, rows=self._section_rows(data, channel),
                        channel_layers=[l for l in data["layers"] if l.channel == channel and l.state])
                    written += [ly.web_page(page)] if write_text_if_changed(ly.web_page(page), html) else []
                continue
            html = env.get_template(f"{name}.html").render(**common, page=name, histograms=self._histograms(data))
            written += [ly.web_page(name)] if write_text_if_changed(ly.web_page(name), html) else []
        return written

    def _nav(self, channels: list[int]) -> list[tuple[str, str]]:
        return ([("index", "animal"), *[(f"sections-C{c}", f"sections C{c}") for c in channels],
                 ("alignment", "alignment"), ("histograms", "histograms"), ("provenance", "provenance")])

    def _section_rows(self, data: dict, channel: int) -> list[dict]:
        ly = self.layout
        metric = next((m for m in data["metrics"] if m["channel"] == channel and m["resolution"] == "thumbnail"), None)
        by_moving = {p["position"]: p for p in (metric["pairs"] if metric else [])}
        rows = []
        for s in data["stack"]:
            key = s["name"]
            rows.append({**s, "mask": _url(ly, ly.mask_png(key)),
                         "cleaned": _url(ly, ly.section_png(channel, True, key)),
                         "aligned": _url(ly, ly.aligned_png(channel, key)), "pair": by_moving.get(s["position"])})
        return rows

    def _histograms(self, data: dict) -> list[dict]:
        ly = self.layout
        out = []
        for channel in data["channels"]:
            for downsample in (True, False):
                combined = _url(ly, ly.histogram_png(channel, downsample))
                sections = [{"name": s["name"], "png": _url(ly, ly.histogram_png(channel, downsample, s["name"]))}
                            for s in data["stack"]]
                if combined or any(s["png"] for s in sections):
                    out.append({"channel": channel, "resolution": resolution_name(downsample),
                                "combined": combined, "sections": sections})
        return out


def _placeholder() -> str:
    from web.state import ORIGIN_PLACEHOLDER

    return ORIGIN_PLACEHOLDER


def _offline_path() -> str:
    from web.state import offline_client_url

    return offline_client_url("")


def _public() -> str:
    from web.state import PUBLIC_NEUROGLANCER

    return PUBLIC_NEUROGLANCER


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


# ------------------------------------------------------------------------------ index of animals
def write_site_index(session, data_root: Path) -> bool:
    """`<data root>/.www/index.html`, served at `/`: every animal of the database with its
    sections, channels, last run and links (to its pages, when the web stage made them)."""
    from sqlalchemy import select

    from db.models import Animal, PipelineRun, ScanRun
    from db.queries import ordered_sections

    animals = []
    for animal in session.scalars(select(Animal).order_by(Animal.prep_id)):
        ly = AnimalLayout(data_root, animal.prep_id)
        scan_run = session.scalars(select(ScanRun).where(ScanRun.FK_prep_id == animal.prep_id,
                                                         ScanRun.active.is_(True))).first()
        last = session.scalars(select(PipelineRun).where(PipelineRun.FK_prep_id == animal.prep_id,
                                                         PipelineRun.stage != WEB_STAGE)
                               .order_by(PipelineRun.id.desc()).limit(1)).first()
        layers = sorted(p.name for p in (ly.neuroglancer_data, ly.omezarr(1).parent) if p.is_dir()
                        for p in p.iterdir() if not p.name.endswith("_rechunkme") and not p.name.startswith("."))
        animals.append({
            "animal": animal.prep_id, "sections": len(ordered_sections(session, animal.prep_id, 1)) if scan_run else 0,
            "channels": scan_run.channels_per_scene if scan_run else 0,
            "last": {"stage": last.stage, "status": last.status, "channel": last.channel,
                     "resolution": last.resolution or "",
                     "ended": last.ended.isoformat(sep=" ", timespec="seconds") if last.ended else "running"}
            if last else None,
            "layers": layers, "pages": ly.web_page("index").is_file(),
        })
    html = _environment().get_template("animals.html").render(animals=animals)
    return write_text_if_changed(site_index(data_root), html)


def build_pages(ctx) -> list[Path]:
    """The web stage: the animal's pages, then the index of animals."""
    site = AnimalSite(ctx)
    written = site.write()
    with ctx.session() as session:
        if write_site_index(session, ctx.layout.data_root):
            written.append(site_index(ctx.layout.data_root))
    return written


