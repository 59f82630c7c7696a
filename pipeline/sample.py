"""The built-in sample brain: real multi-scene, two-channel, mosaic CZI slides of a synthetic brain.

Every stage can run on it without lab data, and later stages' accuracy can be measured because
the truth is known: `sample_truth/` holds, per section, the rotation and shift with which it was
laid on its slide, its tissue footprint (full resolution and 1/32) and the unrotated phantom
slice at 1/32. The pixels are rendered by `pipeline.imaging.phantom` from the seed alone, so
`SampleTruth.render(position)` reproduces exactly what was written, independently of any reader.

Pixel size: 3.25 um (small) / 1.625 um (large). A 10x objective with a 6.5 um camera pixel and 5x5
binning gives 3.25 um; at that size the widest section (about 2300 px) is a mouse-brain-like 7.5
mm, and the 1/32 thumbnails are 80 px wide. The 40 sections span the whole brain, as if every
10th section of a series had been kept.

`create_pipeline sample --hard` (size "hard") is the test of alignment: rotations up to +-45
degrees, two sections mounted face down (`mirrored` in the truth), two torn and two with a
piece missing (`cuts`: the footprint and phantom truth files include the damage), and 24
sections over the same brain, so neighbours differ more.
"""

from __future__ import annotations

import functools
import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_path
from pipeline.errors import SlidepipeError
from pipeline.imaging import phantom
from pipeline.imaging.downsample import downsample_area
from pipeline.layout import THUMBNAIL_FACTOR, AnimalLayout, section_name

TRUTH_FORMAT = 1
COMPRESSION = "zstd1:ExplicitLevel=1;PreProcess=HiLoByteUnpack"  # what ZEN writes for 16-bit data
MAX_ROTATION_DEG = 12.0
MIN_ROTATION_DEG = 1.0
SCENE_GAP_PX = 320  # glass between two sections on a slide
SCENES_PER_ROW = 4
OBJECTIVE = ("Plan-Apochromat 10x/0.45 M27", 10.0)


@dataclass(frozen=True)
class SampleSize:
    frame_shape: tuple[int, int]  # (h, w) of the unrotated phantom slice, multiples of 32
    scene_shape: tuple[int, int]  # (h, w) of each scene on the slide, multiples of 32
    unit_px: float  # pixels per normalised phantom unit
    pixel_size_um: float
    pixel_scale: float  # output pixels per pixel of the small sample
    tile: int  # mosaic tile edge (px) and overlap of neighbouring tiles
    overlap: int
    max_shift_px: tuple[float, float]
    scenes_per_slide: tuple[int, ...]
    max_rotation_deg: float = MAX_ROTATION_DEG
    mirrored: int = 0  # sections mounted face down
    torn: int = 0  # sections with a tear
    missing: int = 0  # sections with a piece missing at the edge


SIZES = {
    "small": SampleSize((1664, 2400), (1920, 2560), 1200.0, 3.25, 1.0, 1400, 64, (80.0, 60.0), (9, 8, 8, 8, 7)),
    "large": SampleSize((3328, 4800), (3840, 5120), 2400.0, 1.625, 2.0, 2048, 128, (160.0, 120.0), (9, 8, 8, 8, 7)),
    # for unit tests only: the same brain in 6 sections at ~1/3 of the small size
    "tiny": SampleSize((576, 832), (672, 896), 416.0, 9.375, 0.3467, 512, 32, (28.0, 21.0), (3, 3)),
    # `sample --hard`: rotations up to +-45 degrees (larger scenes to hold them), 2 sections
    # mounted mirrored, 2 torn, 2 with a piece missing, and 24 sections over the same brain, so
    # the anatomy changes 1.7x more from one section to the next than in the small sample
    "hard": SampleSize((1664, 2400), (2624, 2880), 1200.0, 3.25, 1.0, 1400, 64, (80.0, 60.0), (6, 6, 6, 6),
                       max_rotation_deg=45.0, mirrored=2, torn=2, missing=2),
}


