"""`make bench`: the publishing comparison and the per-stage figures, printed as Markdown tables
that paste into docs/performance.md.

    python -m bench [--width 4096 --height 4096 --depths 32,64 --workers 2]
                    [--stage-sections 3 --stage-width 6000 --stage-height 4000 | --full-section]
                    [--only publish|stages] [--dir WORK]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path


def machine_line(workers: int) -> str:
    load = os.getloadavg()
    return (f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} cores, "
            f"{workers} workers, load average before the run {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=4096, help="publishing stack: section width (px)")
    parser.add_argument("--height", type=int, default=4096, help="publishing stack: section height (px)")
    parser.add_argument("--depths", default="32,64",
                        help="publishing stack: section counts to measure, comma-separated (two show whether "
                             "temporary files grow with the stack: at 4096 x 4096 uint16 the stage's default "
                             "slab is 32 sections, so 32 and 64 are one slab and two)")
    parser.add_argument("--dtype", choices=["uint8", "uint16"], default="uint16")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of every method and stage")
    parser.add_argument("--xy-um", type=float, default=0.325)
    parser.add_argument("--z-um", type=float, default=20.0)
    parser.add_argument("--neuroglancer-flags", default="",
                        help="extra flags for both neuroglancer stage runs of the publishing table, e.g. "
                             "--neuroglancer-flags='--slab-depth 16' (default: none, the stage as shipped)")
    parser.add_argument("--only", choices=["publish", "stages"], default=None)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    args, rest = parser.parse_known_args(argv)
    from bench import stages

    stage_args = stages.parse_args(rest)
    work = Path(tempfile.mkdtemp(prefix="slidepipe-bench-", dir=args.dir))
    started = time.perf_counter()
    failed = False
    try:
        print(f"# slidepipe bench, {machine_line(args.workers)}\n")
        if args.only in (None, "publish"):
            from bench import publish

            rows = []
            for depth in sorted({int(d) for d in args.depths.split(",")}):
                folder = work / f"stack-{depth}"
                publish.progress(f"writing a {args.width} x {args.height} x {depth} {args.dtype} stack")
                paths = publish.write_stack(folder, args.width, args.height, depth, args.dtype)
                rows += publish.measure_all(work, paths, args.workers, args.xy_um, args.z_um,
                                            shlex.split(args.neuroglancer_flags))
                shutil.rmtree(folder)
            flags = f", neuroglancer stage with {args.neuroglancer_flags}" if args.neuroglancer_flags else ""
            print(f"## Publishing: {args.width} x {args.height} {args.dtype} sections, {args.workers} workers{flags}\n")
            print("\n".join(publish.table(rows)))
            failed = any("failed" in r for r in rows)
            print()
        if args.only in (None, "stages"):
            failed = any("failed" in r for r in stages.run(work, stage_args, args.workers)) or failed
        print(f"(the harness ran {(time.perf_counter() - started) / 60:.1f} min)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0  # after printing everything: a failed method is in the tables


if __name__ == "__main__":
    sys.exit(main())
