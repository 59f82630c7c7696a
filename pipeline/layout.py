"""The one place that knows where every file of an animal lives.

Names follow the lab pipeline slidepipe replaces (preps/, www/neuroglancer_data/ ...), so users'
scripts and habits carry over. Stages ask this module for paths and never build them by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UsageError

THUMBNAIL_FACTOR = 32
"""Extracted thumbnails are 1/32 of full resolution in x and y."""

ANIMAL_ID_PATTERN = "[A-Za-z0-9][A-Za-z0-9_-]{0,19}"
"""Every animal id (`--animal`): 1 to 20 ASCII letters, digits, '_' or '-', starting with a letter
or digit. It names the animal's directory under the data root (so no '/', '..' or spaces) and
fits `animal.prep_id` (20 characters)."""
_ANIMAL_ID = re.compile(ANIMAL_ID_PATTERN)


def check_animal_id(animal: object) -> str:
    """`animal` itself when it is a valid id; else UsageError with the one line the CLI prints."""
    if isinstance(animal, str) and _ANIMAL_ID.fullmatch(animal):
        return animal
    length = f" ({len(animal)} characters)" if isinstance(animal, str) and len(animal) > 20 else ""
    raise UsageError(f"invalid animal id {animal!r}{length}: use 1 to 20 letters (A-Z, a-z), digits, '_' or '-', "
                     "starting with a letter or digit")


def resolution_name(downsample: bool) -> str:
    return "thumbnail" if downsample else "full"


def section_name(position: int) -> str:
    """A position in the ordered active list as the lab pipeline wrote it (000, 001, ...). Used
    for display and for the `section` columns only: files are named by `section_key`."""
    return f"{position:03d}"


def section_key(slide_stem: str, scene_index: int) -> str:
    """The stable identity of a section (a scene, across channels): `<slide>_S<scene>`, scene
    1-based as in ZEN, e.g. `DK39_slide012_S3`. It never changes when sections are reordered or
    deactivated, so every file a person edits or a later stage trusts is named by it."""
    return f"{slide_stem}_S{scene_index + 1}"


def _section_file(section: str) -> str:
    if not isinstance(section, str) or not section or "/" in section:
        raise TypeError(f"a section is named by its key (<slide>_S<scene>, see layout.section_key), got {section!r}")
    return section


def server_state_dir(data_root: str | Path) -> Path:
    """Where `create_pipeline serve` records the server of a data root (pid, port, log). Not
    served: Apache and the fallback map only `<animal>/www/`."""
    return Path(data_root).absolute() / ".serve"


def queue_results_root(data_root: str | Path) -> Path:
    """The folder of every runner batch's results directory (`queue_results_dir`)."""
    return Path(data_root).absolute() / ".queue"


def queue_results_dir(data_root: str | Path, batch: str) -> Path:
    """Where queue workers leave the outcomes of one runner batch (`pipeline.queued`) for the
    runner to record. Under the shared data root, because workers have no database; in a dot
    folder, which no animal name can be."""
    if not batch or "/" in batch or batch.startswith("."):
        raise ValueError(f"not a batch name: {batch!r}")
    return queue_results_root(data_root) / batch


def queue_result(data_root: str | Path, batch: str, task_key: str) -> Path:
    """The result file of one task: named by a hash of its key (keys may hold any character)."""
    import hashlib

    return queue_results_dir(data_root, batch) / f"{hashlib.sha256(task_key.encode()).hexdigest()[:24]}.json"


def site_index(data_root: str | Path) -> Path:
    """The index page of every animal of a data root (`create_pipeline --task web`), served at
    `/`. In a dot folder, which no animal name can be (Apache serves only this file from it)."""
    return Path(data_root).absolute() / ".www" / "index.html"


