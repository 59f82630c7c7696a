"""The standalone command: `create_pipeline tiff2omezarr`, `python -m pipeline.publish.omezarr`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from pipeline.errors import SlidepipeError
from pipeline.publish import pyramid
from pipeline.publish.omezarr.convert import convert_stack
from pipeline.publish.omezarr.options import DEFAULT_CHUNK, NGFF_ZARR_FORMAT, OmeZarrOptions
from pipeline.publish.omezarr.tiffstack import list_slices

def xyz_triple(text: str) -> tuple[int, int, int]:
    """'N' or 'X,Y,Z' -> (x, y, z): x first, like --ranges and the neuroglancer stage's flags."""
    try:
        parts = [int(p) for p in str(text).replace("x", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected N or X,Y,Z (positive integers), got {text!r}")
    return tuple(parts)


def zyx(xyz: Sequence[int] | None) -> tuple[int, int, int] | None:
    return None if xyz is None else tuple(int(v) for v in reversed(tuple(xyz)))


def parse_ranges(text: str) -> tuple[tuple[int | None, int | None], ...]:
    """'x0:x1,y0:y1,z0:z1' (xyz order, as scroll_to_ome) -> ((z0, z1), (y0, y1), (x0, x1));
    an empty side is open: ':,100:,0:50'."""
    parts = str(text).split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"--ranges wants x0:x1,y0:y1,z0:z1, got {text!r}")
    out = []
    for part in parts:
        lo, sep, hi = part.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"--ranges: {part!r} is not lo:hi")
        out.append((int(lo) if lo.strip() else None, int(hi) if hi.strip() else None))
    return tuple(reversed(out))


def _window(text: str) -> tuple[float, float]:
    lo, sep, hi = str(text).partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"--window wants START:END, got {text!r}")
    return float(lo), float(hi)


def add_format_arguments(group) -> None:
    """Flags shared by the standalone command and the omezarr stage."""
    group.add_argument("--ngff-version", "--ngff_version", choices=sorted(NGFF_ZARR_FORMAT), default="0.5",
                       help="0.5: Zarr v3 (default); 0.4: Zarr v2")
    group.add_argument("--chunk-size", "--chunk_size", type=xyz_triple, default=None, metavar="N|X,Y,Z",
                       help=f"chunk shape in voxels (default {DEFAULT_CHUNK[0]})")
    group.add_argument("--shard-size", type=xyz_triple, default=None, metavar="N|X,Y,Z",
                       help="Zarr v3 shard shape in voxels, a multiple of the chunk (default: no sharding)")
    group.add_argument("--nlevels", type=int, default=None,
                       help="pyramid levels including level 0 (default: until the top fits one chunk)")
    group.add_argument("--max-gb", "--max_gb", type=float, default=None,
                       help="peak memory of the converter in GB (1e9 bytes); slabs are planned to fit")
    group.add_argument("--algorithm", choices=pyramid.ALGORITHMS, default="mean", help="downsampling (default mean)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="create_pipeline tiff2omezarr",
        description="Convert a folder of z-slice TIFFs (one file per z, natural name order) to a multiscale OME-Zarr.",
    )
    parser.add_argument("input_tiff_dir", type=Path, nargs="?", help="folder of z-slice TIFFs")
    parser.add_argument("output_zarr", type=Path, help="output store, ending in .zarr")
    add_format_arguments(parser)
    parser.add_argument("--zarr-only", "--zarr_only", action="store_true",
                        help="write one full-resolution Zarr array, no pyramid or OME metadata")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store that differs")
    parser.add_argument("--ranges", type=parse_ranges, default=None, metavar="x0:x1,y0:y1,z0:z1",
                        help="convert only this box (xyz order; empty sides are open)")
    parser.add_argument("--first-new-level", "--first_new_level", type=int, default=None,
                        help="keep levels below N of the existing store, recompute N and above from N-1")
    parser.add_argument("--resolution-xy", type=float, default=None, help="xy pixel size in um (default: TIFF tags)")
    parser.add_argument("--resolution-z", type=float, default=None, help="z step in um (default: ImageJ spacing)")
    parser.add_argument("--window", type=_window, action="append", default=None, metavar="START:END",
                        help="display window of a channel (repeat per channel; default: 0.5-99.5 percentiles)")
    parser.add_argument("--channel-name", action="append", default=None, help="channel label (repeat per channel)")
    parser.add_argument("--name", default=None, help="image name in the metadata (default: the store's stem)")
    parser.add_argument("--compression-level", type=int, default=1, help="zstd level (default 1)")
    parser.add_argument("--threads", "--num_threads", type=int, default=None, help="threads (default: all cores)")
    return parser


def options_from_args(args: argparse.Namespace) -> OmeZarrOptions:
    return OmeZarrOptions(
        ngff_version=args.ngff_version, chunk=zyx(args.chunk_size), shard=zyx(args.shard_size),
        nlevels=args.nlevels, max_gb=args.max_gb, zarr_only=getattr(args, "zarr_only", False),
        overwrite=getattr(args, "overwrite", False), algorithm=args.algorithm, ranges=getattr(args, "ranges", None),
        first_new_level=getattr(args, "first_new_level", None),
        voxel_um=(getattr(args, "resolution_z", None), getattr(args, "resolution_xy", None),
                  getattr(args, "resolution_xy", None)),
        windows=getattr(args, "window", None), channel_names=getattr(args, "channel_name", None),
        name=getattr(args, "name", None), compression_level=getattr(args, "compression_level", 1),
        threads=getattr(args, "threads", None),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        options = options_from_args(args)
        if options.first_new_level is None and args.input_tiff_dir is None:
            parser.error("input_tiff_dir is required (except with --first-new-level)")
        paths = [] if options.first_new_level is not None else list_slices(args.input_tiff_dir)
        result = convert_stack(paths, args.output_zarr, options)
    except SlidepipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    mb = result.bytes_in / 1e6
    rate = f", {mb / result.seconds:.0f} MB/s" if result.bytes_in and result.seconds > 0 else ""
    print(f"{result.store}: {result.status}; levels {result.shapes} (NGFF {result.ngff_version}); "
          f"{result.slabs_written} slabs written, {result.slabs_skipped} already done; "
          f"{result.seconds:.1f} s{rate}")
    return 0

