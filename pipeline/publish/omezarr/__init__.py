"""Multiscale OME-Zarr from a stack of z-slice TIFFs (one file per z), for the `omezarr` stage and
as the standalone `create_pipeline tiff2omezarr` / `python -m pipeline.publish.omezarr` command.

Why it is built this way (see docs/format-omezarr.md):
- tensorstore writes the chunks (about twice zarr-python's speed here, many threads, no cache) and
  the pyramid maths is plain numpy (`pipeline.publish.pyramid`), level n+1 made from level n.
- Work is cut into slabs of whole chunks (or shards) sized from `--max-gb`, so the peak memory
  of the process is planned, not hoped for.
- A conversion records its progress (completed slabs per level) in the root node's attributes
  under "slidepipe", rewritten atomically after each slab; a killed run resumes from there, and
  the OME metadata plus `"done": true` are written last, so an unfinished store never looks
  finished.
- Chunks equal to the fill value (0) are not stored (tensorstore's default).

The modules, one concern each:
  options    OmeZarrOptions, ConversionResult, OmeZarrError
  tiffstack  probing and region reads of the input TIFFs
  store      zarr group/attribute files, channel layout, tensorstore array specs
  state      signature, per-level slab record, lock, what to do with an existing store
  planning   memory budget, slab cost, slabs of a level, heap hygiene
  metadata   NGFF multiscales and omero attributes, display windows
  convert    convert_stack, add_levels (--first-new-level), describe_store
  cli        the command line
This package re-exports what other modules and tests use.
"""

from pipeline.publish.omezarr.cli import add_format_arguments, build_parser, main, options_from_args, parse_ranges, xyz_triple, zyx
from pipeline.publish.omezarr.convert import add_levels, convert_stack, describe_store, resolve_ranges
from pipeline.publish.omezarr.options import DEFAULT_CHUNK, NGFF_ZARR_FORMAT, ConversionResult, OmeZarrError, OmeZarrOptions
from pipeline.publish.omezarr.planning import memory_budget, plan_level, slab_cost, warm_imports
from pipeline.publish.omezarr.state import STATE_KEY, decode_ranges, encode_ranges
from pipeline.publish.omezarr.store import read_attributes, store_zarr_format, write_attributes
from pipeline.publish.omezarr.tiffstack import list_slices, probe_stack, read_tiff_region

__all__ = [
    "ConversionResult", "DEFAULT_CHUNK", "NGFF_ZARR_FORMAT", "OmeZarrError", "OmeZarrOptions", "STATE_KEY",
    "add_format_arguments", "add_levels", "build_parser", "convert_stack", "decode_ranges", "describe_store",
    "encode_ranges", "list_slices", "main", "memory_budget", "options_from_args", "parse_ranges", "plan_level",
    "probe_stack", "read_attributes", "read_tiff_region", "resolve_ranges", "slab_cost", "store_zarr_format",
    "warm_imports", "write_attributes", "xyz_triple", "zyx",
]
