"""QC and provenance pages (`--task web`, web/pages.py) on the tiny sample brain, served by Apache.

The brain goes through every stage once (module fixture, SQLite): one scene is deactivated after
extract with the SQL the page prints, section z 2 gets a wrong manual transform (so its pairs are
flagged by create_metrics), the pages come from the hooks after neuroglancer and omezarr. Then:
- rendering again changes no byte and no mtime; no page holds the data root or the host name;
- every page loads in headless Chromium from Apache without console errors or failed requests,
  every image is decoded, every link answers 200 (or is the public Neuroglancer, whose state is
  checked instead), every Neuroglancer link opens its layer at the right section;
- content: section count, the inactive scene, the flagged pair, the chain of a published layer
  ending at the CZI checksums the database holds;
- a screenshot of the animal page shows each scene thumbnail where its <img> is (each crop
  correlates with the PNG it shows; a missing image would be blank);
- Apache (and the fallback) still list no directory and refuse the private folders.
"""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select, text

from apache.launcher import create_server
from db.models import PipelineRun, Slide
from db.queries import ordered_sections, section_key_of
from db.session import init_db, session_scope
from pipeline.create_pipeline import main
from pipeline.layout import AnimalLayout, site_index
from pipeline.sample import build_sample
from tests.helpers_browser import chromium_driver, page_screenshot, require_apache, require_chromium, servable_dir
from web.pages import Scrubber
from web.state import PUBLIC_NEUROGLANCER, at_section, build_state

pytestmark = pytest.mark.filterwarnings("ignore:builtin type [Ss]wig")

ANIMAL = "DEMO"
BAD = 2                     # the section given a wrong manual transform
PAGES = ["index", "sections-C1", "sections-C2", "alignment", "histograms", "provenance"]


def cli(root: Path, task: str, *extra: str) -> int:
    return main(["--animal", ANIMAL, "--task", task, "--data-root", str(root), "--workers", "2", *extra])


@pytest.fixture(scope="module")
def site():
    with servable_dir("slidepipe-web-") as served:
        root = served / "data"
        build_sample(root, animal=ANIMAL, seed=0, size="tiny")
        assert cli(root, "extract") == 0
        url = f"sqlite:///{root / 'slidepipe.db'}"
        engine = init_db(url)
        with session_scope(engine) as s:   # drop the 2nd scene of slide 2, as the page says how
            slide = s.scalars(select(Slide).order_by(Slide.slide_physical_id)).all()[1]
            dropped = (slide.file_name, 2)
            s.execute(text(f"UPDATE slide_czi_to_tif SET active = 0 WHERE FK_slide_id = {slide.id} AND scene_index = 1;"))
        for task, *extra in (("mask",), ("clean",), ("histogram",), ("align", "--registration", "simpleitk"),
                             ("align", "--registration", "simpleitk", "--section", str(BAD), "--xshift", "60"),
                             ("create_metrics",), ("neuroglancer",), ("omezarr",)):
            assert cli(root, task, *extra) == 0, task
        yield root, url, dropped
        engine.dispose()


def pages_of(root: Path) -> dict[str, Path]:
    ly = AnimalLayout(root, ANIMAL)
    return {**{name: ly.web_page(name) for name in PAGES}, "/": site_index(root)}


# ------------------------------------------------------------------------------------------ files
def test_publishing_stages_refresh_the_pages_and_rendering_again_changes_nothing(site):
    root, url, _ = site
    with session_scope(init_db(url)) as s:
        stages = [r.stage for r in s.scalars(select(PipelineRun).order_by(PipelineRun.id))]
        hosts = {r.host for r in s.scalars(select(PipelineRun))}
    assert stages[-4:] == ["neuroglancer", "web", "omezarr", "web"]
    www = AnimalLayout(root, ANIMAL).www
    files = sorted([*www.glob("*.html"), *www.rglob("qc/**/*.png"), site_index(root)])
    assert len(files) > len(PAGES) and all(p.is_file() for p in pages_of(root).values())
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    assert cli(root, "web") == 0
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before
    for page in pages_of(root).values():
        html = page.read_text()
        assert str(root) not in html and str(root.resolve()) not in html and "/tmp/" not in html
        for host in hosts:
            assert not re.search(rf"(?<![\w.-]){re.escape(host)}(?![\w-])", html), (page.name, host)
        assert not re.search(r"(src|href)=\"[^\"]*(preps|czi)/", html), page.name   # shown as text only