@dataclass(frozen=True)
class SectionTruth:
    position: int  # global order of the section (000, 001 ...)
    slide_file: str
    slide_number: int
    scene_index: int  # 0-based scene in its slide
    scene_origin: tuple[int, int]  # (x, y) of the scene's bounding box on the slide, px
    scene_shape: tuple[int, int]  # (h, w)
    depth: float  # normalised anterior-posterior position in the phantom (-1..1)
    rotation_rad: float  # positive = clockwise as displayed (y down)
    shift_px: tuple[float, float]  # (x, y) of the section centre from the scene centre, full res
    phantom_to_scene: tuple[tuple[float, float, float], tuple[float, float, float]]
    tissue_area_px: int
    debris: tuple[dict, ...] = field(default=())
    mirrored: bool = False  # mounted face down: phantom_to_scene mirrors left-right
    cuts: tuple[dict, ...] = field(default=())  # phantom.Cut fields: torn or missing pieces

    def cut_objects(self) -> tuple[phantom.Cut, ...]:
        return tuple(phantom.Cut(**c) for c in self.cuts)

    @property
    def rotation_deg(self) -> float:
        return float(np.degrees(self.rotation_rad))


@dataclass(frozen=True)
class SampleTruth:
    data_root: Path
    animal: str
    seed: int
    size: str
    pixel_size_um: float
    channel_names: tuple[str, ...]
    frame_shape: tuple[int, int]
    slides: tuple[str, ...]
    sections: tuple[SectionTruth, ...]

    # --- where things are ------------------------------------------------------------------
    @property
    def layout(self) -> AnimalLayout:
        return AnimalLayout(self.data_root, self.animal)

    @property
    def truth_dir(self) -> Path:
        return self.layout.sample_truth_dir

    @property
    def slide_paths(self) -> list[Path]:
        return [self.layout.czi_dir / name for name in self.slides]

    @staticmethod
    def truth_json(data_root: str | Path, animal: str) -> Path:
        return AnimalLayout(data_root, animal).sample_truth_dir / "truth.json"

    def footprint_path(self, position: int, thumbnail: bool = False) -> Path:
        if thumbnail:
            return self.truth_dir / "footprint_thumbnail" / f"{section_name(position)}.npy"
        return self.truth_dir / "footprint_full" / f"{section_name(position)}.npz"

    def phantom_thumbnail_path(self, position: int, channel: int) -> Path:
        return self.truth_dir / "phantom_thumbnail" / f"{section_name(position)}_C{channel}.npy"

    # --- reading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, data_root: str | Path, animal: str = "DEMO") -> "SampleTruth":
        path = cls.truth_json(data_root, animal)
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SlidepipeError(f"no readable sample truth ({exc}); build it with `create_pipeline sample`", path) from exc
        if raw.get("format") != TRUTH_FORMAT:
            raise SlidepipeError(f"sample truth format {raw.get('format')} is not {TRUTH_FORMAT}: rebuild the sample", path)
        sections = tuple(
            SectionTruth(
                **{
                    **s,
                    "scene_origin": tuple(s["scene_origin"]),
                    "scene_shape": tuple(s["scene_shape"]),
                    "shift_px": tuple(s["shift_px"]),
                    "phantom_to_scene": tuple(tuple(r) for r in s["phantom_to_scene"]),
                    "debris": tuple(s["debris"]),
                    "cuts": tuple(s.get("cuts", ())),
                }
            )
            for s in raw["sections"]
        )
        return cls(
            data_root=Path(data_root).absolute(),
            animal=raw["animal"],
            seed=raw["seed"],
            size=raw["size"],
            pixel_size_um=raw["pixel_size_um"],
            channel_names=tuple(raw["channel_names"]),
            frame_shape=tuple(raw["frame_shape"]),
            slides=tuple(raw["slides"]),
            sections=sections,
        )

    def footprint(self, position: int, thumbnail: bool = False) -> np.ndarray:
        """Tissue mask (bool) of the section in its scene: full resolution or 1/32."""
        path = self.footprint_path(position, thumbnail)
        if thumbnail:
            return np.load(path)
        with np.load(path) as data:
            return data["mask"]

    def phantom_thumbnail(self, position: int, channel: int) -> np.ndarray:
        """Expected intensity of the unrotated slice at 1/32 (no texture, noise or debris)."""
        return np.load(self.phantom_thumbnail_path(position, channel))

    @property
    def section_count(self) -> int:
        return len(self.sections)

    @property
    def dtype(self) -> str:
        return "uint16"

    def render(self, position: int) -> list[np.ndarray]:
        """The section's scene pixels (one uint16 array per channel) exactly as written to the CZI."""
        return [c.copy() for c in _rendered(self.seed, self.size, self.sections[position])]

    def section_pixels(self, position: int, channel: int) -> np.ndarray:
        """One channel (1-based) of `render(position)`; the last section rendered is cached, so
        asking for its channels one by one renders it once."""
        return _rendered(self.seed, self.size, self.sections[position])[channel - 1].copy()

    def __str__(self) -> str:
        return (
            f"{len(self.sections)} sections on {len(self.slides)} slides in {self.layout.czi_dir}, "
            f"{len(self.channel_names)} channels, {self.pixel_size_um} um/px, seed {self.seed}, "
            f"truth in {self.truth_dir}"
        )


