"""`python -m apache --data-root DIR [--port 8080]`: print the sites-available file for a
system-wide Apache serving DIR (see docs/serving-and-viewing.md)."""

from __future__ import annotations

import argparse
import sys

from apache.launcher import render_virtual_host
from pipeline.errors import SlidepipeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True, help="the data root to publish (must exist)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--cors-origins", default=None, metavar="ORIGINS",
                        help="web pages (origins) besides loopback pages and the public Neuroglancer that may read "
                             "the data, separated by commas; '*': every origin (a public deployment)")
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(render_virtual_host(args.data_root, args.port, cors_origins=args.cors_origins))
    except SlidepipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