def test_scrubber_keeps_pages_free_of_paths_and_hosts(tmp_path):
    scrub = Scrubber(tmp_path / "data", {"labhost7"})
    assert scrub(f"{tmp_path}/data/DEMO/preps/tif/a.tif: cannot read") == "DEMO/preps/tif/a.tif: cannot read"
    assert scrub("--input /home/me/tiffs/x.tif on labhost7") == "--input …/x.tif on <host>"
    assert scrub("precomputed://http://127.0.0.1:8080/DEMO/C1 and DEMO/czi/a.czi") == \
        "precomputed://http://127.0.0.1:8080/DEMO/C1 and DEMO/czi/a.czi"
    assert scrub.path("/home/me/tiffs/x.tif") == "…/x.tif"


# ---------------------------------------------------------------------------------------- browser
def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def state_of(href: str) -> dict:
    return json.loads(urllib.parse.unquote(href.split("#!", 1)[1]))


@pytest.mark.apache
@pytest.mark.browser
def test_pages_in_chromium_from_apache(site):
    require_apache()
    require_chromium()
    root, url, dropped = site
    with session_scope(init_db(url)) as s:
        checksums = {sl.file_name: sl.checksum for sl in s.scalars(select(Slide))}
        bad_key = section_key_of(ordered_sections(s, ANIMAL, 1)[BAD])
    with create_server("apache", root) as server, chromium_driver(1200, 1000) as driver:
        expected_state = {name: build_state(root, ANIMAL, server.url, channels=[1], downsample=True,
                                            layer_source=source)
                          for name, source in (("C1T", "precomputed"), ("C1T.ome.zarr", "omezarr"))}
        checked_links: set[str] = set()
        seen = {}
        for name in ["/", *PAGES]:
            page_url = f"{server.url}/" if name == "/" else f"{server.url}/{ANIMAL}/{name}.html"
            if name == "index":
                page_url = f"{server.url}/{ANIMAL}"          # redirected to /DEMO/, the animal page
            driver.get(page_url)
            driver.execute_script("document.querySelectorAll('img').forEach(i => i.loading = 'eager')")
            driver.execute_script("window.scrollTo(0, document.body.scrollHeight)")
            assert driver.execute_script(
                "return Promise.all([...document.images].map(i => i.decode().then(() => i.naturalWidth > 0, "
                "() => false)))") == [True] * len(driver.find_elements("css selector", "img")), name
            errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert not errors, (name, errors)
            failed = driver.execute_script("return performance.getEntriesByType('resource')"
                                           ".filter(e => e.responseStatus !== 200).map(e => e.name)")
            assert failed == [], (name, failed)
            links = driver.execute_script("return [...document.querySelectorAll('a[href]')].map(a => "
                                          "[a.href, a.getAttribute('data-ng-layer'), a.getAttribute('data-ng-section')])")
            for href, layer, section in links:
                if layer:
                    state = state_of(href)
                    want = expected_state[layer] if section is None else at_section(expected_state[layer], int(section),
                                                                                     layout="xy")
                    assert state == want, (name, layer, section)
                    assert href.startswith(PUBLIC_NEUROGLANCER) or href.startswith(f"{server.url}/v/slidepipe/#!")
                    source = state["layers"][0]["source"].split("://", 1)[1]
                    meta = f"{source}/info" if layer == "C1T" else f"{source}/zarr.json"
                    if meta not in checked_links:
                        assert get(meta) == 200, meta
                        checked_links.add(meta)
                    continue
                assert href.startswith(server.url), href     # no other external link
                target = href.split("#", 1)[0]
                if target not in checked_links:
                    assert get(target) == 200, (name, href)
                    checked_links.add(target)
            seen[name] = True
            if name == "index":
                assert driver.current_url == f"{server.url}/{ANIMAL}/"
                assert driver.find_element("id", "section-count").text == "5"
                inactive = driver.find_elements("css selector", "tr.scene.inactive")
                assert [r.get_attribute("data-scene") for r in inactive] == [f"{dropped[0]} S{dropped[1]}"]
                assert inactive[0].find_element("css selector", ".state").text == "inactive"
                assert len(driver.find_elements("css selector", "#stack tr")) == 1 + 5
                _thumbnails_are_drawn(driver, root)
            if name == "alignment":
                flagged = [r.get_attribute("data-pair") for r in driver.find_elements("css selector", "tr.pair.flagged")]
                assert f"{BAD - 1}-{BAD}" in flagged
                row = driver.find_element("id", f"pair-{BAD}")
                assert f"--task align --section {bad_key} " in row.text and "(manual)" in row.text
            if name == "provenance":
                for layer in ("C1T", "C1T.ome.zarr"):
                    block = driver.find_element("id", f"layer-{layer}").find_element("xpath", "following-sibling::table[2]")
                    rows = [r.text.split() for r in block.find_elements("css selector", "tr.source")]
                    assert {Path(path).name: checksum for path, _size, checksum in rows} == checksums, layer
            if name == "sections-C1":
                assert len(driver.find_elements("css selector", ".strip.section")) == 5
                assert len(driver.find_elements("css selector", ".strip.section.flagged")) >= 1
        assert len(seen) == len(PAGES) + 1