# --- planning ------------------------------------------------------------------------------
def plan_sections(animal: str, seed: int, size: str) -> list[SectionTruth]:
    """Where every section goes and how it is turned: everything but the pixels."""
    spec = SIZES[size]
    count = sum(spec.scenes_per_slide)
    depths = phantom.section_depths(count)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    mirrored, cuts = _plan_damage(count, seed, spec)
    plans = []
    position = 0
    h, w = spec.scene_shape
    for slide_index, scenes in enumerate(spec.scenes_per_slide):
        slide_number = slide_index + 1
        # Slide coordinates of a real scanner start far from 0; each slide a little differently.
        x0, y0 = 11000 + 37 * slide_index, 6000 + 23 * slide_index
        for scene in range(scenes):
            magnitude = rng.uniform(MIN_ROTATION_DEG, spec.max_rotation_deg)
            rotation = float(np.radians(magnitude * rng.choice([-1.0, 1.0])))
            shift = (float(rng.uniform(-1, 1) * spec.max_shift_px[0]), float(rng.uniform(-1, 1) * spec.max_shift_px[1]))
            matrix = phantom.phantom_to_scene(rotation, shift, spec.frame_shape, spec.scene_shape,
                                              mirrored=position in mirrored)
            row, col = divmod(scene, SCENES_PER_ROW)
            plans.append(
                SectionTruth(
                    position=position,
                    slide_file=slide_file_name(animal, slide_number),
                    slide_number=slide_number,
                    scene_index=scene,
                    scene_origin=(x0 + col * (w + SCENE_GAP_PX), y0 + row * (h + SCENE_GAP_PX)),
                    scene_shape=(h, w),
                    depth=float(depths[position]),
                    rotation_rad=rotation,
                    shift_px=shift,
                    phantom_to_scene=tuple(tuple(float(x) for x in r) for r in matrix),
                    tissue_area_px=0,
                    mirrored=position in mirrored,
                    cuts=cuts.get(position, ()),
                )
            )
            position += 1
    return plans


