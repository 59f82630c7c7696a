"""web: static QC and provenance pages of the animal under www/ (and the index of animals at
the data root), served by the same Apache as the data. See web/pages.py and
docs/serving-and-viewing.md. create_pipeline also runs it after every stage that sets
`REFRESH_PAGES` (neuroglancer, omezarr), so a newly published layer has its links at once.
"""

from __future__ import annotations

from pipeline.runner import StageContext

NAME = "web"
VERSION = 1
LOCK_BY = ()  # one page writer per animal, whatever channel or resolution it was started for (runner.lock_key)
PER_CHANNEL = False


def run(ctx: StageContext) -> None:
    from web.pages import build_pages

    written = build_pages(ctx)
    ctx.log.info("web: %d page(s) written under %s (unchanged pages are left as they are)", len(written),
                 ctx.layout.www)