def _thumbnails_are_drawn(driver, root: Path) -> None:
    """Each scene thumbnail of the animal page, cut from a screenshot where its <img> is, matches
    the PNG it shows (scaled as displayed): blank or misplaced images would not."""
    import cv2

    driver.execute_script("document.getElementById('slides').scrollIntoView()")
    images = driver.find_elements("css selector", "table.scenes img.thumb")
    assert len(images) == 6
    checked = 0
    shot = page_screenshot(driver)
    scroll = driver.execute_script("return window.scrollY")
    for image in images:
        rect = driver.execute_script("const r = arguments[0].getBoundingClientRect(); "
                                     "return [r.left, r.top, r.width, r.height]", image)
        x, y, w, h = (int(round(v)) for v in rect)
        if y < 0 or y + h > shot.shape[0]:
            continue
        source = urllib.parse.urlparse(image.get_attribute("src")).path.split("/", 2)[2]
        png = cv2.cvtColor(cv2.imread(str(AnimalLayout(root, ANIMAL).www / source)), cv2.COLOR_BGR2GRAY)
        crop = cv2.cvtColor(shot[y:y + h, x:x + w], cv2.COLOR_RGB2GRAY).astype(np.float32)
        expected = cv2.resize(png, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
        assert crop.std() > 5, f"blank where {source} should be (scroll {scroll})"
        assert np.corrcoef(crop.ravel(), expected.ravel())[0, 1] > 0.9, source
        checked += 1
    assert checked >= 3


# ----------------------------------------------------------------------------------------- serving
@pytest.mark.parametrize("kind", [pytest.param("apache", marks=pytest.mark.apache), "fallback"])
def test_no_listing_and_no_private_folder_with_the_pages_in_place(site, kind):
    root, _, _ = site
    if kind == "apache":
        require_apache()
    private = ["/slidepipe.db", f"/{ANIMAL}/preps/masks/CH1/thumbnail_colored/{ANIMAL}_slide01_S1.tif", f"/{ANIMAL}/czi/",
               f"/{ANIMAL}/../slidepipe.db", f"/{ANIMAL}/%2e%2e/czi/", "/.www/index.html", "/.www/",
               f"/{ANIMAL}/qc/", f"/{ANIMAL}/qc/mask/", f"/{ANIMAL}/neuroglancer_data/", f"/{ANIMAL}/scene/"]
    with create_server(kind, root) as server:
        for path in private:
            conn = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            conn.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
            reply = b""
            while chunk := conn.recv(65536):
                reply += chunk
            conn.close()
            status = int(reply.split(b" ", 2)[1])
            assert status in (400, 403, 404), (path, status)
            assert b"Index of" not in reply and b"SQLite format" not in reply and b".png" not in reply, path
        assert get(f"{server.url}/") == 200 and get(f"{server.url}/{ANIMAL}/") == 200
