"""The HTTP rules Neuroglancer depends on, checked against a real httpd started by the test with
slidepipe's Apache configuration (apache.launcher) and, with the same checks, against the built-in
fallback server (apache.fallback): the `server` fixture runs every check on both. The tests of
Apache alone (config, process, system-wide vhost) are marked `apache`.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from apache.launcher import ApacheServer, ServeError, create_server, render_config, render_virtual_host
from tests.helpers_browser import asymmetric_section, require_apache, servable_dir, write_gzip_layer

ANIMAL = "DK1"
SECRET = "not-for-the-web"
PUBLIC = "https://neuroglancer-demo.appspot.com"   # the public Neuroglancer web.state links to
ELSEWHERE = "https://elsewhere.example.com"          # any other web page
SERVERS = [pytest.param("apache", marks=pytest.mark.apache), "fallback"]
SHARD = bytes(np.random.default_rng(3).integers(0, 256, 5000, dtype=np.uint8))  # compressible it is not
SHARD_URL = f"/{ANIMAL}/neuroglancer_data/C1S/325_325_20000/0.shard"


@pytest.fixture(scope="module")
def data_root() -> Path:
    with servable_dir() as served:
        yield from _populate(served / "data")


@pytest.fixture
def apache_root(data_root) -> Path:
    """The data root, for tests of Apache alone (skipped without apache2 unless CI=true)."""
    require_apache()
    return data_root


def start_server(kind: str, data_root: Path, port: int = 0, **options):
    """An ApacheServer or FallbackServer (not yet started); Apache needs apache2."""
    if kind == "apache":
        require_apache()
    return create_server(kind, data_root, port, **options)


def _populate(root: Path):
    www = root / ANIMAL / "www"
    volume = np.stack([asymmetric_section(70, 100, seed=s) for s in range(2)])
    write_gzip_layer(www / "neuroglancer_data" / "C1", volume, chunk=(64, 64, 1))
    np.save(root / "volume.npy", volume)
    (root / ANIMAL / "preps").mkdir(parents=True)
    (root / ANIMAL / "preps" / "secret.txt").write_text(SECRET)
    (root.parent / "outside.txt").write_text(SECRET)
    (www / "link-out.txt").symlink_to(root.parent / "outside.txt")
    (www / "dir-out").symlink_to(root / ANIMAL / "preps", target_is_directory=True)
    (www / "raw.bin").write_bytes(bytes(range(256)) * 4)
    shard_dir = www / "neuroglancer_data" / "C1S" / "325_325_20000"  # a --sharded layer's file
    shard_dir.mkdir(parents=True)
    (shard_dir / "0.shard").write_bytes(SHARD)
    zarr_dir = www / "omezarr" / "C1.ome.zarr"
    (zarr_dir / "0").mkdir(parents=True)
    (zarr_dir / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    (zarr_dir / "0" / ".zarray").write_text(json.dumps({"zarr_format": 2}))
    yield root


@pytest.fixture(scope="module", params=SERVERS)
def server(request, data_root):
    with start_server(request.param, data_root) as running:
        yield running


def request(server, method: str, path: str, headers: dict | None = None) -> http.client.HTTPResponse:
    """Raw HTTP (no client-side decompression, no path normalisation) to a server or a port."""
    port = server if isinstance(server, int) else server.port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, headers=headers or {})
    response = conn.getresponse()
    response.body = response.read()
    conn.close()
    return response


def chunk_path(x0, x1, y0, y1, z0, z1, key="325_325_20000") -> str:
    return f"/{ANIMAL}/neuroglancer_data/C1/{key}/{x0}-{x1}_{y0}-{y1}_{z0}-{z1}"


def test_gzip_chunk_served_at_extensionless_url_with_content_encoding(server, data_root):
    volume = np.load(data_root / "volume.npy")
    response = request(server, "GET", chunk_path(64, 100, 0, 64, 1, 2))
    assert response.status == 200
    assert response.getheader("Content-Encoding") == "gzip"
    on_disk = (data_root / ANIMAL / "www/neuroglancer_data/C1/325_325_20000/64-100_0-64_1-2.gz").read_bytes()
    assert response.body == on_disk
    # raw encoding, x fastest: the decoded chunk is the section's sub-array in C order (y, x)
    assert gzip.decompress(response.body) == volume[1, 0:64, 64:100].tobytes()


def test_info_is_json_with_cors(server, data_root):
    response = request(server, "GET", f"/{ANIMAL}/neuroglancer_data/C1/info", {"Origin": PUBLIC})
    assert response.status == 200
    assert response.getheader("Content-Type") == "application/json"
    assert response.getheader("Content-Encoding") is None
    assert json.loads(response.body) == json.loads((data_root / ANIMAL / "www/neuroglancer_data/C1/info").read_text())
    assert response.getheader("Access-Control-Allow-Origin") == PUBLIC
    exposed = {h.strip().lower() for h in response.getheader("Access-Control-Expose-Headers").split(",")}
    assert {"content-encoding", "content-length", "content-range"} <= exposed
    provenance = request(server, "GET", f"/{ANIMAL}/neuroglancer_data/C1/provenance")
    assert provenance.status == 200 and provenance.getheader("Content-Type") == "application/json"


def test_cors_on_chunk_get_and_preflight(server):
    get = request(server, "GET", chunk_path(0, 64, 0, 64, 0, 1), {"Origin": PUBLIC})
    assert get.getheader("Access-Control-Allow-Origin") == PUBLIC
    preflight = request(server, "OPTIONS", chunk_path(0, 64, 0, 64, 0, 1), {
        "Origin": PUBLIC,
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "range",
        "Access-Control-Request-Private-Network": "true",
    })
    assert preflight.status in (200, 204)
    assert preflight.getheader("Access-Control-Allow-Origin") == PUBLIC
    assert "GET" in preflight.getheader("Access-Control-Allow-Methods")
    assert "range" in preflight.getheader("Access-Control-Allow-Headers").lower()
    assert preflight.getheader("Access-Control-Allow-Private-Network") == "true"


CORS = ("Access-Control-Allow-Origin", "Access-Control-Allow-Methods", "Access-Control-Expose-Headers",
        "Access-Control-Allow-Private-Network")


@pytest.mark.parametrize("origin", [PUBLIC, "http://127.0.0.1:8765", "http://localhost:8765"])
def test_cors_lets_the_viewer_origins_read(server, origin):
    """The public Neuroglancer of the links, and loopback pages: the offline client of a private
    server and neuroglancer.Viewer (its Python server has a loopback origin of its own)."""
    for path in (f"/{ANIMAL}/neuroglancer_data/C1/info", chunk_path(0, 64, 0, 64, 7, 8)):  # 200 and 404
        response = request(server, "GET", path, {"Origin": origin})
        assert response.getheader("Access-Control-Allow-Origin") == origin, path
        assert "origin" in response.getheader("Vary", "").lower(), "caches must keep answers per origin"


@pytest.mark.parametrize("origin", [ELSEWHERE, PUBLIC + ".example.com", "http://127.0.0.1.example.com:80", "null"])
def test_cors_refuses_any_other_web_page(server, origin):
    """A page from anywhere else gets no CORS header on any answer, so the browser does not let
    it read the data (nor, without Access-Control-Allow-Private-Network, reach the loopback
    server at all from a public page)."""
    answers = [request(server, "GET", f"/{ANIMAL}/neuroglancer_data/C1/info", {"Origin": origin}),
               request(server, "GET", chunk_path(0, 64, 0, 64, 0, 1), {"Origin": origin}),
               request(server, "GET", chunk_path(0, 64, 0, 64, 7, 8), {"Origin": origin}),
               request(server, "PUT", f"/{ANIMAL}/neuroglancer_data/C1/info", {"Origin": origin}),
               request(server, "OPTIONS", chunk_path(0, 64, 0, 64, 0, 1), {
                   "Origin": origin, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "range",
                   "Access-Control-Request-Private-Network": "true"})]
    assert [a.status for a in answers][:3] == [200, 200, 404]
    for answer in answers:
        assert [answer.getheader(name) for name in CORS] == [None] * len(CORS), answer.status


@pytest.mark.parametrize("kind", SERVERS)
def test_cors_origins_setting_adds_origins_or_allows_all(data_root, kind):
    info = f"/{ANIMAL}/neuroglancer_data/C1/info"
    lab = "https://viewer.lab.example.org"
    with start_server(kind, data_root, cors_origins=lab) as server:
        assert request(server, "GET", info, {"Origin": lab}).getheader("Access-Control-Allow-Origin") == lab
        assert request(server, "GET", info, {"Origin": PUBLIC}).getheader("Access-Control-Allow-Origin") == PUBLIC
        assert request(server, "GET", info, {"Origin": ELSEWHERE}).getheader("Access-Control-Allow-Origin") is None
    with start_server(kind, data_root, cors_origins="*") as server:  # a public deployment
        for origin in (ELSEWHERE, PUBLIC):
            response = request(server, "GET", info, {"Origin": origin})
            assert response.getheader("Access-Control-Allow-Origin") == "*"
            assert response.getheader("Access-Control-Allow-Private-Network") == "true"
    with pytest.raises(ServeError, match="origin"):
        start_server(kind, data_root, cors_origins="https://x.example.org/path")


def test_missing_chunk_is_404_with_cors(server):
    response = request(server, "GET", chunk_path(0, 64, 0, 64, 7, 8), {"Origin": PUBLIC})
    assert response.status == 404
    # Neuroglancer reads a 404 as "empty chunk" only if CORS lets it see the status
    assert response.getheader("Access-Control-Allow-Origin") == PUBLIC
    assert request(server, "GET", "/NOANIMAL/neuroglancer_data/C1/info").status == 404


@pytest.mark.parametrize("method", ["PUT", "DELETE", "POST", "PATCH", "PROPFIND", "TRACE"])
def test_only_reading_methods(server, data_root, method):
    info = data_root / ANIMAL / "www/neuroglancer_data/C1/info"
    before = info.read_bytes()
    response = request(server, method, f"/{ANIMAL}/neuroglancer_data/C1/info")
    assert response.status == 405
    assert info.read_bytes() == before
    assert request(server, "HEAD", f"/{ANIMAL}/neuroglancer_data/C1/info").status == 200


@pytest.mark.parametrize("path", [f"/{ANIMAL}/", f"/{ANIMAL}/neuroglancer_data/", f"/{ANIMAL}/neuroglancer_data/C1/",
                                  f"/{ANIMAL}/neuroglancer_data/C1/325_325_20000/", f"/{ANIMAL}", "/v/"])
def test_no_directory_listing(server, path):
    response = request(server, "GET", path)
    assert response.status in (403, 404)
    assert b"Index of" not in response.body and b"0-64_0-64" not in response.body and b".gz" not in response.body


@pytest.mark.parametrize("path", [
    f"/{ANIMAL}/../{ANIMAL}/preps/secret.txt",
    f"/{ANIMAL}/%2e%2e/preps/secret.txt",
    f"/{ANIMAL}/%2E%2E/%2e%2e/outside.txt",
    f"/{ANIMAL}/neuroglancer_data/%2e%2e/%2e%2e/%2e%2e/preps/secret.txt",
    f"/{ANIMAL}/..%2f..%2fpreps%2fsecret.txt",
    "/../outside.txt",
    "/%2e%2e/%2e%2e/outside.txt",
    f"/{ANIMAL}/preps/secret.txt",
    f"/{ANIMAL}/link-out.txt",
    f"/{ANIMAL}/dir-out/secret.txt",
    "/v/x/../../../outside.txt",
    "/v/x/%2e%2e/%2e%2e/outside.txt",
    f"/v/x/..%2f..%2f..%2f{ANIMAL}%2fpreps%2fsecret.txt",
])
def test_nothing_outside_www_reachable(server, path):
    response = request(server, "GET", path)
    assert response.status in (400, 403, 404), response.status
    assert SECRET.encode() not in response.body


def test_range_request(server, data_root):
    response = request(server, "GET", f"/{ANIMAL}/raw.bin", {"Range": "bytes=100-299"})
    assert response.status == 206
    assert response.getheader("Content-Range") == "bytes 100-299/1024"
    assert response.body == (bytes(range(256)) * 4)[100:300]
    # on a gzip chunk the range is of the stored (encoded) bytes, as HTTP defines it
    on_disk = (data_root / ANIMAL / "www/neuroglancer_data/C1/325_325_20000/0-64_0-64_0-1.gz").read_bytes()
    part = request(server, "GET", chunk_path(0, 64, 0, 64, 0, 1), {"Range": "bytes=0-9"})
    assert part.status == 206 and part.body == on_disk[:10]
    assert part.getheader("Content-Encoding") == "gzip"
    # a .shard file (sharded precomputed) is read in ranges of its own bytes, never re-encoded
    shard = request(server, "GET", SHARD_URL, {"Range": "bytes=16-4095", "Accept-Encoding": "gzip", "Origin": PUBLIC})
    assert shard.status == 206 and shard.body == SHARD[16:4096]
    assert shard.getheader("Content-Range") == f"bytes 16-4095/{len(SHARD)}"
    assert shard.getheader("Content-Encoding") is None
    assert shard.getheader("Content-Type") == "application/octet-stream"
    assert shard.getheader("Access-Control-Allow-Origin") == PUBLIC


def test_zarr_metadata_served_as_json_with_cors(server):
    for path in (f"/{ANIMAL}/omezarr/C1.ome.zarr/zarr.json", f"/{ANIMAL}/omezarr/C1.ome.zarr/0/.zarray"):
        response = request(server, "GET", path, {"Origin": PUBLIC})
        assert response.status == 200
        assert response.getheader("Content-Type") == "application/json"
        assert response.getheader("Access-Control-Allow-Origin") == PUBLIC
        json.loads(response.body)


def test_offline_client_served_with_offline_script(server):
    page = request(server, "GET", "/v/slidepipe/")
    assert page.status == 200
    html = page.body.decode()
    # the offline shim comes before the client's own (deferred) scripts
    assert html.index('<script src="slidepipe-offline.js">') < html.index("main.")
    main_js = next(part.split('"')[0] for part in html.split('src="')[1:] if part.startswith("main."))
    script = request(server, "GET", f"/v/other-token/{main_js}")
    assert script.status == 200 and script.getheader("Content-Type", "").startswith("text/javascript")
    shim = request(server, "GET", "/v/slidepipe/slidepipe-offline.js")
    assert shim.status == 200 and b"EventSource" in shim.body
    redirect = request(server, "GET", "/v/slidepipe")
    assert redirect.status == 301 and redirect.getheader("Location").endswith("/v/slidepipe/")


@pytest.mark.parametrize("kind", SERVERS)
def test_negative_control_switches(data_root, kind):
    path = chunk_path(0, 64, 0, 64, 0, 1)
    with start_server(kind, data_root, gzip_header=False) as plain:
        response = request(plain, "GET", path, {"Origin": PUBLIC})
        assert response.status == 200 and response.getheader("Content-Encoding") is None
        assert response.getheader("Access-Control-Allow-Origin") == PUBLIC
    with start_server(kind, data_root, cors=False) as no_cors:
        response = request(no_cors, "GET", path, {"Origin": PUBLIC})
        assert response.status == 200 and response.getheader("Content-Encoding") == "gzip"
        assert response.getheader("Access-Control-Allow-Origin") is None


@pytest.mark.apache
def test_server_is_a_child_and_stops_cleanly(apache_root):
    server = ApacheServer(apache_root)
    with server:
        port, run_dir, pid = server.port, server.run_dir, server.process.pid
        assert server.url == f"http://127.0.0.1:{port}"
        assert (run_dir / "httpd.conf").is_file()
        with open(f"/proc/{pid}/stat") as handle:
            assert int(handle.read().split(")")[1].split()[1]) == os.getpid()  # parent pid
    assert not run_dir.exists()
    assert not Path(f"/proc/{pid}").exists()  # waited for: no zombie left
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize("kind", SERVERS)
def test_fixed_port_in_use_is_a_clear_error(data_root, kind):
    from apache.launcher import ServeError

    with start_server(kind, data_root) as first:
        with pytest.raises(ServeError, match=f"port {first.port} on 127.0.0.1 is in use.* did not start"):
            start_server(kind, data_root, port=first.port).start()


@pytest.mark.apache
def test_system_wide_virtual_host_with_debian_default_modules(apache_root, tmp_path):
    """The docs' sites-available snippet, inside a config that also loads what Debian enables by
    default (mod_deflate compressing JSON, autoindex, dir): chunks are still gzip-encoded exactly
    once, shard files answer byte ranges of their own bytes, and directories still not listed."""
    from apache.launcher import find_apache, free_port

    data_root = apache_root
    apache = find_apache()
    port = free_port()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    base = render_config(data_root, port, run_dir, apache=apache)
    head = base.split("# slidepipe:", 1)[0].replace(f"Listen 127.0.0.1:{port}", "")
    extra = "\n".join(f'LoadModule {m}_module "{apache.module_dir}/mod_{m}.so"' for m in ("deflate", "autoindex", "dir"))
    vhost = render_virtual_host(data_root, port).replace(f"<VirtualHost *:{port}>", f"<VirtualHost 127.0.0.1:{port}>")
    debian_defaults = ("DirectoryIndex index.html\n"
                       "AddOutputFilterByType DEFLATE text/html text/plain application/json text/javascript application/octet-stream\n")
    conf = run_dir / "httpd.conf"
    conf.write_text(head + extra + "\n" + debian_defaults + vhost)
    check = subprocess.run([str(apache.binary), "-t", "-f", str(conf)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    process = subprocess.Popen([str(apache.binary), "-f", str(conf), "-DFOREGROUND"])
    try:
        for _ in range(200):
            try:
                request(port, "GET", "/")
                break
            except OSError:
                time.sleep(0.05)
        volume = np.load(data_root / "volume.npy")
        chunk = request(port, "GET", chunk_path(0, 64, 0, 64, 0, 1), {"Accept-Encoding": "gzip, deflate"})
        assert chunk.getheader("Content-Encoding") == "gzip"
        assert gzip.decompress(chunk.body) == volume[0, 0:64, 0:64].tobytes()
        shard = request(port, "GET", SHARD_URL, {"Range": "bytes=100-199", "Accept-Encoding": "gzip, deflate"})
        assert shard.status == 206 and shard.body == SHARD[100:200], "mod_deflate must leave shard ranges alone"
        assert shard.getheader("Content-Encoding") is None
        assert request(port, "GET", f"/{ANIMAL}/neuroglancer_data/").status in (403, 404)
        assert request(port, "PUT", f"/{ANIMAL}/neuroglancer_data/C1/info").status == 405
        assert SECRET.encode() not in request(port, "GET", f"/{ANIMAL}/link-out.txt").body
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.parametrize("kind", SERVERS)
def test_serve_command_prints_links_serves_and_stops_on_ctrl_c(data_root, kind):
    import signal
    import sys
    import urllib.parse

    from apache.launcher import free_port, server_name

    if kind == "apache":
        require_apache()
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--data-root", str(data_root),
                                "--port", str(port), "--animal", ANIMAL, "--server", kind],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=Path(__file__).resolve().parent.parent)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if line.strip().startswith("public:"):
                break
        text = "".join(lines)
        offline = next(line.split("offline:", 1)[1].strip() for line in lines if "offline:" in line)
        assert offline.startswith(f"http://127.0.0.1:{port}/v/slidepipe/#!"), text
        state = json.loads(urllib.parse.unquote(offline.split("#!", 1)[1]))
        source = state["layers"][0]["source"]
        assert source == f"precomputed://http://127.0.0.1:{port}/{ANIMAL}/neuroglancer_data/C1"
        info = request(port, "GET", f"/{ANIMAL}/neuroglancer_data/C1/info")
        assert info.status == 200
        assert request(port, "GET", "/v/slidepipe/").status == 200
        assert (data_root / ANIMAL / "www/neuroglancer/links.json").is_file()
    finally:
        process.send_signal(signal.SIGINT)
        rest = process.communicate(timeout=30)[0]
    assert process.returncode == 0, "".join(lines) + rest
    assert f"stopping {server_name(kind)}" in rest
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.apache
def test_apache_dies_with_a_killed_starter(apache_root):
    """A test process killed mid-run must not leave its Apache holding the port."""
    import signal
    import sys

    code = ("import sys, time; from apache.launcher import ApacheServer\n"
            "s = ApacheServer(sys.argv[1]); s.start(); print(s.port, s.run_dir, flush=True); time.sleep(60)\n")
    starter = subprocess.Popen([sys.executable, "-c", code, str(apache_root)], stdout=subprocess.PIPE, text=True,
                               cwd=Path(__file__).resolve().parent.parent)
    port, run_dir = starter.stdout.readline().split()
    port = int(port)
    assert request(port, "GET", f"/{ANIMAL}/neuroglancer_data/C1/info").status == 200
    starter.send_signal(signal.SIGKILL)
    starter.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                break
        time.sleep(0.1)
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)  # a killed starter cannot remove it
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0, "Apache outlived the process that started it"
