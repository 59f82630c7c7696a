"""The align stage on a sample brain against its truth, in minutes: builds the sample (`--size
hard` by default: `create_pipeline sample --hard`) once under --root, runs extract, mask, clean
and align through the command line (a rerun skips what is done), and prints every pair's
rotation error and every section's final error against the truth (tests/helpers_truth.py).

    PYTHONPATH=. python bench/hard_align.py [--root /tmp/slidepipe-hard] [--size hard] [--seed 0] [--redo-align]

--redo-align deletes the align stage's transforms (not extract/mask/clean) so every pair is
registered again; without it, only what changed is redone.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.create_pipeline import main as cli  # noqa: E402
from pipeline.layout import AnimalLayout  # noqa: E402
from pipeline.sample import build_sample  # noqa: E402
from tests.helpers_truth import alignment_errors, rms  # noqa: E402


def run(root: Path, db_url: str, task: str, *extra: str) -> None:
    started = time.monotonic()
    code = cli(["--animal", "DEMO", "--task", task, "--data-root", str(root), "--db-url", db_url, "--workers", "2", *extra])
    print(f"{task}: exit {code}, {time.monotonic() - started:.1f} s", flush=True)
    if code != 0:
        raise SystemExit(f"{task} failed")


def report(root: Path) -> dict:
    errors = alignment_errors(root)
    mirrored = set(errors["mirrored"])
    print(f"\nmirrored sections (truth): {sorted(mirrored)}; reference {errors['reference']}")
    print("pairs (fixed->moving, step): rotation error deg, RMS px; * involves a mirrored section")
    bad = []
    for p in errors["pairs"]:
        mark = "*" if p["mirrored"] else " "
        rot = p["rotation_error_deg"]
        solved = p.get("solved_rotation_error_deg")
        extra = "" if solved is None else f"  solved {solved:+7.2f}"
        print(f" {mark} {p['fixed']:2d}->{p['moving']:2d} k-{p['step']}: {rot:+8.2f} deg {p['rms_px']:7.2f} px{extra}")
        if not p["mirrored"] and abs(solved) > 1:
            bad.append(p)
    print("sections: final error px (unaligned, chained)")
    for s in errors["sections"]:
        mark = "*" if s["mirrored"] else " "
        chained = s["chained_px"]
        print(f" {mark} {s['position']:2d}: {s['error_px']:7.2f}  ({s['unaligned_px']:6.2f}, "
              f"{'-' if chained is None else f'{chained:.2f}'})")
    good = [s for s in errors["sections"] if not s["mirrored"]]
    worse = [s["position"] for s in good if s["position"] != errors["reference"] and s["error_px"] >= s["unaligned_px"]]
    off = ", ".join(f"{p['fixed']}->{p['moving']}" for p in bad)
    print(f"\nnon-mirrored pairs whose solved rotation is more than 1 deg off: {len(bad)} of {sum(not p['mirrored'] for p in errors['pairs'])} ({off})")
    print(f"non-mirrored sections: final RMS {rms(s['error_px'] for s in good):.2f} px (worst "
          f"{max(s['error_px'] for s in good):.2f}, median {np.median([s['error_px'] for s in good]):.2f}); unaligned "
          f"{rms(s['unaligned_px'] for s in good):.2f}; chained {rms(s['chained_px'] for s in good):.2f}; "
          f"not better than unaligned: {worse}")
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/slidepipe-hard"))
    parser.add_argument("--size", default="hard")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--redo-align", action="store_true")
    parser.add_argument("--align-args", default="", help="extra align flags, e.g. '--detect-flips'")
    args = parser.parse_args()
    root = args.root / "data"
    db_url = f"sqlite:///{args.root / 'slidepipe.db'}"
    build_sample(root, animal="DEMO", seed=args.seed, size=args.size)
    for task in ("extract", "mask", "clean"):
        run(root, db_url, task)
    if args.redo_align:
        shutil.rmtree(AnimalLayout(root, "DEMO").transforms_dir, ignore_errors=True)
    run(root, db_url, "align", *args.align_args.split())
    report(root)


if __name__ == "__main__":
    main()
