"""align: register channel-1 cleaned thumbnails to their k-1 and k-2 neighbours, solve one pose
per section onto the middle section, resample every section once.

Three phases, each a set of runner tasks so that a change re-runs only what depends on it:

1. `pair:<section>` registers a section (moving) onto the previous section (fixed) and writes
   `preps/transforms/pairwise/<section>.json`; `pair2:<section>` onto the section before that,
   `preps/transforms/pairwise_k2/<section>.json`. Each result becomes an `elastix_transformation`
   row. Files are named by the section's key (`<slide>_S<scene>`), and the neighbour is a
   parameter: a reorder redoes exactly the pairs whose neighbour changed.
2. `compose:first` solves one pose per section from all pairs (`pipeline.imaging.pose_graph`:
   robust least squares, so a failed pair is outvoted instead of carried along a chain; tissue
   centroids as weak anchors against drift), `preps/transforms/first_pass.json`; from it,
   `similarity:<section>` / `similarity2:<section>` fit each pair with rotation + scale
   (`preps/transforms/similarity[_k2]/`: sections of different size, as near a pole, turn a
   rigid fit); `compose` solves again with the fits' rotations as second measurements,
   `preps/transforms/composed/<section>.json`. A file is rewritten only when its content
   changes; the task's result records the stack order.
3. `warp:<section>` resamples the cleaned section of the stage's channel and resolution with its
   composed transform (an input of the task: a changed transform re-runs exactly its sections).

Every channel and both resolutions use the channel-1 thumbnail transforms; full resolution
scales them by the exact canvas ratio and warps tile by tile. A section without a usable
cleaned channel-1 thumbnail (missing, or out of date) is reported and bridged: its neighbours
are registered to each other.

Manual override: `--task align --section S --rotation DEG --xshift PX --yshift PX` (S: the
section's key `<slide>_S<scene>`, or its position now) stores a manual row (thumbnail pixels,
rotation in degrees on the command line, radians in the table): the transform of section S onto
its previous neighbour, held exactly by the pose solve in place of S's own registrations;
`--section S --clear-manual` removes it.

Mirrored sections: `--task align --section S --mirrored true` records (slide_czi_to_tif.mirrored)
that S is mounted face down, as `--detect-flips` reports: S's cleaned thumbnail is mirrored
left-right about the canvas centre before every registration, centroid and mirror check, and
its composed matrix mirrors too (one resampling, every channel and resolution). Only the pairs
involving S carry the flag in their fingerprint, so only they, compose and the changed warps re-run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_path
from pipeline.errors import SlidepipeError
from pipeline.layout import section_name
from pipeline.runner import StageContext, Task

NAME = "align"
VERSION = 1
PER_CHANNEL = True


def add_arguments(group: argparse._ArgumentGroup) -> None:
    from pipeline.stages.common import _bool

    group.add_argument("--section", default=None,
                       help="align: the section of a manual transform: its key <slide>_S<scene> (as in the file "
                            "names), or its position in the stack (0-based)")
    group.add_argument("--rotation", type=float, default=None,
                       help="align: manual rotation of --section onto the previous section, degrees")
    group.add_argument("--xshift", type=float, default=None, help="align: manual x shift, thumbnail pixels")
    group.add_argument("--yshift", type=float, default=None, help="align: manual y shift, thumbnail pixels")
    group.add_argument("--clear-manual", action="store_true", default=None,
                       help="align: remove the manual transform of --section")
    group.add_argument("--mirrored", type=_bool, default=None, metavar="true|false",
                       help="align: --section is mounted face down (true: mirror it before registering and in the "
                            "output; false: undo)")
    group.add_argument("--detect-flips", action="store_true", default=None,
                       help="align: report sections that look mounted face down (mirrored); never applied")
    group.add_argument("--registration", choices=["auto", "elastix", "simpleitk"], default="auto",
                       help="align: registration backend (auto: Elastix when itk-elastix is installed)")


# ---------------------------------------------------------------------------- worker functions
def read_section(path: str, mirrored: bool = False) -> np.ndarray:
    """A cleaned thumbnail as align sees it: mirrored left-right (x -> width - 1 - x, about the
    canvas centre, `MIRROR_X`) when the user said the section is mounted face down."""
    from pipeline.stages.section_files import read_image

    image = read_image(path)
    return np.ascontiguousarray(image[:, ::-1]) if mirrored else image


def mirror_matrix(canvas) -> np.ndarray:
    """x -> width - 1 - x on (x, y, 1): what `read_section(mirrored=True)` does, as a matrix."""
    return np.array([[-1.0, 0.0, canvas[1] - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def register_task(fixed: str, moving: str, output: str, fixed_section: str, moving_section: str,
                  backend: str, threads: int | None = None, mirror: list[bool] = (False, False)) -> dict:
    from pipeline.imaging.register import register_pair

    fixed_image, moving_image = read_section(fixed, mirror[0]), read_section(moving, mirror[1])
    if fixed_image.shape != moving_image.shape:
        raise SlidepipeError(f"cleaned thumbnails differ in size ({fixed_image.shape} vs {moving_image.shape}): "
                             "re-run clean for the whole channel", moving)
    try:
        result = register_pair(fixed_image, moving_image, backend=backend, threads=threads, hypotheses=True)
    except SlidepipeError as exc:
        raise SlidepipeError(exc.reason, moving) from exc
    data = {"fixed": fixed_section, "moving": moving_section, **result.to_dict()}
    with atomic_path(Path(output)) as tmp:
        tmp.write_text(json.dumps(data, indent=1))
    return data


def similarity_task(fixed: str, moving: str, output: str, fixed_section: str, moving_section: str, start: list,
                    backend: str, threads: int | None = None, mirror: list[bool] = (False, False)) -> dict:
    """The second pass's fit of one pair (`register.similarity_fit`), started from the first
    pass's poses (`start`: [rotation in degrees, xshift, yshift] about the canvas centre, fixed
    -> moving, thumbnail px)."""
    from pipeline.imaging.register import similarity_fit
    from pipeline.imaging.transforms import canvas_center, rigid_matrix

    fixed_image, moving_image = read_section(fixed, mirror[0]), read_section(moving, mirror[1])
    matrix = rigid_matrix(np.deg2rad(start[0]), start[1], start[2], canvas_center(fixed_image.shape))
    try:
        fit = similarity_fit(fixed_image, moving_image, matrix, backend=backend, threads=threads)
    except SlidepipeError as exc:
        raise SlidepipeError(exc.reason, moving) from exc
    except RuntimeError as exc:
        # ITK refuses a start that leaves no moving tissue on the canvas (zero image mass), as
        # after a far-off manual transform: the fit is an extra measurement, the pair keeps its
        # registration and the solve goes without this fit (recorded, see _solve).
        fit = {"kind": "similarity", "backend": backend, "no_fit": str(exc).strip().splitlines()[-1][:300]}
    data = {"fixed": fixed_section, "moving": moving_section, "start": start, **fit}
    with atomic_path(Path(output)) as tmp:
        tmp.write_text(json.dumps(data, indent=1))
    return {"fixed": fixed_section, "moving": moving_section, "scale": fit.get("scale")}


def _solve(sections, pairs, cleaned, reference, canvas, mirrored):
    """The pose solve of both passes (see `compose_task`): (solution, index, picked, sources, ncc,
    center, fitted); the solution's pair arrays hold the registered pairs in `pairs` order, then
    the similarity fits of the pairs in `fitted`."""
    from pipeline.imaging.pose_graph import Pair, anchor_of, choose_hypotheses, rms_radius, solve_poses
    from pipeline.imaging.transforms import canvas_center, rigid_matrix

    center = canvas_center(tuple(canvas))
    index = {name: i for i, name in enumerate(sections)}
    images = {name: read_section(cleaned[name], name in mirrored) for name in sections}
    radius = rms_radius(images[reference], center)

    def rigid(h):
        return rigid_matrix(h["rotation"], h["xshift"], h["yshift"], center)

    # every computed pair's hypotheses (register_pair(hypotheses=True)); the triangles choose
    measured, candidates = {}, {}
    for pair in pairs:
        if pair.get("manual") is not None:
            continue
        data = json.loads(Path(pair["pairwise"]).read_text())
        if data["fixed"] != pair["fixed"] or data["moving"] != pair["moving"]:
            raise SlidepipeError(f"pairwise transform is for {data['fixed']}->{data['moving']}, expected "
                                 f"{pair['fixed']}->{pair['moving']}", pair["pairwise"])
        options = data.get("hypotheses") or [{**data, "score": (data.get("start") or {}).get("final_score")}]
        key = (index[pair["fixed"]], index[pair["moving"]])
        measured[key] = (data, options)
        candidates[key] = [(rigid(h), 0.0 if h.get("score") is None else float(h["score"])) for h in options]
    chosen = choose_hypotheses(len(sections), candidates, center, radius)
    graph, sources, ncc, picked, fits = [], {}, {}, {}, []
    for pair in pairs:
        key = (index[pair["fixed"]], index[pair["moving"]])
        if pair.get("manual") is not None:
            matrix, hard, source = rigid_matrix(*pair["manual"], center), True, "manual"
        else:
            data, options = measured[key]
            choice = chosen.get(key, 0)
            matrix, hard, source = candidates[key][choice][0], False, data["backend"]
            picked[key] = choice
            if options[choice].get("score") is not None:
                ncc[(pair["fixed"], pair["moving"])] = float(options[choice]["score"])
        if pair.get("similarity"):
            fit = json.loads(Path(pair["similarity"]).read_text())
            if fit["fixed"] != pair["fixed"] or fit["moving"] != pair["moving"]:
                raise SlidepipeError(f"similarity fit is for {fit['fixed']}->{fit['moving']}, expected "
                                     f"{pair['fixed']}->{pair['moving']}", pair["similarity"])
            if "no_fit" not in fit:  # a start ITK refused (similarity_task): the registration stands alone
                fits.append((pair, Pair(key[0], key[1], rigid(fit), rotation_only=True)))
        graph.append(Pair(key[0], key[1], matrix, hard=hard))
        if pair["step"] == 1:
            sources[pair["moving"]] = source
    # a section placed by hand onto its neighbour keeps no centroid cue of its own: with the hard
    # constraint it would pull the neighbour away from that neighbour's registrations
    placed = {p["moving"] for p in pairs if p.get("manual") is not None}
    anchors = [None if name in placed else anchor_of(images[name]) for name in sections]
    try:
        solution = solve_poses(len(sections), graph + [f for _, f in fits], index[reference], center, radius,
                               anchors=anchors)
    except SlidepipeError as exc:
        raise SlidepipeError(f"{exc} (sections in stack order: {', '.join(sections)})") from exc
    return solution, index, picked, sources, ncc, center, [p for p, _ in fits]


def first_pass_task(sections: list[str], pairs: list[dict], cleaned: dict[str, str], reference: str,
                    canvas: list[int], output: str, mirrored: list[str] = ()) -> dict:
    """The first pose solve, from the registrations alone (`compose_task` without similarity
    fits): each section's pose, where the second pass's fits start (`output`, and the result)."""
    solution = _solve(sections, pairs, cleaned, reference, canvas, mirrored)[0]
    data = {"order": list(sections), "reference": reference,
            "poses": {name: [[float(v) for v in row] for row in pose] for name, pose in zip(sections, solution.poses)}}
    payload = json.dumps(data, indent=1)
    if not Path(output).is_file() or Path(output).read_text() != payload:
        with atomic_path(Path(output)) as tmp:
            tmp.write_text(payload)
    return data


def compose_task(sections: list[str], pairs: list[dict], cleaned: dict[str, str], reference: str,
                 canvas: list[int], outputs: dict[str, str], mirrored: list[str] = ()) -> dict:
    """One pose per section onto the reference from all its pairs (`pose_graph.solve_poses`).

    sections: the available sections in stack order; pairs: {"fixed", "moving", "step", and
    "pairwise": path (and "similarity": path of the second pass's fit) or "manual": [rot, x, y]}
    (a manual pair is a hard constraint). Of each registered pair's hypotheses the one most
    consistent around the stack's triangles is used (`pose_graph.choose_hypotheses`), then, the
    same way, that or the pair's similarity fit (the result's `pairs[].hypothesis` says which:
    an index, or "similarity"). Each section's cleaned channel-1 thumbnail gives its tissue
    centroid, a weak anchor that keeps the stack from wandering (measured best on the sample,
    docs/processing.md). The poses of the `mirrored` sections are solved on their mirrored
    images; their composed matrix mirrors first."""
    from pipeline.imaging.qc import flag_sections, misfit
    from pipeline.imaging.transforms import rigid_parameters

    solution, index, picked, sources, ncc, center, fitted = _solve(sections, pairs, cleaned, reference, canvas,
                                                                   mirrored)
    summary, disagreement = {}, {}
    for name, matrix in zip(sections, solution.poses):
        rotation, xshift, yshift = rigid_parameters(matrix, center)
        flip = {"mirrored": True} if name in mirrored else {}
        payload = json.dumps({
            "section": name, "reference": reference, "canvas": list(canvas),
            "matrix": [[float(v) for v in row] for row in (mirror_matrix(canvas) @ matrix if flip else matrix)],
            **flip,
            "rotation": rotation, "xshift": xshift, "yshift": yshift,
            "pairwise_source": sources.get(name, "reference"), "method": METHOD,
            "convention": "aligned(p) = cleaned(matrix @ p); p = (x, y, 1) thumbnail pixel centres of the canvas",
        }, indent=1)
        path = Path(outputs[name])
        if not path.is_file() or path.read_text() != payload:
            with atomic_path(path) as tmp:
                tmp.write_text(payload)
        summary[name] = [rotation, xshift, yshift]
        disagreement[name] = None if not np.isfinite(solution.section_disagreement[index[name]]) else \
            float(solution.section_disagreement[index[name]])
    residuals = [{"fixed": p["fixed"], "moving": p["moving"], "step": p["step"], "residual": float(r),
                  "weight": float(w), "outvoted": bool(o),
                  "hypothesis": picked.get((index[p["fixed"]], index[p["moving"]]), 0)}
                 for p, r, w, o in zip([q for q in pairs if q.get("manual") is None], solution.pair_residual,
                                       solution.pair_weight, solution.outvoted)]
    registered = len(residuals)
    for p, r, w, o in zip(fitted, solution.pair_residual[registered:], solution.pair_weight[registered:],
                          solution.outvoted[registered:]):
        residuals.append({"fixed": p["fixed"], "moving": p["moving"], "step": p["step"], "residual": float(r),
                          "weight": float(w), "outvoted": bool(o), "hypothesis": "similarity"})
    # what the stack uses now for each section onto its previous one: the start of a manual fix
    relative = {}
    for previous, name in zip(sections, sections[1:]):
        rotation, xshift, yshift = rigid_parameters(
            solution.poses[index[name]] @ np.linalg.inv(solution.poses[index[previous]]), center)
        relative[name] = [float(np.rad2deg(rotation)), xshift, yshift]
    # the registration metric is not compared along the stack: mutual information falls towards the
    # ends of a brain and flagged a good section of the sample; the neighbours across a section are
    def score(a, b):
        return ncc.get((a, b), np.nan)

    triples = list(zip(sections, sections[1:], sections[2:]))
    misfits = np.array([np.nan] + [float(misfit(score(a, b), score(b, c), score(a, c))) for a, b, c in triples]
                       + [np.nan])[:len(sections)]
    flags = flag_sections(list(sections), solution.section_disagreement, misfits=misfits)
    return {"reference": reference, "order": list(sections), "transforms": summary, "disagreement": disagreement,
            "misfit": {name: None if not np.isfinite(v) else float(v) for name, v in zip(sections, misfits)},
            "pairs": residuals, "flags": flags, "relative": relative}


METHOD = ("pose graph (k-1, k-2, hypotheses by triangles, each pair's similarity fit from a first solve at half "
          "weight, centroid anchors and their trend)")


def flips_task(pairs: list[list[str]], cleaned: dict[str, str], output: str, mirrored: list[str] = ()) -> dict:
    """Each pair's coarse rotation search, also over the mirrored moving section
    (`rotation_search.coarse_start(mirror=True)`, a few ms a pair, no Elastix); the sections the
    pairs, taken together, say are mirrored (`qc.mirrored_sections`). Reported only. The sections
    the user already mirrors (`mirrored`) are judged as align uses them: mirrored."""
    from pipeline.imaging.qc import mirrored_sections
    from pipeline.imaging.rotation_search import coarse_start

    names = list(cleaned)
    index = {name: i for i, name in enumerate(names)}
    # coarse_start makes them grey floats
    images = {name: read_section(path, name in mirrored) for name, path in cleaned.items()}
    found = []
    for fixed, moving in pairs:
        start = coarse_start(images[fixed], images[moving], mirror=True)
        found.append({"fixed": fixed, "moving": moving, "score": float(start.score),
                      "mirrored_score": float(start.mirrored_score), "looks_mirrored": bool(start.looks_mirrored)})
    mirrored = [names[i] for i in mirrored_sections(len(names), [
        (index[p["fixed"]], index[p["moving"]], p["mirrored_score"] - p["score"]) for p in found])]
    data = {"looks_mirrored": mirrored, "pairs": found}
    with atomic_path(Path(output)) as tmp:
        tmp.write_text(json.dumps(data, indent=1))
    return data


def warp_thumbnail(source: str, transform: str, output: str) -> dict:
    from pipeline.imaging.warp import warp_affine
    from pipeline.stages.section_files import read_image, write_image

    image = read_image(source)
    data = json.loads(Path(transform).read_text())
    if list(image.shape[:2]) != data["canvas"]:
        raise SlidepipeError(f"cleaned section is {image.shape[1]} x {image.shape[0]} px but the transforms were made "
                             f"on a {data['canvas'][1]} x {data['canvas'][0]} canvas: re-run clean", source)
    aligned = warp_affine(image, np.array(data["matrix"]), image.shape[:2])
    write_image(output, aligned)
    at_edge = bool(aligned[0].any() or aligned[-1].any() or aligned[:, 0].any() or aligned[:, -1].any())
    return {"shape": list(aligned.shape), "rotation": data["rotation"], "xshift": data["xshift"], "yshift": data["yshift"],
            "tissue_at_canvas_edge": at_edge}


def warp_full(source: str, transform: str, output: str) -> dict:
    """Full resolution: the thumbnail transform scaled by the canvas ratio, warped tile by tile."""
    from pipeline.imaging.transforms import scale_transform
    from pipeline.imaging.warp import warp_tiles
    from pipeline.stages.section_files import TILE, open_windows, write_tiled

    data = json.loads(Path(transform).read_text())
    with open_windows(source) as (read, shape, dtype):
        scale_y, scale_x = shape[0] / data["canvas"][0], shape[1] / data["canvas"][1]
        if scale_x != scale_y or scale_x != int(scale_x):
            raise SlidepipeError(f"full-resolution canvas {shape[1]} x {shape[0]} is not a whole multiple of the "
                                 f"thumbnail canvas {data['canvas'][1]} x {data['canvas'][0]}: re-run clean", source)
        matrix = scale_transform(np.array(data["matrix"]), scale_x, scale_y)
        tiles = (tile for _, tile in warp_tiles(read, shape, dtype, matrix, shape[:2], TILE))
        write_tiled(output, shape, dtype, tiles)
    return {"shape": list(shape), "scale": scale_x}


# ------------------------------------------------------------------------------------ the stage
def run(ctx: StageContext) -> None:
    from pipeline.imaging.register import elastix_available
    from pipeline.stages.section_files import list_sections, usable

    sections = list_sections(ctx, channel=1)
    if ctx.params.get("section") is not None and ctx.params.get("mirrored") is not None:
        if any(ctx.params.get(k) is not None for k in ("rotation", "xshift", "yshift", "clear_manual")):
            raise SlidepipeError("--mirrored and a manual transform are given one at a time (two commands)")
        sections = _store_mirrored(ctx, sections)
    elif ctx.params.get("section") is not None:
        _store_manual(ctx, sections)
    elif any(ctx.params.get(k) is not None for k in ("rotation", "xshift", "yshift", "clear_manual", "mirrored")):
        raise SlidepipeError("--rotation/--xshift/--yshift/--clear-manual/--mirrored need --section S")
    backend = ctx.params.get("registration") or "auto"
    if backend == "auto":
        backend = "elastix" if elastix_available() else "simpleitk"
    _record_registration_settings(ctx, backend)

    available = usable(ctx, sections, lambda s: ctx.layout.cleaned(1, True, s.name), "the cleaned channel-1 thumbnail",
                       "run --task clean --channel 1 (until then the section is left out of the stack and its "
                       "neighbours are registered to each other)")
    if len(available) < 2:
        raise SlidepipeError(f"need at least two cleaned channel-1 thumbnails to align, found {len(available)}")
    pair_results = _register(ctx, available, backend)
    if ctx.params.get("detect_flips"):
        _detect_flips(ctx, available)
    transforms = _compose(ctx, available, pair_results, backend)
    if transforms:
        _warp(ctx, available, transforms)


STEPS = (1, 2)
"""Each section is registered onto the section before it and the one before that (k-1, k-2)."""


def _cleaned_thumbnails(ctx: StageContext, available) -> dict[str, str]:
    """Section name -> its cleaned channel-1 thumbnail, what every pair and the pose solve read."""
    return {s.name: str(ctx.layout.cleaned(1, True, s.name)) for s in available}


def _neighbour_pairs(available) -> list[tuple[int, object, object]]:
    """(step, fixed, moving) for every pair the stage registers, in stack order."""
    return [(step, available[i - step], available[i]) for i in range(1, len(available)) for step in STEPS if i >= step]


def _pair_key(step: int, moving: str, kind: str = "pair") -> str:
    return f"{kind}:{moving}" if step == 1 else f"{kind}{step}:{moving}"


def _register(ctx: StageContext, available, backend: str) -> dict[str, dict]:
    from pipeline.imaging.register import RECORDED_FILES, SITK_SETTINGS, parameter_texts, preload

    settings = parameter_texts(RECORDED_FILES) if backend == "elastix" else SITK_SETTINGS
    settings_hash = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    threads = max(1, (os.cpu_count() or 1) // max(1, ctx.settings.workers))
    tasks = []
    for step, fixed, moving in _neighbour_pairs(available):
        fixed_path, moving_path = ctx.layout.cleaned(1, True, fixed.name), ctx.layout.cleaned(1, True, moving.name)
        output = ctx.layout.pairwise_transform(moving.name, step)
        mirror = [fixed.mirrored, moving.mirrored]
        tasks.append(Task(
            key=_pair_key(step, moving.name), func=register_task,
            kwargs={"fixed": str(fixed_path), "moving": str(moving_path), "output": str(output),
                    "fixed_section": fixed.name, "moving_section": moving.name, "backend": backend,
                    "threads": threads, "mirror": mirror},
            inputs=[fixed_path, moving_path], outputs=[output],
            # the flag only where set: the pairs without a mirrored section keep their fingerprints
            params={"fixed": fixed.name, "backend": backend, "settings": settings_hash, "hypotheses": True,
                    **({"mirror": mirror} if any(mirror) else {})},
            label=str(moving_path)))
    results = ctx.execute(tasks, desc="register pairs", prepare=lambda: preload(backend))
    _record_pairs(ctx, available, results)
    return results


def _record_pairs(ctx: StageContext, available, results: dict[str, dict]) -> None:
    """One computed `elastix_transformation` row per registered pair (moving, fixed). A row whose
    fixed section is no longer one of the moving section's k-1/k-2 neighbours (the order changed)
    is reused for a new pair, or deactivated."""
    from sqlalchemy import select

    from db.models import ElastixTransformation

    by_name = {s.name: s for s in available}
    wanted: dict[int, set[int]] = {}
    for _, fixed, moving in _neighbour_pairs(available):
        wanted.setdefault(moving.channel1_id, set()).add(fixed.channel1_id)
    with ctx.session() as session:
        rows: dict[int, list] = {}
        for row in session.scalars(select(ElastixTransformation).where(
                ElastixTransformation.FK_prep_id == ctx.animal, ElastixTransformation.manual.is_(False),
                ElastixTransformation.active.is_(True), ElastixTransformation.resolution == "thumbnail")
                .order_by(ElastixTransformation.id)):
            rows.setdefault(row.FK_section_id, []).append(row)
        for data in results.values():
            moving, fixed = by_name[data["moving"]], by_name[data["fixed"]]
            own = rows.get(moving.channel1_id, [])
            row = next((r for r in own if r.FK_fixed_section_id == fixed.channel1_id), None)
            if row is None:
                row = next((r for r in own if r.FK_fixed_section_id not in wanted.get(moving.channel1_id, ())), None)
            values = {"FK_fixed_section_id": fixed.channel1_id, "section": section_name(moving.position),
                      "rotation": data["rotation"], "xshift": data["xshift"], "yshift": data["yshift"],
                      "metric": data["metric"], "iteration": data["iterations"]}
            if row is None:
                row = ElastixTransformation(FK_prep_id=ctx.animal, FK_section_id=moving.channel1_id, manual=False,
                                            resolution="thumbnail", active=True, FK_pipeline_run_id=ctx.run_id, **values)
                session.add(row)
                rows.setdefault(moving.channel1_id, []).append(row)
            elif any(getattr(row, k) != v for k, v in values.items()):
                for k, v in values.items():
                    setattr(row, k, v)
                row.FK_pipeline_run_id = ctx.run_id
        for moving_id, own in rows.items():
            seen = set()
            for row in own:
                if row.FK_fixed_section_id not in wanted.get(moving_id, ()) or row.FK_fixed_section_id in seen:
                    row.active = False
                seen.add(row.FK_fixed_section_id)


def _manual_rows(ctx: StageContext) -> dict[int, object]:
    from sqlalchemy import select

    from db.models import ElastixTransformation

    with ctx.session() as session:
        rows = session.scalars(select(ElastixTransformation).where(
            ElastixTransformation.FK_prep_id == ctx.animal, ElastixTransformation.manual.is_(True),
            ElastixTransformation.active.is_(True)).order_by(ElastixTransformation.id)).all()
    return {row.FK_section_id: row for row in rows}


def _compose(ctx: StageContext, available, pair_results: dict[str, dict], backend: str) -> dict[str, Path] | None:
    """The pose solve over every registered pair, in two passes: a first solve, each pair's
    similarity fit started from it (`_similarity`), and the compose task over both; a manual
    transform of S onto its previous section replaces S's computed registrations (k-1 and k-2)
    and is held exactly."""
    from pipeline.imaging.pose_graph import choice_settings
    from pipeline.stages.section_files import read_image

    manual = _manual_rows(ctx)
    overridden = set()
    pairs = []
    for index, s in enumerate(available[1:], start=1):
        row = manual.get(s.channel1_id)
        if row is not None and row.FK_fixed_section_id == available[index - 1].channel1_id:
            pairs.append({"fixed": available[index - 1].name, "moving": s.name, "step": 1,
                          "manual": [row.rotation, row.xshift, row.yshift]})
            overridden.add(s.name)
        elif row is not None:
            ctx.log.warning("align: the manual transform of %s was made against another neighbour; ignored", s.label)
    missing = []
    for step, fixed, moving in _neighbour_pairs(available):
        if moving.name in overridden:
            continue
        if _pair_key(step, moving.name) in pair_results:
            pairs.append({"fixed": fixed.name, "moving": moving.name, "step": step,
                          "pairwise": str(ctx.layout.pairwise_transform(moving.name, step))})
        else:
            missing.append(moving)
    reference = available[len(available) // 2].name
    canvas = list(read_image(ctx.layout.cleaned(1, True, reference)).shape[:2])
    outputs = {s.name: str(ctx.layout.section_transform(s.name)) for s in available}
    cleaned = _cleaned_thumbnails(ctx, available)
    mirrored = [s.name for s in available if s.mirrored]
    if missing:
        ctx.log.warning("align: %d registrations failed (see the errors above); the poses are solved from the others",
                        len(missing))
    common = {"sections": [s.name for s in available], "cleaned": cleaned, "reference": reference, "canvas": canvas,
              "mirrored": mirrored}
    params = {"reference": reference, "canvas": canvas, "settings": choice_settings(),
              **({"mirrored": mirrored} if mirrored else {})}
    images = [Path(p) for p in cleaned.values()]
    first = ctx.layout.first_pass_poses
    done = ctx.execute([Task(key="compose:first", func=first_pass_task, kwargs={**common, "pairs": pairs, "output": str(first)},
                             inputs=[Path(p["pairwise"]) for p in pairs if "pairwise" in p] + images, outputs=[first],
                             params={**params, "pairs": [{k: v for k, v in p.items() if k != "pairwise"} for p in pairs]},
                             label=str(ctx.layout.transforms_dir))], desc="first pose solve")
    if "compose:first" not in done:
        return None
    fits = _similarity(ctx, available, pairs, done["compose:first"]["poses"], canvas, backend)
    pairs = [{**p, "similarity": str(ctx.layout.similarity_transform(p["moving"], p["step"]))}
             if _pair_key(p["step"], p["moving"], "similarity") in fits else p for p in pairs]
    files = [Path(p[k]) for p in pairs for k in ("pairwise", "similarity") if k in p]
    task = Task(key="compose", func=compose_task, kwargs={**common, "pairs": pairs, "outputs": outputs},
                inputs=files + images, outputs=[Path(p) for p in outputs.values()],
                params={**params, "pairs": [{k: v for k, v in p.items() if k not in ("pairwise", "similarity")}
                                            | {"similarity": "similarity" in p} for p in pairs],
                        "method": METHOD, "qc": "qc.flag_sections: disagreement, misfit"},
                label=str(ctx.layout.transforms_dir))
    results = ctx.execute([task], desc="compose transforms")
    if "compose" not in results:
        return None
    _report_qc(ctx, available, results["compose"])
    return {s.name: ctx.layout.section_transform(s.name) for s in available}


START_STEP = 0.1
"""Degrees and thumbnail px: how finely the similarity fits' starts are told apart (`_similarity`)."""


def _similarity(ctx: StageContext, available, pairs: list[dict], poses: dict[str, list], canvas: list[int],
                backend: str) -> dict[str, dict]:
    """`similarity:<section>` (and `similarity2:`) tasks: each registered pair's similarity fit,
    started from the first pose solve. The start is a parameter, rounded to START_STEP: a fit
    needs a start near the answer, not an exact one, so a pair is fitted again only when the
    first pass moved its sections noticeably (a manual transform elsewhere re-solves every pose
    by hundredths of a pixel)."""
    from pipeline.imaging.transforms import canvas_center, rigid_parameters
    from pipeline.imaging.register import SIMILARITY_FILES, SITK_SETTINGS, parameter_texts, preload

    settings = parameter_texts(SIMILARITY_FILES) if backend == "elastix" else {**SITK_SETTINGS, "model": "similarity"}
    settings_hash = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    threads = max(1, (os.cpu_count() or 1) // max(1, ctx.settings.workers))
    by_name = {s.name: s for s in available}
    center = canvas_center(tuple(canvas))
    tasks = []
    for pair in pairs:
        if "pairwise" not in pair:
            continue
        fixed, moving, step = by_name[pair["fixed"]], by_name[pair["moving"]], pair["step"]
        rotation, xshift, yshift = rigid_parameters(
            np.array(poses[moving.name]) @ np.linalg.inv(np.array(poses[fixed.name])), center)
        start = [round(float(v) / START_STEP) * START_STEP for v in (np.rad2deg(rotation), xshift, yshift)]
        start = [round(v, 6) for v in start]
        fixed_path, moving_path = ctx.layout.cleaned(1, True, fixed.name), ctx.layout.cleaned(1, True, moving.name)
        output = ctx.layout.similarity_transform(moving.name, step)
        mirror = [fixed.mirrored, moving.mirrored]
        tasks.append(Task(
            key=_pair_key(step, moving.name, "similarity"), func=similarity_task,
            kwargs={"fixed": str(fixed_path), "moving": str(moving_path), "output": str(output),
                    "fixed_section": fixed.name, "moving_section": moving.name, "start": start, "backend": backend,
                    "threads": threads, "mirror": mirror},
            inputs=[fixed_path, moving_path], outputs=[output],
            params={"fixed": fixed.name, "start": start, "backend": backend, "settings": settings_hash,
                    **({"mirror": mirror} if any(mirror) else {})},
            label=str(moving_path)))
    return ctx.execute(tasks, desc="similarity fits", prepare=lambda: preload(backend))


def _detect_flips(ctx: StageContext, available) -> None:
    """--detect-flips: name the sections that look mirrored as align now uses them (warning,
    pipeline_run.summary) with the command that mirrors each (or undoes a mirror the user set).
    Never applied here: whether a section is face down is the user's call."""
    from pipeline.imaging.qc import MIRROR_PRIOR

    cleaned = _cleaned_thumbnails(ctx, available)
    pairs = [[fixed.name, moving.name] for _, fixed, moving in _neighbour_pairs(available)]
    output = ctx.layout.transforms_dir / "mirror_check.json"
    applied = [s.name for s in available if s.mirrored]
    done = ctx.execute([Task(key="flips", func=flips_task,
                             kwargs={"pairs": pairs, "cleaned": cleaned, "output": str(output), "mirrored": applied},
                             inputs=[Path(p) for p in cleaned.values()], outputs=[output],
                             params={"pairs": pairs, "rule": "parity", "prior": MIRROR_PRIOR,
                                     **({"mirrored": applied} if applied else {})},
                             label=str(ctx.layout.transforms_dir))], desc="mirror check")
    if "flips" not in done:
        return
    mirrored = done["flips"]["looks_mirrored"]
    by_name = {s.name: s for s in available}
    commands = {name: f"create_pipeline --animal {ctx.animal} --task align --section {name} --mirrored "
                      f"{'false' if by_name[name].mirrored else 'true'}" for name in mirrored}
    ctx.summarise("mirror_check", {"looks_mirrored": mirrored, "file": ctx.layout.relative(output),
                                   "commands": commands, "mirrored_by_user": applied},
                  note=None if not mirrored else (
                      f"{len(mirrored)} section(s) look mounted mirrored (reported, not applied): {', '.join(mirrored)}; "
                      f"if so, mirror them: " + "; ".join(commands.values()) + " (then run --task align again)"))
    for name in mirrored:
        ctx.log.warning("align: %s looks mirrored (mounted face down?): most of its registrations fit better "
                        "mirrored; nothing was changed (see %s; to mirror it: %s)", by_name[name].label, output,
                        commands[name])
    if not mirrored:
        ctx.log.info("align: no section looks mirrored")


def composed_result(session, layout, section: str) -> dict | None:
    """The result of the compose task that made the current composed transform of `section`
    (stack order, QC flags, each section's transform onto its previous one), or None. The
    metrics plot and the pages read the alignment's QC from here."""
    from db.queries import current_file

    row = current_file(session, layout.relative(layout.section_transform(section)))
    if row is None or row.kind != "output" or not row.result:
        return None
    return json.loads(row.result)


def _report_qc(ctx: StageContext, available, result: dict) -> None:
    """The sections to look at (`qc.flag_sections` on the pose solve), in pipeline_run.summary,
    a warning, and a note under the stage's summary line with the command that places one by hand."""
    flags = result.get("flags") or {}
    outvoted = [f"{p['fixed']}->{p['moving']}" + (" (similarity fit)" if p["hypothesis"] == "similarity" else "")
                for p in result.get("pairs", []) if p["outvoted"]]
    by_name = {s.name: s for s in available}
    commands = {}
    order = result.get("order", [])
    for name in flags:
        # the first section has no previous one: its next section is placed onto it instead
        target = name if name in result["relative"] else (order[1] if len(order) > 1 else None)
        if target is None or target not in result["relative"]:
            continue
        rotation, xshift, yshift = result["relative"][target]
        commands[name] = (f"create_pipeline --animal {ctx.animal} --task align --section {target} "
                          f"--rotation {rotation:.2f} --xshift {xshift:.2f} --yshift {yshift:.2f}")
    ctx.summarise("alignment_qc", {"flagged": flags, "commands": commands, "outvoted_pairs": outvoted,
                                   "disagreement_px": result.get("disagreement", {}),
                                   "misfit_ncc": result.get("misfit", {})},
                  note=None if not flags else (
                      f"look at {len(flags)} section(s): {', '.join(flags)}; place one by hand onto its previous "
                      f"section (its current transform, in degrees and thumbnail px, to adjust): "
                      + "; ".join(commands.values()) + " (then run --task align again)"))
    for name, reason in flags.items():
        ctx.log.warning("align: look at %s: %s%s", by_name[name].label, reason,
                        f" (to place it by hand: {commands[name]})" if name in commands else "")
    if outvoted:
        ctx.log.info("align: registrations outvoted by the others: %s", ", ".join(outvoted))


def _warp(ctx: StageContext, available, transforms: dict[str, Path]) -> None:
    from pipeline.stages.section_files import usable

    resolution = "thumbnail" if ctx.downsample else "full-resolution section"
    flags = f"--channel {ctx.channel} --downsample {str(ctx.downsample).lower()}"
    if ctx.channel != 1 or not ctx.downsample:  # channel-1 thumbnails were checked before registering
        available = usable(ctx, available, lambda s: ctx.layout.cleaned(ctx.channel, ctx.downsample, s.name),
                           f"the cleaned channel-{ctx.channel} {resolution}", f"run --task clean {flags}")
    tasks = []
    for s in available:
        source = ctx.layout.cleaned(ctx.channel, ctx.downsample, s.name)
        output = ctx.layout.aligned(ctx.channel, ctx.downsample, s.name)
        func = warp_thumbnail if ctx.downsample else warp_full
        tasks.append(Task(key=f"warp:{s.name}", func=func,
                          kwargs={"source": str(source), "transform": str(transforms[s.name]), "output": str(output)},
                          inputs=[source, transforms[s.name]], outputs=[output],
                          params={"interpolation": "linear"}, label=str(source)))
    results = ctx.execute(tasks, desc=f"warp CH{ctx.channel}")
    cut = sorted(key.split(":", 1)[1] for key, result in results.items() if result.get("tissue_at_canvas_edge"))
    if cut:
        ctx.log.warning("align: tissue reaches the canvas edge in sections %s and may be cut off: enlarge the "
                        "canvas (scan_run width/height) and re-run clean and align", ", ".join(cut))


def _record_registration_settings(ctx: StageContext, backend: str) -> None:
    """The parameter maps actually used go into the run's params (pipeline_run.params)."""
    from db.models import PipelineRun
    from pipeline.imaging.register import RECORDED_FILES, SIMILARITY_FILES, SITK_SETTINGS, parameter_texts

    if ctx.run_id is None:
        return
    with ctx.session() as session:
        run = session.get(PipelineRun, ctx.run_id)
        params = json.loads(run.params or "{}")
        params["registration_backend"] = backend
        params["registration_settings"] = (parameter_texts(dict.fromkeys((*RECORDED_FILES, *SIMILARITY_FILES)))
                                           if backend == "elastix" else SITK_SETTINGS)
        run.params = json.dumps(params, sort_keys=True, default=str)


def _store_manual(ctx: StageContext, sections) -> None:
    from sqlalchemy import select

    from db.models import ElastixTransformation

    asked = str(ctx.params["section"]).strip()
    by_name = {s.name: s for s in sections}
    if asked in by_name:
        position = by_name[asked].position
    elif asked.isdigit():
        position = int(asked)
    else:
        raise SlidepipeError(f"--section {asked}: no active section of that name (give <slide>_S<scene> as in the "
                             "file names, or a position)")
    if not 0 < position < len(sections):
        raise SlidepipeError(f"--section {asked}: a manual transform needs a section at position 1..{len(sections) - 1} "
                             "(it maps the section onto its previous one)")
    moving, fixed = sections[position], sections[position - 1]
    with ctx.session() as session:
        for row in session.scalars(select(ElastixTransformation).where(
                ElastixTransformation.FK_prep_id == ctx.animal, ElastixTransformation.FK_section_id == moving.channel1_id,
                ElastixTransformation.manual.is_(True), ElastixTransformation.active.is_(True))):
            row.active = False
        if ctx.params.get("clear_manual"):
            ctx.log.info("align: manual transform of %s removed", moving.label)
            return
        rotation = np.deg2rad(ctx.params.get("rotation") or 0.0)
        session.add(ElastixTransformation(
            FK_prep_id=ctx.animal, FK_section_id=moving.channel1_id, FK_fixed_section_id=fixed.channel1_id,
            section=section_name(moving.position), rotation=float(rotation), xshift=float(ctx.params.get("xshift") or 0.0),
            yshift=float(ctx.params.get("yshift") or 0.0), metric=None, iteration=None, manual=True,
            resolution="thumbnail", active=True, FK_pipeline_run_id=ctx.run_id))
    ctx.log.info("align: manual transform stored for %s onto %s (wins over the computed one)", moving.label, fixed.name)


def _store_mirrored(ctx: StageContext, sections) -> list:
    """--section S --mirrored true|false: the user's word that S is mounted face down, on S's
    channel-1 row (so it follows the section when the order changes); the sections as now."""
    from dataclasses import replace

    from db.models import SlideCziToTif

    asked = str(ctx.params["section"]).strip()
    by_name = {s.name: s for s in sections}
    if asked in by_name:
        section = by_name[asked]
    elif asked.isdigit() and int(asked) < len(sections):
        section = sections[int(asked)]
    else:
        raise SlidepipeError(f"--section {asked}: no active section of that name (give <slide>_S<scene> as in the "
                             "file names, or a position)")
    value = bool(ctx.params["mirrored"])
    with ctx.session() as session:
        session.get(SlideCziToTif, section.channel1_id).mirrored = value
    ctx.log.info("align: %s %s", section.label, "is mirrored from now on (mounted face down)" if value else
                 "is no longer mirrored")
    return [replace(s, mirrored=value) if s.name == section.name else s for s in sections]
