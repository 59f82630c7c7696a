"""`create_pipeline serve --background | --status | --stop` through the real CLI in subprocesses,
with Apache and with the built-in fallback server.

What is shown: the command returns (its output pipe closes) while the server keeps answering,
in its own session, recorded in <data_root>/.serve/server.json, with the links printed; killing
the "terminal" (the shell session that ran it) does not stop it; a second --background reuses
it; --stop ends it and frees the port; a port held by another program is a clear error naming
the port; a stale state file is cleaned up; --stop also ends a foreground `serve`; without a
usable Apache, `auto` serves with the fallback and says what to install.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import psutil
import pytest

from apache.background import read_record, start_background, state_file, stop_server, wait_until
from apache.launcher import ApacheError, free_port
from tests.helpers_browser import require_apache, servable_dir
from tests.test_apache import ANIMAL, _populate, chunk_path, request
from tests.test_fallback_server import _no_apache

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parent.parent
SERVERS = [pytest.param("apache", marks=pytest.mark.apache), "fallback"]
BANNER = re.compile(r"serving (\S+) at (http://127\.0\.0\.1:(\d+))/<animal>/ \((in the background|in the foreground "
                    r"of another command), pid (\d+)\)")


@pytest.fixture
def root():
    """A fresh data root with a published layer; whatever server a test left is stopped."""
    with servable_dir() as served:
        for data in _populate(served / "data"):
            try:
                yield data
            finally:
                stop_server(data)


def serve(root: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`create_pipeline serve` with its output on pipes: run() returns only once every holder of
    the pipes closed them, so a server that kept them would make it time out."""
    return subprocess.run([sys.executable, "-m", "pipeline", "serve", "--data-root", str(root), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def banner(output: str) -> tuple[str, int, int]:
    """(server URL, port, pid) from the 'serving ... at URL/<animal>/ (..., pid N)' line."""
    match = BANNER.search(output)
    assert match, output
    return match.group(2), int(match.group(3)), int(match.group(5))


def port_closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("kind", SERVERS)
def test_background_start_status_reuse_stop(root, kind):
    if kind == "apache":
        require_apache()
    started = serve(root, "--background", "--port", "0", "--server", kind, "--animal", ANIMAL)
    assert started.returncode == 0, started.stdout + started.stderr
    url, port, pid = banner(started.stdout)
    # the links, pointing at this server, printed and stored
    offline = re.search(r"^  offline: (\S+)$", started.stdout, re.M).group(1)
    public = re.search(r"^  public:  (\S+)$", started.stdout, re.M).group(1)
    assert offline.startswith(f"{url}/v/slidepipe/#!") and public.startswith("https://neuroglancer-demo.appspot.com/#!")
    state = json.loads(urllib.parse.unquote(offline.split("#!", 1)[1]))
    assert state["layers"][0]["source"] == f"precomputed://{url}/{ANIMAL}/neuroglancer_data/C1"
    assert json.loads((root / ANIMAL / "www/neuroglancer/links.json").read_text())["offline"] == offline
    assert f"create_pipeline serve --stop --data-root {root}" in started.stdout
    if kind == "fallback":
        assert "FALLBACK" in started.stdout and "apt-get install apache2" in started.stdout
    # recorded, detached (own session), and serving while the command that started it is gone
    record = read_record(root)
    assert (record.pid, record.port, record.url, record.server, record.mode) == (pid, port, url, kind, "background")
    assert os.getsid(pid) == pid and psutil.Process(pid).ppid() != os.getpid()
    chunk = request(port, "GET", chunk_path(0, 64, 0, 64, 0, 1))
    assert chunk.status == 200 and chunk.getheader("Content-Encoding") == "gzip"
    assert request(port, "GET", "/v/slidepipe/").status == 200

    status = serve(root, "--status")
    assert status.returncode == 0 and "running: " in status.stdout and url in status.stdout, status.stdout

    other_port = free_port()
    again = serve(root, "--background", "--port", str(other_port), "--animal", ANIMAL)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "reusing it" in again.stdout and f"not {other_port}" in again.stdout
    assert banner(again.stdout) == (url, port, pid) and "  offline: " in again.stdout
    assert port_closed(other_port)

    stopped = serve(root, "--stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stdout + stopped.stderr
    assert not state_file(root).exists()
    assert wait_until(lambda: gone(pid)) and port_closed(port)
    after = serve(root, "--status")
    assert after.returncode == 1 and "no server runs" in after.stdout
    assert serve(root, "--stop").returncode == 0


@pytest.mark.parametrize("kind", SERVERS)
def test_server_survives_the_terminal_that_started_it(root, kind):
    """A shell in its own session stands for a terminal: it starts the server, then the whole
    session gets SIGHUP and SIGKILL (the terminal closes). The server keeps answering; --stop
    then stops it and frees the port."""
    if kind == "apache":
        require_apache()
    command = (f"{sys.executable} -m pipeline serve --background --port 0 --server {kind} --data-root {root}; "
               "echo started; exec sleep 300")
    terminal = subprocess.Popen(["bash", "-c", command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=REPO, start_new_session=True)
    lines = []
    for line in terminal.stdout:
        lines.append(line)
        if line.strip() == "started":
            break
    url, port, pid = banner("".join(lines))
    os.killpg(terminal.pid, signal.SIGHUP)
    os.killpg(terminal.pid, signal.SIGKILL)
    terminal.wait(timeout=10)
    terminal.stdout.close()
    time.sleep(1)
    assert not gone(pid), "the server died with the terminal"
    assert request(port, "GET", f"/{ANIMAL}/neuroglancer_data/C1/info").status == 200
    assert serve(root, "--status").returncode == 0
    assert serve(root, "--stop").returncode == 0
    assert wait_until(lambda: gone(pid)) and port_closed(port)


@pytest.mark.parametrize("kind", SERVERS)
def test_port_in_use_by_another_program_is_named(root, kind):
    if kind == "apache":
        require_apache()
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        result = serve(root, "--background", "--port", str(port), "--server", kind)
        assert result.returncode == 1
        assert f"port {port} on 127.0.0.1 is in use by another program" in result.stderr, result.stderr
        assert "--port" in result.stderr
        foreground = serve(root, "--port", str(port), "--server", kind)
        assert foreground.returncode == 1 and f"port {port} on 127.0.0.1 is in use" in foreground.stderr
    assert not state_file(root).exists()


def test_stale_state_file_is_cleaned_and_replaced(root):
    ended = subprocess.Popen(["true"])
    ended.wait()
    state_file(root).parent.mkdir(exist_ok=True)
    state_file(root).write_text(json.dumps({
        "pid": ended.pid, "started": 1.0, "server": "fallback", "host": "127.0.0.1", "port": 9,
        "url": "http://127.0.0.1:9", "data_root": str(root), "mode": "background", "log": None}))
    status = serve(root, "--status")
    assert status.returncode == 1 and "no server runs" in status.stdout
    assert not state_file(root).exists()
    state_file(root).write_text("{not json")
    started = serve(root, "--background", "--port", "0", "--server", "fallback")
    assert started.returncode == 0, started.stdout + started.stderr
    assert read_record(root).pid == banner(started.stdout)[2]


def test_two_background_starts_at_once_make_one_server(root):
    commands = [subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--data-root", str(root), "--background",
                                  "--port", "0", "--server", "fallback"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO) for _ in range(2)]
    outputs = [command.communicate(timeout=120) for command in commands]
    assert [c.returncode for c in commands] == [0, 0], outputs
    assert banner(outputs[0][0]) == banner(outputs[1][0])
    assert sum("reusing it" in out for out, _ in outputs) == 1


def test_stop_ends_a_foreground_serve_and_background_reuses_it(root):
    foreground = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--data-root", str(root), "--port", "0",
                                   "--server", "fallback", "--animal", ANIMAL],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        lines = []
        for line in foreground.stdout:
            lines.append(line)
            if line.strip().startswith("public:"):
                break
        port = int(re.search(r"at http://127\.0\.0\.1:(\d+)/<animal>/", "".join(lines)).group(1))
        assert read_record(root).mode == "foreground" and read_record(root).pid == foreground.pid
        reused = serve(root, "--background")
        assert reused.returncode == 0 and "reusing it" in reused.stdout
        assert banner(reused.stdout)[1:] == (port, foreground.pid)
        assert "in the foreground of another command" in reused.stdout
        assert serve(root, "--stop").returncode == 0
        rest = foreground.communicate(timeout=30)[0]
    finally:
        if foreground.poll() is None:
            foreground.kill()
            foreground.wait()
    assert foreground.returncode == 0 and "stopping the built-in fallback server" in rest
    assert port_closed(port) and not state_file(root).exists()


def test_without_apache_auto_serves_with_the_fallback_and_says_what_to_install(root, monkeypatch, capsys):
    """In-process, so that Apache can be made to look absent (find_apache raises as on a machine
    without apache2); the server itself still runs in its own detached process."""
    _no_apache(monkeypatch)
    with pytest.raises(ApacheError, match=r"apt-get install apache2"):
        start_background(root, 0, "apache")
    assert start_background(root, 0, "auto", animal=ANIMAL) == 0
    out = capsys.readouterr().out
    assert "Apache cannot serve here: Apache httpd not found" in out
    assert "using the built-in FALLBACK server" in out and "apt-get install apache2" in out
    url, port, pid = banner(out)
    assert read_record(root).server == "fallback"
    assert request(port, "GET", chunk_path(0, 64, 0, 64, 0, 1)).getheader("Content-Encoding") == "gzip"
    assert f"  offline: {url}/v/slidepipe/#!" in out
    assert stop_server(root) == 0
    assert wait_until(lambda: gone(pid)) and port_closed(port)
