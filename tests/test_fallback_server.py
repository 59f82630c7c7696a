"""The built-in fallback server (apache.fallback) beside Apache.

Every HTTP check of tests/test_apache.py already runs against both servers (its `server` fixture),
and tests/test_browser.py draws a section through the fallback too. Here: the two servers give the
same answers request by request (status, CORS, encoding, type, range, bytes), server selection
(`auto` falls back when Apache is unusable and says what to install), conditional and edge-case
requests of the fallback, and a clean stop that closes keep-alive connections.
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse
from pathlib import Path

import pytest

from apache import launcher
from apache.fallback import FallbackServer
from apache.launcher import ApacheError, ApacheServer, CORS_HEADERS, INSTALL_HINT, neuroglancer_client_dir
from tests.helpers_browser import require_apache, servable_dir
from tests.test_apache import ANIMAL, SECRET, _populate, chunk_path, request

CHUNK = chunk_path(0, 64, 0, 64, 0, 1)
CORS_NAMES = ["Access-Control-Allow-Origin", *(name for name, _ in CORS_HEADERS)]


@pytest.fixture(scope="module")
def data_root() -> Path:
    """test_apache's data plus: an animal reached through a symlink, a file stored both plain and
    gzip, and a server state file (none of which may leak out)."""
    with servable_dir() as served:
        for root in _populate(served / "data"):
            (root / "DK2").symlink_to(root / ANIMAL, target_is_directory=True)
            www = root / ANIMAL / "www"
            (www / "both").write_bytes(b"plain")
            (www / "both.gz").write_bytes(b"not this")
            (root / ".serve").mkdir()
            (root / ".serve" / "server.json").write_text(json.dumps({"secret": SECRET}))
            yield root


def _main_script() -> str:
    html = (neuroglancer_client_dir() / "index.html").read_text()
    return next(part.split('"')[0] for part in html.split('src="')[1:] if part.startswith("main."))


def _requests() -> list[tuple[str, str, dict]]:
    gets = ["/", "/index.html", f"/{ANIMAL}", f"/{ANIMAL}/", f"/{ANIMAL}/neuroglancer_data/",
            f"/{ANIMAL}/neuroglancer_data/C1/info", f"/{ANIMAL}//neuroglancer_data/C1/info",
            f"/{ANIMAL}/./neuroglancer_data/C1/info", f"/{ANIMAL}/neuroglancer_data/C1/info?x=1",
            CHUNK, CHUNK + ".gz", chunk_path(0, 64, 0, 64, 7, 8), f"/{ANIMAL}/neuroglancer_data/C1/provenance",
            f"/{ANIMAL}/omezarr/C1.ome.zarr/zarr.json", f"/{ANIMAL}/omezarr/C1.ome.zarr/0/.zarray",
            f"/{ANIMAL}/raw.bin", f"/{ANIMAL}/both", f"/{ANIMAL}/link-out.txt", f"/{ANIMAL}/dir-out/secret.txt",
            "/DK2/neuroglancer_data/C1/info", f"/{ANIMAL}/preps/secret.txt", f"/{ANIMAL}/..%2f..%2fpreps%2fsecret.txt",
            f"/{ANIMAL}/%00", f"/{ANIMAL}/a%zz", "/../outside.txt", "/NOANIMAL/x", "/.serve/server.json",
            "/v", "/v/", "/v/x", "/v/x/", "/v/x/index.html", "/v/x/slidepipe-offline.js", "/v/x/nope.js", "/v/x/a/b",
            f"/v/other/{_main_script()}", "/v/x/../../outside.txt"]
    checks = [("GET", path, {"Origin": "https://neuroglancer-demo.appspot.com"}) for path in gets]
    checks += [("GET", path, {"Origin": origin}) for origin in ("https://elsewhere.example.com", "http://localhost:9000")
               for path in (f"/{ANIMAL}/neuroglancer_data/C1/info", chunk_path(0, 64, 0, 64, 7, 8), "/v/x/")]
    checks += [("HEAD", f"/{ANIMAL}/raw.bin", {}), ("HEAD", CHUNK, {}),
               ("OPTIONS", CHUNK, {"Origin": "https://x.test", "Access-Control-Request-Method": "GET",
                                   "Access-Control-Request-Headers": "range"}),
               ("OPTIONS", CHUNK, {"Origin": "https://neuroglancer-demo.appspot.com", "Access-Control-Request-Method": "GET",
                                   "Access-Control-Request-Headers": "range", "Access-Control-Request-Private-Network": "true"}),
               ("OPTIONS", "/nowhere", {})]
    checks += [("GET", f"/{ANIMAL}/raw.bin", {"Range": r}) for r in ("bytes=100-299", "bytes=1000-2000", "bytes=-10",
                                                                        "bytes=0-0", "junk")]
    checks += [("GET", CHUNK, {"Range": "bytes=5-20"}), ("GET", f"/{ANIMAL}/raw.bin", {"If-None-Match": '"other"'})]
    checks += [(method, f"/{ANIMAL}/neuroglancer_data/C1/info", {}) for method in ("PUT", "DELETE", "POST", "TRACE")]
    return checks


def _summary(response: http.client.HTTPResponse) -> dict:
    """What Neuroglancer (and a browser's CORS check) sees of an answer."""
    status = response.status
    seen = {"status": status, **{name: response.getheader(name) for name in CORS_NAMES},
            "Content-Encoding": response.getheader("Content-Encoding"), "Vary": response.getheader("Vary")}
    if status in (200, 206):
        seen.update({"Content-Type": response.getheader("Content-Type"), "body": response.body,
                     "Content-Range": response.getheader("Content-Range"),
                     "Cache-Control": response.getheader("Cache-Control")})
    if status == 301:
        seen["Location"] = urllib.parse.urlsplit(response.getheader("Location")).path
    return seen


@pytest.mark.apache
def test_answers_like_apache_request_by_request(data_root):
    """Same status, CORS headers, encoding, type, range and bytes as slidepipe's Apache config for
    every request above (paths with `..` excepted: Apache normalises them first and answers 404
    or 400, the fallback refuses any `..` segment with 400)."""
    require_apache()
    with ApacheServer(data_root) as apache, FallbackServer(data_root) as fallback:
        differences = []
        for method, path, headers in _requests():
            expected = _summary(request(apache, method, path, headers))
            got = _summary(request(fallback, method, path, headers))
            if ".." in path:
                assert expected["status"] in (400, 403, 404) and got["status"] in (400, 404), path
                continue
            if got != expected:
                differences.append((method, path, headers, {k: (expected.get(k), got.get(k)) for k in expected.keys() | got.keys()
                                                            if expected.get(k) != got.get(k)}))
        assert not differences, "\n".join(map(repr, differences))
        # and they did serve something: the offline page and a gzip chunk
        assert b"slidepipe-offline.js" in request(fallback, "GET", "/v/x/").body
        assert request(fallback, "GET", CHUNK).getheader("Content-Encoding") == "gzip"


def test_plain_file_wins_over_gzip_and_nothing_private_leaks(data_root):
    with FallbackServer(data_root) as server:
        assert request(server, "GET", f"/{ANIMAL}/both").body == b"plain"
        for path in ("/DK2/neuroglancer_data/C1/info", "/.serve/server.json", f"/{ANIMAL}/link-out.txt"):
            response = request(server, "GET", path)
            assert response.status in (403, 404) and SECRET.encode() not in response.body


def test_conditional_and_range_edge_cases(data_root):
    raw = bytes(range(256)) * 4
    with FallbackServer(data_root) as server:
        first = request(server, "GET", f"/{ANIMAL}/raw.bin")
        etag, modified = first.getheader("ETag"), first.getheader("Last-Modified")
        assert first.status == 200 and first.body == raw and etag and modified
        assert request(server, "GET", f"/{ANIMAL}/raw.bin", {"If-None-Match": etag}).status == 304
        assert request(server, "GET", f"/{ANIMAL}/raw.bin", {"If-Modified-Since": modified}).status == 304
        matching = request(server, "GET", f"/{ANIMAL}/raw.bin", {"Range": "bytes=0-9", "If-Range": etag})
        assert matching.status == 206 and matching.body == raw[:10]
        stale = request(server, "GET", f"/{ANIMAL}/raw.bin", {"Range": "bytes=0-9", "If-Range": '"old"'})
        assert stale.status == 200 and stale.body == raw
        beyond = request(server, "GET", f"/{ANIMAL}/raw.bin", {"Range": "bytes=2000-"})
        assert beyond.status == 416 and beyond.getheader("Content-Range") == "bytes */1024"
        several = request(server, "GET", f"/{ANIMAL}/raw.bin", {"Range": "bytes=0-1,5-6"})
        assert several.status == 200 and several.body == raw  # allowed: a server may ignore Range
        propfind = request(server, "PROPFIND", f"/{ANIMAL}/raw.bin", {"Origin": "http://127.0.0.1:9000"})
        assert propfind.status == 405 and propfind.getheader("Allow") == "GET, HEAD, OPTIONS"
        assert propfind.getheader("Access-Control-Allow-Origin") == "http://127.0.0.1:9000"


def test_keep_alive_then_stop_closes_connections_and_frees_the_port(data_root):
    server = FallbackServer(data_root)
    server.start()
    port = server.port
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for _ in range(3):  # three requests on one connection (HTTP/1.1 keep-alive)
        connection.request("GET", f"/{ANIMAL}/neuroglancer_data/C1/info")
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read())
    server.stop()
    assert not server.alive()
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        connection.request("GET", f"/{ANIMAL}/neuroglancer_data/C1/info")
        connection.getresponse().read()
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def _no_apache(monkeypatch):
    def missing():
        raise ApacheError(f"Apache httpd not found: {INSTALL_HINT}")

    monkeypatch.setattr(launcher, "find_apache", missing)


def test_auto_chooses_the_fallback_only_when_apache_cannot_serve(data_root, monkeypatch):
    assert launcher.choose_server("fallback", data_root) == ("fallback", None)
    with pytest.raises(launcher.ServeError, match="unknown server"):
        launcher.choose_server("nginx", data_root)
    try:
        launcher.check_apache(data_root)
        assert launcher.choose_server("auto", data_root) == ("apache", None)
    except ApacheError:
        pass  # no usable Apache here: covered by the monkeypatched half below
    _no_apache(monkeypatch)
    kind, reason = launcher.choose_server("auto", data_root)
    assert kind == "fallback" and "Apache httpd not found" in reason
    notice = launcher.fallback_notice(reason)
    assert "FALLBACK" in notice and "apt-get install apache2" in notice and "Apache cannot serve here" in notice
    with pytest.raises(ApacheError, match="apt-get install apache2"):
        launcher.choose_server("apache", data_root)
