"""The built-in fallback server: Python's standard library serving what the Apache config serves.

`create_pipeline serve` uses it when Apache httpd is not installed (or with `--server fallback`),
so a machine without apache2 still gets working Neuroglancer links. It follows the rules of
`site.conf.template` that Neuroglancer depends on: the same URL scheme, `<chunk>` answered from
`<chunk>.gz` with `Content-Encoding: gzip`, CORS (apache.common.CorsPolicy) on every response
and preflight, metadata as JSON, single byte ranges, only GET/HEAD/OPTIONS, no listings, no symlinks, nothing outside the
`www/` trees, and the offline client with the script that silences its "Disconnected" notice.
It is meant for viewing on one machine; Apache remains the server for anything more.
"""

from __future__ import annotations

import email.utils
import errno
import mimetypes
import os
import re
import socket
import socketserver
import stat
import sys
import threading
import traceback
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TextIO

from apache.common import (OFFLINE_SCRIPT, OFFLINE_SCRIPT_TAG, CorsPolicy, LocalServer, ServeError, checked_dir,
                           neuroglancer_client_dir, port_in_use_message, web_static_dir)

# What the Apache config matches: animal directory names and client file names it will map.
ANIMAL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
CLIENT_FILE = re.compile(r"[A-Za-z0-9_@-][A-Za-z0-9_@.-]*")
JSON_METADATA = re.compile(r"(info|provenance|transform\.json|\.zarray|\.zattrs|\.zgroup|\.zmetadata|zarr\.json)(\.gz)?")
CONTENT_TYPES = {".json": "application/json", ".js": "text/javascript", ".wasm": "application/wasm",
                 ".css": "text/css", ".html": "text/html", ".gz": "application/octet-stream",
                 ".shard": "application/octet-stream"}
ALLOWED_METHODS = "GET, HEAD, OPTIONS"
_SINGLE_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_REFUSED_ESCAPE = re.compile(r"%(2f|00)", re.I)   # encoded slash (AllowEncodedSlashes Off), NUL


@dataclass(frozen=True)
class Target:
    """What a request path maps to: a file to send (200), a redirect (301) or an error status."""

    status: int
    path: Path | None = None
    location: str | None = None
    gzip: bool = False           # a stored gzip file: sent with Content-Encoding: gzip
    offline_page: bool = False   # the client's index.html: the offline script goes into <head>


class Site:
    """The URL scheme of site.conf.template as a function from a request path to a Target."""

    def __init__(self, data_root: Path, client_dir: Path, static_dir: Path):
        self.data_root = data_root
        self.client_dir = client_dir
        self.static_dir = static_dir

    def resolve(self, raw_path: str) -> Target:
        path, _, query = raw_path.partition("#")[0].partition("?")
        if _BAD_ESCAPE.search(path) or not path.startswith("/"):
            return Target(400)
        if _REFUSED_ESCAPE.search(path):
            return Target(404)
        decoded = urllib.parse.unquote(path, errors="surrogateescape")
        parts = [p for p in decoded.split("/") if p not in ("", ".")]
        if ".." in parts:
            return Target(400)
        directory = decoded.endswith("/")
        if not parts:
            index = self._file(self.data_root, [".www", "index.html"])
            return index if index.status == 200 else self._file(self.static_dir, ["index.html"])
        if parts[0] == "v":
            return self._client(parts[1:], directory, query)
        if not ANIMAL_NAME.fullmatch(parts[0]):
            return Target(404)
        if len(parts) == 1:  # an animal's QC page (create_pipeline --task web), when it exists
            page = self._file(self.data_root, [parts[0], "www", "index.html"])
            if page.status != 200:
                return Target(404)
            return page if directory else Target(301, location=f"/{urllib.parse.quote(parts[0])}/")
        animal, rest = parts[0], parts[1:]
        plain = self._file(self.data_root, [animal, "www", *rest])
        if plain.status == 404:
            stored = self._file(self.data_root, [animal, "www", *rest[:-1], rest[-1] + ".gz"])
            if stored.status != 404:
                plain = stored
        if plain.status == 200 and plain.path.name.endswith(".gz"):
            return Target(200, plain.path, gzip=True)
        return plain

    def _client(self, parts: list[str], directory: bool, query: str) -> Target:
        """/v/<token>/...: any token; the client reads it from its own URL."""
        if len(parts) == 1 and not directory:
            location = "/v/" + urllib.parse.quote(parts[0], errors="surrogateescape") + "/"
            return Target(301, location=location + (f"?{query}" if query else ""))
        if len(parts) == 1:
            name = "index.html"
        elif len(parts) == 2 and not directory and CLIENT_FILE.fullmatch(parts[1]):
            name = parts[1]
        else:
            return Target(404)
        if name == OFFLINE_SCRIPT:
            return self._file(self.static_dir, [name])
        target = self._file(self.client_dir, [name])
        if target.status == 200 and name == "index.html":
            return Target(200, target.path, offline_page=True)
        return target

    @staticmethod
    def _file(base: Path, parts: list[str]) -> Target:
        """A regular file below `base` reached without any symlink (403 on one, as Apache with
        Options None), else 404: directories are never listed."""
        current = base
        for index, part in enumerate(parts):
            current = current / part
            try:
                info = os.lstat(current)
            except (OSError, ValueError):
                return Target(404)
            if stat.S_ISLNK(info.st_mode):
                return Target(403)
            if index < len(parts) - 1 and not stat.S_ISDIR(info.st_mode):
                return Target(404)
        if not stat.S_ISREG(info.st_mode):
            return Target(404)
        return Target(200, current)