def _plan_damage(count: int, seed: int, spec: SampleSize) -> tuple[set[int], dict[int, tuple[dict, ...]]]:
    """Which sections are mounted mirrored, torn or missing a piece (its own random stream, so
    the standard samples keep their layout). Never the reference (middle) section, never two
    damaged neighbours, never the two end sections."""
    wanted = spec.mirrored + spec.torn + spec.missing
    if not wanted:
        return set(), {}
    rng = np.random.default_rng(np.random.SeedSequence([seed, 3]))
    reference = count // 2
    chosen: list[int] = []
    candidates = [p for p in range(1, count - 1) if abs(p - reference) > 1]
    for p in rng.permutation(candidates):
        if all(abs(int(p) - q) > 1 for q in chosen):
            chosen.append(int(p))
        if len(chosen) == wanted:
            break
    mirrored = set(chosen[: spec.mirrored])
    cuts: dict[int, tuple[dict, ...]] = {}
    for k, p in enumerate(chosen[spec.mirrored:]):
        angle = float(rng.uniform(0, 2 * np.pi))
        if k < spec.torn:  # a slit from the edge a third of the way in
            cut = {"kind": "tear", "angle": angle, "offset": float(rng.uniform(0.2, 0.35)), "width": 0.025, }
        else:  # a corner gone: 8-20 % of the section
            cut = {"kind": "missing", "angle": angle, "offset": float(rng.uniform(0.3, 0.42)), "width": 0.0}
        cuts[p] = (cut,)
    return mirrored, cuts


def slide_file_name(animal: str, slide_number: int) -> str:
    return f"{animal}_slide{slide_number:02d}.czi"


def _rendered(seed: int, size: str, section: SectionTruth) -> tuple[np.ndarray, ...]:
    return _rendered_cached(seed, size, section.position, section.depth, section.phantom_to_scene, section.scene_shape,
                            section.cut_objects())


@functools.lru_cache(maxsize=1)
def _rendered_cached(seed, size, position, depth, matrix, shape, cuts) -> tuple[np.ndarray, ...]:
    channels, _, _ = _render_at(phantom.make_phantom(seed), SIZES[size], seed, position, depth, matrix, shape, cuts)
    return tuple(channels)


def _render(ph: phantom.Phantom, spec: SampleSize, seed: int, section: SectionTruth):
    return _render_at(ph, spec, seed, section.position, section.depth, section.phantom_to_scene, section.scene_shape,
                      section.cut_objects())


