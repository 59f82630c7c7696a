"""What the two servers (Apache, apache.launcher; the built-in fallback, apache.fallback) and the
`serve` commands (apache.background) share: the URL constants, the CORS headers, errors, the
client directories, ports, the server interface and the messages. It imports neither server, so
launcher -> fallback and background -> launcher are the only ways the modules depend on each other.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

from pipeline.errors import SlidepipeError

INSTALL_HINT = "install Apache httpd: `apt-get install apache2` (Debian/Ubuntu) or your system's httpd package"

OFFLINE_TOKEN = "slidepipe"
"""The `<token>` of the offline client URL /v/<token>/ (any path segment works; this is ours)."""

OFFLINE_SCRIPT = "slidepipe-offline.js"
OFFLINE_SCRIPT_TAG = f'<script src="{OFFLINE_SCRIPT}"></script>'
"""Put first in the client's <head> (see web/static/slidepipe-offline.js for why)."""

CORS_HEADERS = [
    ("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS"),
    ("Access-Control-Allow-Headers", "Range, If-None-Match, If-Modified-Since, Cache-Control, Content-Type"),
    ("Access-Control-Expose-Headers",
     "Content-Encoding, Content-Length, Content-Range, Content-Type, Accept-Ranges, ETag, Last-Modified"),
    ("Access-Control-Max-Age", "86400"),
    ("Access-Control-Allow-Private-Network", "true"),
]
"""Sent by both servers, after `Access-Control-Allow-Origin`, on every response to an origin the
CorsPolicy allows (errors included); to any other origin none of them."""

ALLOW_ALL_ORIGINS = "*"

LOOPBACK_ORIGINS = r"http://(127\.0\.0\.1|localhost|\[::1\])(:[0-9]{1,5})?"
"""Pages served from this machine: the offline client of a private server (http://127.0.0.1:PORT)
and neuroglancer.Viewer, whose Python server gives the client a loopback origin of its own."""


def public_client_origin() -> str:
    """The origin of the public Neuroglancer the printed `public:` links open."""
    import urllib.parse

    from web.state import PUBLIC_NEUROGLANCER

    parts = urllib.parse.urlsplit(PUBLIC_NEUROGLANCER)
    return f"{parts.scheme}://{parts.netloc}"


_ORIGIN = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


@dataclass(frozen=True)
class CorsPolicy:
    """Which web pages may read what a server serves: the one rule both servers apply.

    By default the origins Neuroglancer is used from: loopback pages (LOOPBACK_ORIGINS) and the
    public Neuroglancer of the printed links; `extra` adds origins (e.g. a lab's own Neuroglancer
    deployment); `allow_all` answers every origin, for a public deployment of public data. A page
    from any other origin gets no CORS header at all, so the browser keeps the data from it.
    """

    extra: tuple[str, ...] = ()
    allow_all: bool = False

    @classmethod
    def from_setting(cls, setting: "str | Sequence[str] | CorsPolicy | None") -> "CorsPolicy":
        """`None`/"": the default; "*": every origin; else origins separated by commas or spaces."""
        if isinstance(setting, CorsPolicy):
            return setting
        items = setting.replace(",", " ").split() if isinstance(setting, str) else list(setting or ())
        if ALLOW_ALL_ORIGINS in items:
            if len(items) > 1:
                raise ServeError(f"CORS origins: '*' allows every origin and cannot be combined with others: {items}")
            return cls(allow_all=True)
        bad = [o for o in items if not _ORIGIN.fullmatch(o.rstrip("/"))]
        if bad:
            raise ServeError(f"CORS origins must look like https://host[:port] (scheme, host, optional port, "
                             f"no path), or be '*' for all: {bad}")
        return cls(extra=tuple(o.rstrip("/") for o in items))

    @property
    def pattern(self) -> str:
        """An anchored regular expression of the allowed origins (Apache's SetEnvIf uses it too)."""
        if self.allow_all:
            return ".+"
        exact = [re.escape(o) for o in (public_client_origin(), *self.extra)]
        return "^(" + "|".join([LOOPBACK_ORIGINS, *exact]) + ")$"

    def allows(self, origin: str | None) -> bool:
        return bool(origin) and re.match(self.pattern, origin) is not None

    def headers(self, origin: str | None) -> list[tuple[str, str]]:
        """The CORS headers of a response to a request from `origin` (the Origin header)."""
        if self.allow_all:
            return [("Access-Control-Allow-Origin", "*"), *CORS_HEADERS]
        if not self.allows(origin):
            return [("Vary", "Origin")]
        return [("Access-Control-Allow-Origin", origin), *CORS_HEADERS, ("Vary", "Origin")]

    def describe(self) -> str:
        if self.allow_all:
            return "every origin (*)"
        return ", ".join(["loopback pages (http://127.0.0.1:*, http://localhost:*)", public_client_origin(),
                          *self.extra])


