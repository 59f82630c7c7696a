"""Neuroglancer viewer state and links for an animal's published volumes.

The state is plain JSON (the format Neuroglancer keeps after `#!` in its URL), built from what is
on disk: each channel's precomputed `info` (or OME-Zarr metadata) gives voxel size, extent and
data type, so a link is right for whatever was published, whichever database made it.

URLs (see docs/serving-and-viewing.md): Apache serves `<data_root>/<animal>/www/` at
`<base>/<animal>/`, so channel c is `precomputed://<base>/<animal>/neuroglancer_data/C<c>` and
its OME-Zarr `zarr3://<base>/<animal>/omezarr/C<c>.ome.zarr`.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.atomic import atomic_path
from pipeline.errors import SlidepipeError
from pipeline.imaging.contrast import histogram_of, window_from_histogram
from pipeline.layout import AnimalLayout

PUBLIC_NEUROGLANCER = "https://neuroglancer-demo.appspot.com/"
OFFLINE_TOKEN = "slidepipe"
ORIGIN_PLACEHOLDER = "SLIDEPIPE_ORIGIN"
"""`base_url` of states stored in static pages (web.pages): the page puts its own origin
(`location.origin`) in its place when it is opened, so no host name is written into a page."""

# Characters left as they are in the URL fragment (the rest is percent-encoded).
_FRAGMENT_SAFE = "~@$&()*!+=:;,.?/'"

# Colours of channels when several are shown together (additive blending, as fluorescence).
CHANNEL_COLOURS = ["#ff0000", "#00ff00", "#0000ff", "#ffff00", "#ff00ff", "#00ffff"]

_UNIT_TO_NM = {"nanometer": 1.0, "nm": 1.0, "micrometer": 1e3, "um": 1e3, "millimeter": 1e6, "mm": 1e6,
               "meter": 1e9, "m": 1e9, "angstrom": 0.1}


class ViewerStateError(SlidepipeError):
    """Published data needed for a viewer state is missing or unreadable."""


@dataclass(frozen=True)
class Volume:
    """What the state needs to know about one published channel volume."""

    channel: int
    name: str
    path: Path            # on disk
    kind: str             # "precomputed", "zarr2", "zarr3"
    voxel_nm: tuple[float, float, float]   # x, y, z
    size: tuple[int, int, int]             # x, y, z voxels at full resolution
    offset: tuple[int, int, int]
    data_type: str
    num_channels: int


# --- reading what was published -----------------------------------------------------------------

def read_precomputed(path: Path, channel: int) -> Volume:
    info_path = Path(path) / "info"
    try:
        info = json.loads(info_path.read_text())
        scale = info["scales"][0]
        return Volume(channel=channel, name=Path(path).name, path=Path(path), kind="precomputed",
                      voxel_nm=tuple(float(v) for v in scale["resolution"]),
                      size=tuple(int(v) for v in scale["size"]),
                      offset=tuple(int(v) for v in scale.get("voxel_offset", (0, 0, 0))),
                      data_type=str(info["data_type"]), num_channels=int(info.get("num_channels", 1)))
    except FileNotFoundError:
        raise ViewerStateError("no precomputed info file (run --task neuroglancer first)", info_path) from None
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ViewerStateError(f"not a precomputed info file: {exc!r}", info_path) from None


def read_omezarr(path: Path, channel: int) -> Volume:
    """NGFF 0.5 (zarr.json, attributes.ome) or 0.4 (.zattrs); the first multiscale image."""
    path = Path(path)
    try:
        if (path / "zarr.json").is_file():
            kind = "zarr3"
            attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
            attrs = attrs.get("ome", attrs)
        elif (path / ".zattrs").is_file():
            kind = "zarr2"
            attrs = json.loads((path / ".zattrs").read_text())
        else:
            raise ViewerStateError("no zarr.json or .zattrs: not an OME-Zarr store", path)
        multiscale = attrs["multiscales"][0]
        axes = [a if isinstance(a, dict) else {"name": a} for a in multiscale["axes"]]
        names = [a["name"] for a in axes]
        dataset = multiscale["datasets"][0]
        scale = next((t["scale"] for t in dataset.get("coordinateTransformations", []) if t["type"] == "scale"),
                     [1.0] * len(axes))
        level = path / dataset["path"]
        if kind == "zarr3":
            meta = json.loads((level / "zarr.json").read_text())
            dtype = meta["data_type"]
        else:
            meta = json.loads((level / ".zarray").read_text())
            dtype = np.dtype(meta["dtype"]).name
        shape = meta["shape"]
        voxel, size = [], []
        for axis in ("x", "y", "z"):
            if axis not in names:
                voxel.append(1.0)
                size.append(1)
                continue
            i = names.index(axis)
            unit = axes[i].get("unit", "micrometer")
            voxel.append(float(scale[i]) * _UNIT_TO_NM.get(unit, 1e3))
            size.append(int(shape[i]))
        channels = int(shape[names.index("c")]) if "c" in names else 1
        return Volume(channel=channel, name=path.name.split(".")[0], path=path, kind=kind,
                      voxel_nm=tuple(voxel), size=tuple(size), offset=(0, 0, 0), data_type=str(dtype),
                      num_channels=channels)
    except (FileNotFoundError, KeyError, IndexError, TypeError, ValueError, StopIteration) as exc:
        raise ViewerStateError(f"cannot read OME-Zarr metadata: {exc!r}", path) from None


def published_channels(layout: AnimalLayout, downsample: bool) -> list[int]:
    """Channels with a published precomputed layer (C<c> or C<c>T) in neuroglancer_data/."""
    pattern = re.compile(rf"^C(\d+){'T' if downsample else ''}$")
    found = []
    if layout.neuroglancer_data.is_dir():
        for entry in layout.neuroglancer_data.iterdir():
            m = pattern.match(entry.name)
            if m and (entry / "info").is_file():
                found.append(int(m.group(1)))
    return sorted(found)


def animals_with_published_data(data_root: str | Path) -> list[str]:
    root = Path(data_root)
    if not root.is_dir():
        return []
    names = []
    for entry in sorted(root.iterdir()):
        www = entry / "www"
        if any((www / sub).is_dir() and any((www / sub).iterdir()) for sub in ("neuroglancer_data", "omezarr")):
            names.append(entry.name)
    return names


# --- contrast ---------------------------------------------------------------------------------------

def published_window(volume: Volume) -> tuple[float, float] | None:
    """The display window recorded with the published volume: the precomputed layer's
    provenance (publish_layer), or the OME-Zarr store's omero window of its first channel. Both
    describe the published voxels (pipeline.publish.common.stack_windows), e.g. after `clean
    --normalise` stretched them; the histogram stage's counts (of the sections before clean) do not."""
    if volume.kind == "precomputed":
        from pipeline.publish.common import read_window

        return read_window(volume.path)
    try:
        if volume.kind == "zarr3":
            attrs = json.loads((volume.path / "zarr.json").read_text()).get("attributes", {})
            attrs = attrs.get("ome", attrs)
        else:
            attrs = json.loads((volume.path / ".zattrs").read_text())
        window = attrs["omero"]["channels"][0]["window"]
        return float(window["start"]), float(window["end"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def data_window(volume: Volume) -> tuple[float, float]:
    """Window from the voxels of the smallest published level (a few MB at most)."""
    values = _smallest_level(volume)
    counts, edges = histogram_of(values, np.dtype(volume.data_type))
    try:
        return window_from_histogram(counts, edges)
    except ValueError:
        info_max = np.iinfo(volume.data_type).max if np.issubdtype(np.dtype(volume.data_type), np.integer) else 1.0
        return 0.0, float(info_max)


def _smallest_level(volume: Volume) -> np.ndarray:
    if volume.kind == "precomputed":
        from cloudvolume import CloudVolume

        info = json.loads((volume.path / "info").read_text())
        mip = len(info["scales"]) - 1
        cv = CloudVolume(f"file://{volume.path}", mip=mip, progress=False, fill_missing=True)
        return np.asarray(cv[:, :, :])
    import zarr

    group = zarr.open_group(str(volume.path), mode="r")
    attrs = group.attrs.asdict()
    multiscale = attrs.get("ome", attrs)["multiscales"][0]
    return np.asarray(group[multiscale["datasets"][-1]["path"]][...])


# --- state ----------------------------------------------------------------------------------------

def layer_url(base_url: str, layout: AnimalLayout, volume: Volume) -> str:
    relative = volume.path.resolve().relative_to(layout.www.resolve()).as_posix()
    http = f"{base_url.rstrip('/')}/{layout.animal}/{relative}"
    scheme = {"precomputed": "precomputed", "zarr2": "zarr2", "zarr3": "zarr3"}[volume.kind]
    return f"{scheme}://{http}"


def _shader(volume: Volume, colour: str | None) -> str:
    if volume.num_channels == 3:
        return ("#uicontrol invlerp normalized\n"
                "void main() {\n"
                "  emitRGB(vec3(toNormalized(getDataValue(0)), toNormalized(getDataValue(1)),"
                " toNormalized(getDataValue(2))));\n"
                "}\n")
    if colour is None:
        return "#uicontrol invlerp normalized\nvoid main() {\n  emitGrayscale(normalized());\n}\n"
    return (f'#uicontrol vec3 color color(default="{colour}")\n'
            "#uicontrol invlerp normalized\n"
            "void main() {\n  emitRGB(color * normalized());\n}\n")


def build_state(data_root: str | Path, animal: str, base_url: str, *,
                channels: Sequence[int] | None = None,
                windows: Mapping[int, tuple[float, float]] | None = None,
                downsample: bool | None = None,
                layer_source: str | Mapping[int, str | Path] = "auto",
                layout: str = "4panel", viewport: tuple[int, int] = (1200, 700)) -> dict[str, Any]:
    """The Neuroglancer state (JSON-ready dict) showing every channel of `animal`.

    `windows` maps channel -> (lo, hi) display window; otherwise the window published with the
    volume (`published_window`), else one from the smallest pyramid level's voxels. `downsample`: True shows the thumbnail layers
    (C<c>T), False the full-resolution ones, None the full ones when published. `layer_source`:
    "precomputed", "omezarr" (the www/omezarr/C<c>.ome.zarr stores), {channel: store path}, or
    "auto": precomputed when published, else OME-Zarr.
    """
    ly = AnimalLayout(data_root, animal)
    if downsample is None:
        downsample = not published_channels(ly, False) and bool(published_channels(ly, True))
    volumes = _volumes(ly, channels, downsample, layer_source)
    if not volumes:
        raise ViewerStateError("nothing published for this animal (no neuroglancer_data/C<c>/info, no OME-Zarr)",
                               ly.www)
    reference = volumes[0]
    windows = dict(windows or {})
    several = len(volumes) > 1
    layers = []
    for index, volume in enumerate(volumes):
        window = windows.get(volume.channel) or published_window(volume) or data_window(volume)
        lo, hi = float(window[0]), float(window[1])
        colour = CHANNEL_COLOURS[index % len(CHANNEL_COLOURS)] if several and volume.num_channels != 3 else None
        layers.append({
            "type": "image",
            "source": layer_url(base_url, ly, volume),
            "name": f"C{volume.channel}",
            "shader": _shader(volume, colour),
            "shaderControls": {"normalized": {"range": [lo, hi]}},
            "blend": "additive" if several else "default",
            "visible": True,
        })
    vx, vy, vz = reference.voxel_nm
    sx, sy, sz = reference.size
    ox, oy, oz = reference.offset
    # Neuroglancer puts precomputed voxel i on [i, i+1) but OME-Zarr pixel centres on i (NGFF)
    if reference.kind != "precomputed":
        ox, oy, oz = ox - 0.5, oy - 0.5, oz - 0.5
    # the panel showing xy: the whole window less Neuroglancer's top bars (~100 px), or a quarter.
    # crossSectionScale counts the smallest global voxel size (often z, 20 um) per screen pixel.
    panels = 2 if layout == "4panel" else 1
    nm_per_pixel = max(sx * vx / (viewport[0] / panels), sy * vy / ((viewport[1] - 100) / panels))
    fit = nm_per_pixel / min(vx, vy, vz)
    return {
        "dimensions": {"x": [vx, "nm"], "y": [vy, "nm"], "z": [vz, "nm"]},
        "position": [ox + sx / 2, oy + sy / 2, oz + sz // 2 + 0.5],
        "crossSectionScale": float(max(fit * 1.1, 1e-3)),
        "layers": layers,
        "selectedLayer": {"layer": layers[0]["name"]},
        "layout": layout,
    }


def _volumes(ly: AnimalLayout, channels: Sequence[int] | None, downsample: bool,
             layer_source: str | Mapping[int, str | Path]) -> list[Volume]:
    if isinstance(layer_source, Mapping):
        chosen = sorted(channels) if channels else sorted(layer_source)
        return [read_omezarr(Path(layer_source[c]), c) if _is_zarr(Path(layer_source[c]))
                else read_precomputed(Path(layer_source[c]), c) for c in chosen]
    if layer_source == "auto":
        layer_source = "precomputed" if channels or published_channels(ly, downsample) else "omezarr"
    if layer_source == "precomputed":
        chosen = list(channels) if channels else published_channels(ly, downsample)
        return [read_precomputed(ly.precomputed_layer(c, downsample), c) for c in chosen]
    if layer_source == "omezarr":
        if channels:
            chosen = list(channels)
        else:
            pattern = re.compile(rf"^C(\d+){'T' if downsample else ''}\.ome\.zarr$")
            directory = ly.omezarr(1, downsample).parent
            chosen = sorted(int(m.group(1)) for e in (directory.iterdir() if directory.is_dir() else [])
                            if (m := pattern.match(e.name)))
        return [read_omezarr(ly.omezarr(c, downsample), c) for c in chosen]
    raise ViewerStateError(f"layer_source must be 'auto', 'precomputed', 'omezarr' or {{channel: path}}, "
                           f"got {layer_source!r}")


def _is_zarr(path: Path) -> bool:
    return (path / "zarr.json").is_file() or (path / ".zattrs").is_file()


def section_z_offset(state: Mapping[str, Any]) -> float:
    """Where in a voxel the state's z position sits: 0.5 for precomputed (voxel i on [i, i+1)),
    0 for OME-Zarr (pixel centres on i); `build_state` keeps it at every section."""
    z = float(state["position"][2])
    return z - float(np.floor(z))


def at_section(state: Mapping[str, Any], section: int, layout: str | None = None) -> dict[str, Any]:
    """A copy of `state` showing section `section` (z index = position in the ordered stack)."""
    import copy

    moved = copy.deepcopy(dict(state))
    moved["position"] = [moved["position"][0], moved["position"][1], section + section_z_offset(state)]
    if layout is not None:
        moved["layout"] = layout
    return moved


# --- links ------------------------------------------------------------------------------------------

def link_for(state: Mapping[str, Any], client_base: str) -> str:
    """`<client_base>#!<percent-encoded JSON>`: a public Neuroglancer
    (https://neuroglancer-demo.appspot.com/) or the offline client (http://host:port/v/<token>/)."""
    text = json.dumps(state, separators=(",", ":"))
    base = client_base if client_base.endswith("/") else client_base + "/"
    return f"{base}#!{urllib.parse.quote(text, safe=_FRAGMENT_SAFE)}"


def offline_client_url(server_url: str, token: str = OFFLINE_TOKEN) -> str:
    return f"{server_url.rstrip('/')}/v/{token}/"


def write_links(data_root: str | Path, animal: str, server_url: str, *,
                public_client: str = PUBLIC_NEUROGLANCER, **state_options: Any) -> dict[str, str]:
    """Build the state, store it with both links under www/neuroglancer/, and return the links."""
    ly = AnimalLayout(data_root, animal)
    state = build_state(data_root, animal, server_url, **state_options)
    links = {
        "offline": link_for(state, offline_client_url(server_url)),
        "public": link_for(state, public_client),
        "server": server_url,
    }
    for path, content in ((ly.viewer_state(), state), (ly.viewer_links(), links)):
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(content, indent=2) + "\n")
    return links