@dataclass(frozen=True)
class AnimalLayout:
    data_root: Path
    animal: str

    def __post_init__(self) -> None:
        # Defence in depth: the CLI checks the id first, but no caller may build a path of an
        # animal outside the data root (`../x`, `a/b`, an absolute path).
        check_animal_id(self.animal)
        object.__setattr__(self, "data_root", Path(self.data_root).absolute())

    # --- roots -----------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return self.data_root / self.animal

    @property
    def czi_dir(self) -> Path:
        return self.root / "czi"

    @property
    def preps(self) -> Path:
        return self.root / "preps"

    @property
    def www(self) -> Path:
        return self.root / "www"

    @property
    def sample_truth_dir(self) -> Path:
        """Ground truth of the synthetic sample brain (pipeline.sample): transforms, footprints."""
        return self.root / "sample_truth"

    # --- extract ---------------------------------------------------------------------------
    @property
    def tif_dir(self) -> Path:
        return self.preps / "tif"

    @property
    def thumbnail_original_dir(self) -> Path:
        return self.preps / "thumbnail_original"

    @staticmethod
    def extracted_name(slide_stem: str, scene_index: int, channel: int) -> str:
        """Stable name of one extracted scene channel (scene 1-based as in ZEN)."""
        return f"{section_key(slide_stem, scene_index)}_C{channel}.tif"

    def extracted_tif(self, slide_stem: str, scene_index: int, channel: int) -> Path:
        return self.tif_dir / self.extracted_name(slide_stem, scene_index, channel)

    def extracted_thumbnail(self, slide_stem: str, scene_index: int, channel: int) -> Path:
        return self.thumbnail_original_dir / self.extracted_name(slide_stem, scene_index, channel)

    def scene_png(self, slide_stem: str, scene_index: int) -> Path:
        return self.www / "scene" / f"{section_key(slide_stem, scene_index)}.png"

    # --- per-channel section stacks --------------------------------------------------------
    def channel_dir(self, channel: int) -> Path:
        return self.preps / f"CH{channel}"

    def masks_dir(self, kind: str, downsample: bool = True, channel: int = 1) -> Path:
        """kind: 'masked' (binary 0/255) or 'colored' (editable overlay)."""
        return self.preps / "masks" / f"CH{channel}" / f"{resolution_name(downsample)}_{kind}"

    def mask(self, section: str, downsample: bool = True, kind: str = "masked") -> Path:
        return self.masks_dir(kind, downsample) / f"{_section_file(section)}.tif"

    def cleaned_dir(self, channel: int, downsample: bool) -> Path:
        return self.channel_dir(channel) / f"{resolution_name(downsample)}_cleaned"

    def cleaned(self, channel: int, downsample: bool, section: str) -> Path:
        return self.cleaned_dir(channel, downsample) / f"{_section_file(section)}.tif"

    def aligned_dir(self, channel: int, downsample: bool) -> Path:
        return self.channel_dir(channel) / f"{resolution_name(downsample)}_aligned"

    def aligned(self, channel: int, downsample: bool, section: str) -> Path:
        return self.aligned_dir(channel, downsample) / f"{_section_file(section)}.tif"

    # --- alignment: made from channel-1 thumbnails, used by every channel and resolution ----
    @property
    def transforms_dir(self) -> Path:
        return self.preps / "transforms"

    def pairwise_transform(self, section: str, step: int = 1) -> Path:
        """Registration of `section` (moving) onto its previous neighbour (step 1), or onto the
        section before that (step 2, `pairwise_k2/`); the JSON names both."""
        folder = "pairwise" if step == 1 else f"pairwise_k{step}"
        return self.transforms_dir / folder / f"{_section_file(section)}.json"

    def similarity_transform(self, section: str, step: int = 1) -> Path:
        """The second pass's similarity fit of `section` onto its step-1 or step-2 neighbour,
        started from the first pass's poses (`similarity/`, `similarity_k2/`)."""
        folder = "similarity" if step == 1 else f"similarity_k{step}"
        return self.transforms_dir / folder / f"{_section_file(section)}.json"

    @property
    def first_pass_poses(self) -> Path:
        """Align's first pose solve (from the registrations alone): where the similarity fits start."""
        return self.transforms_dir / "first_pass.json"

    def section_transform(self, section: str) -> Path:
        """Composed transform of one section onto the reference (middle) section (JSON)."""
        return self.transforms_dir / "composed" / f"{_section_file(section)}.json"

    # --- histograms and metrics (data under preps/, plots under www/) -----------------------
    def histogram_data(self, channel: int, downsample: bool, section: str | None = None) -> Path:
        """Counts of one section (.npz); section None: the channel's combined histogram."""
        name = "combined" if section is None else _section_file(section)
        return self.channel_dir(channel) / f"{resolution_name(downsample)}_histogram" / f"{name}.npz"

    def histogram_png(self, channel: int, downsample: bool, section: str | None = None) -> Path:
        name = "combined" if section is None else _section_file(section)
        return self.histogram_dir(channel) / resolution_name(downsample) / f"{name}.png"

    def metrics_data(self, channel: int, downsample: bool, section: str) -> Path:
        """Similarity of `section` and its previous neighbour as aligned (JSON, which names both)."""
        return self.channel_dir(channel) / f"{resolution_name(downsample)}_metrics" / f"{_section_file(section)}.json"

    def metrics_png(self, channel: int, downsample: bool) -> Path:
        return self.metrics_dir() / f"CH{channel}_{resolution_name(downsample)}.png"

    # --- QC --------------------------------------------------------------------------------
    def section_png_dir(self, channel: int, downsample: bool = True) -> Path:
        return self.www / "section" / f"CH{channel}_{resolution_name(downsample)}"

    def section_png(self, channel: int, downsample: bool, section: str) -> Path:
        return self.section_png_dir(channel, downsample) / f"{_section_file(section)}.png"

    def histogram_dir(self, channel: int) -> Path:
        return self.www / "histogram" / f"CH{channel}"

    def metrics_dir(self) -> Path:
        return self.www / "metrics"

    # --- published volumes -----------------------------------------------------------------
    @property
    def neuroglancer_data(self) -> Path:
        return self.www / "neuroglancer_data"

    def precomputed_layer(self, channel: int, downsample: bool, rechunkme: bool = False) -> Path:
        name = f"C{channel}{'T' if downsample else ''}{'_rechunkme' if rechunkme else ''}"
        return self.neuroglancer_data / name

    def precomputed_partial(self, channel: int, downsample: bool) -> Path:
        """The published layer while it is built z-slab by z-slab: inside the step-1 layer, so it
        goes with it; renamed to `precomputed_layer` once complete and verified."""
        return self.precomputed_layer(channel, downsample, rechunkme=True) / "partial"

    def precomputed_slab_markers(self, channel: int, downsample: bool) -> Path:
        """One JSON per finished slab (the slab tasks' recorded outputs), beside the partial layer."""
        return self.precomputed_layer(channel, downsample, rechunkme=True) / "slidepipe_slabs"

    def omezarr(self, channel: int, downsample: bool = False) -> Path:
        return self.www / "omezarr" / f"C{channel}{'T' if downsample else ''}.ome.zarr"

    # --- viewer links (web.state.write_links) ------------------------------------------------
    def viewer_state(self) -> Path:
        """Neuroglancer state JSON for this animal (served, so a viewer may load it by URL)."""
        return self.www / "neuroglancer" / "state.json"

    def viewer_links(self) -> Path:
        return self.www / "neuroglancer" / "links.json"

    # --- QC and provenance pages (web stage), served at /<animal>/ ---------------------------
    def web_page(self, name: str) -> Path:
        """A page of the animal's QC site: `index` is the animal page, served at /<animal>/."""
        return self.www / f"{name}.html"

    @property
    def web_image_dir(self) -> Path:
        """PNGs the web stage renders for its pages (never links into preps/)."""
        return self.www / "qc"

    def mask_png(self, section: str) -> Path:
        """The editable mask overlay of a section, as the pages show it."""
        return self.web_image_dir / "mask" / f"{_section_file(section)}.png"

    def aligned_png(self, channel: int, section: str) -> Path:
        return self.web_image_dir / f"aligned_CH{channel}" / f"{_section_file(section)}.png"

    # --- provenance relative paths ---------------------------------------------------------
    def relative(self, path: Path) -> str:
        """Path as stored in file_log: relative to the data root, POSIX separators."""
        path = Path(path).absolute()
        try:
            return path.relative_to(self.data_root).as_posix()
        except ValueError:
            return path.as_posix()

    def absolute(self, stored: str) -> Path:
        path = Path(stored)
        return path if path.is_absolute() else self.data_root / path