def content_type(name: str) -> str | None:
    """As Apache types it: metadata as JSON, .gz and .shard as octet-stream, else by extension; None (no
    header, as Apache) for a name without a known type, e.g. an uncompressed chunk."""
    if JSON_METADATA.fullmatch(name):
        return "application/json"
    suffix = Path(name).suffix.lower()
    if suffix in CONTENT_TYPES:
        return CONTENT_TYPES[suffix]
    return mimetypes.guess_type(name, strict=False)[0]


def byte_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """(first, last) of a single `bytes=` range; None to send the whole file (no header, a
    malformed one or several ranges, which RFC 9110 lets a server ignore); "unsatisfiable"."""
    if not header:
        return None
    match = _SINGLE_RANGE.fullmatch(header.replace(" ", ""))
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if first == "":
        length = int(last)
        if length == 0 or size == 0:
            return "unsatisfiable"
        return max(size - length, 0), size - 1
    first = int(first)
    last = size - 1 if last == "" else min(int(last), size - 1)
    if first >= size:
        return "unsatisfiable"
    if last < first:
        return None
    return first, last


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"      # keep-alive: Neuroglancer fetches many small chunks
    server_version = "slidepipe-fallback"
    sys_version = ""
    timeout = 60                       # idle keep-alive connections are closed
    server: "_HTTPServer"

    def __getattr__(self, name: str):
        if name.startswith("do_"):     # every other method, known or not, is refused
            return self._method_not_allowed
        raise AttributeError(name)

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def end_headers(self) -> None:
        if self.server.cors is not None:
            for name, value in self.server.cors.headers(self.headers.get("Origin")):
                self.send_header(name, value)
        super().end_headers()

    def log_request(self, code="-", size="-") -> None:
        if self.server.log is not None:
            self.log_message('"%s" %s', self.requestline, str(code))

    def log_message(self, format: str, *args) -> None:
        if self.server.log is not None:
            self.server.log.write(f"{self.log_date_time_string()} {self.address_string()} {format % args}\n")
            self.server.log.flush()

    # --- methods ------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._serve(send_body=True)

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def do_OPTIONS(self) -> None:
        if self.server.cors is not None:  # a CORS preflight, answered for every path
            self.send_response(204)
        else:
            self.send_response(200)
            self.send_header("Allow", ALLOWED_METHODS)
            self.send_header("Content-Length", "0")
        self.end_headers()

    def _method_not_allowed(self) -> None:
        self.close_connection = True   # a request body we do not read must not become a request
        self._error(405, [("Allow", ALLOWED_METHODS)])

    # --- responses ----------------------------------------------------------------------------
    def _error(self, status: int, headers: list[tuple[str, str]] = ()) -> None:
        phrase = self.responses.get(status, ("Error",))[0]
        body = f"<!doctype html><title>{status} {phrase}</title><h1>{phrase}</h1>\n".encode()
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if status == 400:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self._write(body)

    def _write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _serve(self, send_body: bool) -> None:
        target = self.server.site.resolve(self.path)
        if target.status == 301:
            self.send_response(301)
            self.send_header("Location", target.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if target.status != 200:
            self._error(target.status)
            return
        try:
            handle = open(os.open(target.path, os.O_RDONLY | os.O_NOFOLLOW), "rb")
        except OSError as exc:
            self._error(403 if exc.errno in (errno.ELOOP, errno.EACCES) else 404)
            return
        with handle:
            if target.offline_page:
                self._send_offline_page(handle.read(), send_body)
            else:
                self._send_file(handle, target, send_body)

    def _send_offline_page(self, html: bytes, send_body: bool) -> None:
        """The client's index.html with the offline script first in <head>, as mod_substitute
        does it in the Apache config."""
        body = html.replace(b"<head>", b"<head>" + OFFLINE_SCRIPT_TAG.encode())
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self._write(body)

    def _send_file(self, handle, target: Target, send_body: bool) -> None:
        info = os.fstat(handle.fileno())
        size = info.st_size
        etag = f'"{size:x}-{info.st_mtime_ns // 1000:x}"'
        modified = email.utils.formatdate(info.st_mtime, usegmt=True)
        validators = [("ETag", etag), ("Last-Modified", modified), ("Accept-Ranges", "bytes")]
        if self._not_modified(etag, info.st_mtime):
            self.send_response(304)
            for name, value in validators:
                self.send_header(name, value)
            self.end_headers()
            return
        if_range = self.headers.get("If-Range")
        wanted = byte_range(self.headers.get("Range"), size) if if_range in (None, etag, modified) else None
        if wanted == "unsatisfiable":
            self._error(416, [("Content-Range", f"bytes */{size}")])
            return
        first, last = wanted if wanted else (0, size - 1)
        self.send_response(206 if wanted else 200)
        for name, value in validators:
            self.send_header(name, value)
        kind = content_type(target.path.name)
        if kind:
            self.send_header("Content-Type", kind)
        if target.gzip and self.server.gzip_header:
            self.send_header("Content-Encoding", "gzip")
        if wanted:
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.send_header("Content-Length", str(last - first + 1))
        self.end_headers()
        if send_body and size:
            try:
                self.connection.sendfile(handle, first, last - first + 1)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

    def _not_modified(self, etag: str, mtime: float) -> bool:
        tags = self.headers.get("If-None-Match")
        if tags is not None:
            return any(tag.strip().removeprefix("W/") in ("*", etag) for tag in tags.split(","))
        since = self.headers.get("If-Modified-Since")
        if since:
            try:
                return int(mtime) <= email.utils.parsedate_to_datetime(since).timestamp()
            except (TypeError, ValueError):
                return False
        return False


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall for seconds offline
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address) -> None:
        """A client that went away (reset, closed tab) is normal; anything else is logged."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            return
        if self.log is not None:
            self.log.write(f"error serving {client_address}: {traceback.format_exc()}")
            self.log.flush()
        else:
            super().handle_error(request, client_address)


class FallbackServer(LocalServer):
    """The fallback server on `host`:`port` (0: a free port), in a thread, while in `with`.

    Same interface as `ApacheServer` (url, port, start, stop, alive); `gzip_header=False` and
    `cors=False` are the same negative-control switches.
    """

    kind = "fallback"
    name = "the built-in fallback server"

    def __init__(self, data_root: str | Path, port: int = 0, client_dir: str | Path | None = None, *,
                 host: str = "127.0.0.1", gzip_header: bool = True, cors: bool = True,
                 cors_origins: str | CorsPolicy | None = None, log: TextIO | None = None):
        self.data_root = checked_dir(Path(data_root), "data root")
        self.requested_port = int(port)
        self.client_dir = checked_dir(Path(client_dir) if client_dir else neuroglancer_client_dir(),
                                       "Neuroglancer client directory")
        self.host = host
        self.gzip_header = gzip_header
        self.cors = cors
        self.cors_policy = CorsPolicy.from_setting(cors_origins)
        self.log = log
        self.port: int | None = None
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def error_log(self) -> str:
        return ""

    def start(self) -> None:
        try:
            httpd = _HTTPServer((self.host, self.requested_port), _Handler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServeError(port_in_use_message(self.host, self.requested_port, self.name)) from None
            raise ServeError(f"the built-in fallback server did not start on {self.host}:{self.requested_port}: {exc}") from None
        httpd.site = Site(self.data_root, self.client_dir, checked_dir(web_static_dir(), "slidepipe web/static directory"))
        httpd.gzip_header, httpd.log = self.gzip_header, self.log
        httpd.cors = self.cors_policy if self.cors else None
        httpd.lock, httpd.connections = threading.Lock(), set()
        self._httpd = httpd
        self.port = httpd.server_address[1]
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="slidepipe-fallback", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop accepting, close the listening socket and every open connection (so the port is
        free and no keep-alive thread goes on serving)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        with httpd.lock:
            for connection in list(httpd.connections):
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._thread.join(timeout=10)
        self._thread = None
        self.port = None