SERVER_KINDS = ("auto", "apache", "fallback")

# Characters that would break a quoted path or a rewrite substitution in httpd.conf.
UNSAFE_PATH = re.compile(r'["$%\\\n\r{}<>]')


class ServeError(SlidepipeError):
    """A server (Apache or the fallback) cannot start, or its state on the data root is unusable."""


class ApacheError(ServeError):
    """Apache is missing, cannot start, or cannot read the data."""


def neuroglancer_client_dir() -> Path:
    """The built Neuroglancer client shipped inside the installed `neuroglancer` package."""
    spec = resources.files("neuroglancer") / "static" / "client"
    path = Path(str(spec)).resolve()
    if not (path / "index.html").is_file():
        raise ApacheError("the installed `neuroglancer` package has no built client (static/client/index.html): "
                          "pip install 'neuroglancer>=2.40'", path)
    return path


def web_static_dir() -> Path:
    return Path(str(resources.files("web") / "static")).resolve()


def checked_dir(path: Path, what: str) -> Path:
    """Absolute, symlink-free (the config refuses to follow symlinks) and safe to quote."""
    resolved = Path(path).resolve()
    if not resolved.is_dir():
        raise ApacheError(f"{what} is not a directory", resolved)
    if UNSAFE_PATH.search(str(resolved)):
        raise ApacheError(f"{what} path contains a character Apache configs cannot quote ({UNSAFE_PATH.pattern})", resolved)
    return resolved


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use_message(host: str, port: int, server_name: str) -> str:
    return (f"port {port} on {host} is in use by another program: {server_name} did not start "
            f"(choose another with --port)")


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


class LocalServer:
    """What ApacheServer and the fallback server (apache.fallback) share: `with` starts and
    stops it; `url` once it runs."""

    name = "the server"
    host: str
    port: int | None

    @property
    def url(self) -> str:
        if self.port is None:
            raise ServeError(f"{self.name} is not running")
        return f"http://{self.host}:{self.port}"

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def server_name(kind: str) -> str:
    return "Apache" if kind == "apache" else "the built-in fallback server"


def fallback_notice(reason: str | None) -> str:
    """What the user reads when the fallback serves: that it is one, and how to get Apache."""
    lines = [f"slidepipe: Apache cannot serve here: {reason}"] if reason else []
    lines.append("slidepipe: using the built-in FALLBACK server (Python standard library): the same URLs and "
                 "headers as the Apache config, for viewing on this machine.")
    restart = "then restart: `create_pipeline serve --stop` and serve again (or choose it with --server apache)."
    if reason and INSTALL_HINT not in reason:  # installed, but e.g. its workers cannot read the data
        lines.append(f"slidepipe: to serve with Apache, fix the above; {restart}")
    else:
        lines.append(f"slidepipe: for the real server {INSTALL_HINT}; {restart}")
    return "\n".join(lines)


def announce(kind: str, data_root: Path, url: str, how: str, reason: str | None = None,
             cors: CorsPolicy | None = None) -> None:
    if kind == "fallback":
        print(fallback_notice(reason))
    print(f"slidepipe: {server_name(kind)} serving {data_root} at {url}/<animal>/ ({how})")
    print(f"web pages that may read it (CORS): {(cors or CorsPolicy()).describe()}")
    print(f"offline Neuroglancer client: {url}/v/{OFFLINE_TOKEN}/", flush=True)


def print_links(data_root: Path, url: str, animal: str | None = None, public_client: str | None = None) -> None:
    """Build, store (www/neuroglancer/links.json) and print both links of `animal`, or of every
    animal with published volumes; an animal without a link does not stop the others."""
    from web.state import PUBLIC_NEUROGLANCER, animals_with_published_data, write_links

    animals = [animal] if animal else animals_with_published_data(data_root)
    for name in animals:
        print(f"\n{name}:")
        try:
            links = write_links(data_root, name, url, public_client=public_client or PUBLIC_NEUROGLANCER)
        except SlidepipeError as exc:
            print(f"  no link: {exc}", flush=True)
            continue
        print(f"  offline: {links['offline']}")
        print(f"  public:  {links['public']}", flush=True)
    if not animals:
        print("no animal has published volumes yet (www/neuroglancer_data/ or www/omezarr/)", flush=True)