def _render_at(ph: phantom.Phantom, spec: SampleSize, seed: int, position: int, depth: float, matrix, shape, cuts=()):
    """Pixels, footprint and debris of one section: a function of the seed and its placement only."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2, position]))
    return phantom.render_section(
        ph, depth, np.asarray(matrix), shape, spec.unit_px, spec.frame_shape, rng, pixel_scale=spec.pixel_scale,
        cuts=tuple(cuts),
    )


# --- building ------------------------------------------------------------------------------
def build_sample(
    data_root: str | Path, animal: str = "DEMO", seed: int = 0, size: str = "small", force: bool = False
) -> SampleTruth:
    """Write the sample brain's slides and truth; a complete earlier build with the same seed and
    size is kept as is (rewriting would give the CZIs new GUIDs and make extract redo them)."""
    if size not in SIZES:
        raise SlidepipeError(f"unknown sample size {size!r} (choose {', '.join(SIZES)})")
    layout = AnimalLayout(data_root, animal)
    if not force:
        try:
            existing = SampleTruth.load(data_root, animal)
        except SlidepipeError:
            existing = None
        if existing and (existing.seed, existing.size) == (seed, size) and all(p.is_file() for p in existing.slide_paths):
            return existing
    spec = SIZES[size]
    ph = phantom.make_phantom(seed)
    plans = plan_sections(animal, seed, size)
    layout.czi_dir.mkdir(parents=True, exist_ok=True)
    truth_dir = layout.sample_truth_dir
    done: list[SectionTruth] = []
    slides = []
    for slide_number in sorted({p.slide_number for p in plans}):
        on_slide = [p for p in plans if p.slide_number == slide_number]
        name = on_slide[0].slide_file
        slides.append(name)
        with atomic_path(layout.czi_dir / name) as tmp:
            done.extend(_write_slide(tmp, ph, spec, seed, on_slide, truth_dir, slide_number))
    truth = SampleTruth(
        data_root=layout.data_root,
        animal=animal,
        seed=seed,
        size=size,
        pixel_size_um=spec.pixel_size_um,
        channel_names=phantom.CHANNELS,
        frame_shape=spec.frame_shape,
        slides=tuple(slides),
        sections=tuple(done),
    )
    _write_truth_json(truth)
    return truth


def _write_slide(path: Path, ph, spec: SampleSize, seed: int, sections: list[SectionTruth], truth_dir: Path, slide_number: int):
    from pylibCZIrw import czi as pyczi

    written = []
    with pyczi.create_czi(str(path), exist_ok=True, compression_options=COMPRESSION) as writer:
        for section in sections:
            channels, tissue, debris = _render(ph, spec, seed, section)
            ox, oy = section.scene_origin
            h, w = section.scene_shape
            for ty, tx in tile_origins((h, w), spec.tile, spec.overlap):
                for c, image in enumerate(channels):
                    tile = np.ascontiguousarray(image[ty : ty + spec.tile, tx : tx + spec.tile])
                    writer.write(tile, location=(ox + tx, oy + ty), plane={"C": c}, scene=section.scene_index)
            _write_section_truth(truth_dir, ph, spec, section, tissue)
            written.append(
                SectionTruth(
                    **{
                        **asdict(section),
                        "tissue_area_px": int(tissue.sum()),
                        "debris": tuple(
                            {"x": round(d.x, 2), "y": round(d.y, 2), "radius_major": round(d.radius_major, 2),
                             "radius_minor": round(d.radius_minor, 2), "angle_deg": round(d.angle_deg, 2)}
                            for d in debris
                        ),
                    }
                )
            )
        metres = spec.pixel_size_um * 1e-6  # Zeiss stores metres
        writer.write_metadata(
            document_name=path.stem.split(".tmp-")[0],
            channel_names=dict(enumerate(phantom.CHANNELS)),
            scale_x=metres,
            scale_y=metres,
        )
    _add_acquisition_metadata(path, slide_number)
    return written


def tile_origins(shape: tuple[int, int], tile: int, overlap: int) -> list[tuple[int, int]]:
    """Top-left corners of overlapping mosaic tiles covering the scene (as a scanner's stage moves)."""
    def starts(length: int) -> list[int]:
        out = [0]
        while out[-1] + tile < length:
            out.append(out[-1] + tile - overlap)
        return out

    return [(y, x) for y in starts(shape[0]) for x in starts(shape[1])]


def _add_acquisition_metadata(path: Path, slide_number: int) -> None:
    """Acquisition date and objective, as ZEN records them (pylibCZIrw's writer has no fields for them)."""
    import xml.etree.ElementTree as ET

    from pylibCZIrw import czi as pyczi

    with pyczi.edit_czi(str(path)) as editor:
        builder = editor.create_metadata_builder()
        root = ET.fromstring(builder.get_xml())
        info = root.find("./Metadata/Information")
        image = info.find("Image") if info is not None else None
        if image is None:
            raise SlidepipeError("pylibCZIrw wrote no Information/Image metadata", path)
        ET.SubElement(image, "AcquisitionDateAndTime").text = f"2024-03-{slide_number:02d}T09:30:00Z"
        settings = ET.SubElement(image, "ObjectiveSettings")
        ET.SubElement(settings, "ObjectiveRef", Id="Objective:1")
        instrument = ET.SubElement(info, "Instrument")
        objectives = ET.SubElement(instrument, "Objectives")
        objective = ET.SubElement(objectives, "Objective", Id="Objective:1", Name=OBJECTIVE[0])
        ET.SubElement(objective, "NominalMagnification").text = f"{OBJECTIVE[1]:g}"
        builder.set_xml(ET.tostring(root, encoding="unicode"))
        builder.commit()


def _write_section_truth(truth_dir: Path, ph, spec: SampleSize, section: SectionTruth, tissue: np.ndarray) -> None:
    name = section_name(section.position)
    with atomic_path(truth_dir / "footprint_full" / f"{name}.npz") as tmp:
        _save_npz(tmp, mask=tissue)
    thumb = downsample_area(tissue.astype(np.float32), THUMBNAIL_FACTOR) > 0.5
    with atomic_path(truth_dir / "footprint_thumbnail" / f"{name}.npy") as tmp:
        np.save(tmp, thumb)
    frame_tissue, expected = phantom.render_expected(ph, section.depth, spec.frame_shape, spec.unit_px, spec.frame_shape,
                                                     section.cut_objects())
    del frame_tissue
    for c, image in enumerate(expected, start=1):
        with atomic_path(truth_dir / "phantom_thumbnail" / f"{name}_C{c}.npy") as tmp:
            np.save(tmp, downsample_area(image, THUMBNAIL_FACTOR).astype(np.float32))


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez_compressed with a fixed member date, so the same seed gives the same bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, array in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w") as handle:
                np.lib.format.write_array(handle, np.asanyarray(array), allow_pickle=False)


def _write_truth_json(truth: SampleTruth) -> None:
    """Written last: its presence means the build finished."""
    payload = {
        "format": TRUTH_FORMAT,
        "animal": truth.animal,
        "seed": truth.seed,
        "size": truth.size,
        "pixel_size_um": truth.pixel_size_um,
        "channel_names": list(truth.channel_names),
        "dtype": "uint16",
        "thumbnail_factor": THUMBNAIL_FACTOR,
        "frame_shape": list(truth.frame_shape),
        "rotation_convention": "scene = R(rotation) F (phantom - frame_centre) + scene_centre + shift; "
        "pixel centres, x right, y down, positive rotation clockwise as displayed; F mirrors x for sections "
        "with mirrored = true (mounted face down), else identity",
        "slides": list(truth.slides),
        "sections": [
            {
                **asdict(s),
                "scene_origin": list(s.scene_origin),
                "scene_shape": list(s.scene_shape),
                "shift_px": list(s.shift_px),
                "phantom_to_scene": [list(r) for r in s.phantom_to_scene],
                "debris": list(s.debris),
                "cuts": list(s.cuts),
            }
            for s in truth.sections
        ],
    }
    with atomic_path(SampleTruth.truth_json(truth.data_root, truth.animal)) as tmp:
        tmp.write_text(json.dumps(payload, indent=1) + "\n")


# --- TIFF variant --------------------------------------------------------------------------
def build_sample_tiffs(
    folder: str | Path, seed: int = 0, size: str = "small", count: int | None = None, prefix: str = "DEMO"
) -> list[Path]:
    """The sample's sections as one OME-TIFF each (`<prefix>_001.ome.tif` ...), tiled, with channel
    names and pixel size: input for extract's `--input DIR` mode. Pixels equal the CZI scenes."""
    import tifffile

    spec = SIZES[size]
    ph = phantom.make_phantom(seed)
    plans = plan_sections(prefix, seed, size)[: count if count is not None else None]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for section in plans:
        channels, _, _ = _render(ph, spec, seed, section)
        path = folder / f"{prefix}_{section.position + 1:03d}.ome.tif"
        with atomic_path(path) as tmp:
            tifffile.imwrite(
                tmp,
                np.stack(channels),
                ome=True,
                tile=(512, 512),
                compression="zlib",
                photometric="minisblack",
                metadata={
                    "axes": "CYX",
                    "PhysicalSizeX": spec.pixel_size_um,
                    "PhysicalSizeXUnit": "µm",
                    "PhysicalSizeY": spec.pixel_size_um,
                    "PhysicalSizeYUnit": "µm",
                    "Channel": {"Name": list(phantom.CHANNELS)},
                },
            )
        paths.append(path)
    return paths
