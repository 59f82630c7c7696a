"""Run Apache httpd on a data root: a private instance for tests and `create_pipeline serve`, and
the configuration text for a system-wide Apache.

Neuroglancer reads precomputed layers straight from a static web server, but only if that server
sends gzip chunks with `Content-Encoding: gzip` under the names Neuroglancer asks for, and CORS
headers when the viewer comes from another origin. The site template encodes those rules once;
this module fills it in, starts `apache2 -DFOREGROUND` as a child (a daemonised Apache lingers as
a zombie here and cannot be waited for) and stops it. `create_server` / `choose_server` make
either server (this one or apache.fallback); what both share is in apache.common.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from apache.common import (  # noqa: F401  (fallback_notice, server_name: callers import them from here too)
    CORS_HEADERS, INSTALL_HINT, OFFLINE_SCRIPT_TAG, SERVER_KINDS, UNSAFE_PATH, ApacheError, CorsPolicy, LocalServer,
    ServeError, checked_dir, fallback_notice, free_port, neuroglancer_client_dir, port_in_use_message, port_is_free, server_name,
    web_static_dir,
)
from apache.fallback import FallbackServer

# Module (file stem, module struct name) every slidepipe config needs; those compiled into the
# binary (Debian: log_config, unixd) must not be loaded again.
REQUIRED_MODULES = [
    ("mpm_event", "mpm_event_module"),
    ("unixd", "unixd_module"),
    ("log_config", "log_config_module"),
    ("authz_core", "authz_core_module"),
    ("mime", "mime_module"),
    ("rewrite", "rewrite_module"),
    ("headers", "headers_module"),
    ("allowmethods", "allowmethods_module"),
    ("setenvif", "setenvif_module"),
    ("filter", "filter_module"),
    ("substitute", "substitute_module"),
]

MODULE_DIR_CANDIDATES = [
    "/usr/lib/apache2/modules",
    "/usr/lib64/httpd/modules",
    "/usr/lib/httpd/modules",
    "/usr/local/apache2/modules",
    "/usr/libexec/apache2",
    "/opt/homebrew/lib/httpd/modules",
    "/usr/local/lib/httpd/modules",
]

@dataclass(frozen=True)
class Apache:
    binary: Path
    module_dir: Path
    compiled_in: frozenset[str]


@functools.lru_cache(maxsize=1)
def find_apache() -> Apache:
    """The installed httpd binary, its module directory and its compiled-in modules."""
    binary = None
    for name in ("apache2", "httpd"):
        found = shutil.which(name) or next(
            (p for p in (f"/usr/sbin/{name}", f"/usr/local/sbin/{name}", f"/usr/local/bin/{name}") if os.access(p, os.X_OK)),
            None)
        if found:
            binary = Path(found)
            break
    if binary is None:
        raise ApacheError(f"Apache httpd not found: {INSTALL_HINT}")
    listing = subprocess.run([str(binary), "-l"], capture_output=True, text=True, env=_apache_env())
    if listing.returncode != 0:
        raise ApacheError(f"`{binary} -l` failed: {listing.stderr.strip()}", binary)
    compiled_in = frozenset(m.strip()[:-2] for m in listing.stdout.splitlines() if m.strip().endswith(".c"))
    for candidate in MODULE_DIR_CANDIDATES:
        if Path(candidate, "mod_rewrite.so").is_file():
            return Apache(binary, Path(candidate), compiled_in)
    raise ApacheError(f"no Apache module directory with mod_rewrite.so found (looked in "
                      f"{', '.join(MODULE_DIR_CANDIDATES)}): {INSTALL_HINT}", binary)


def _fill(template: str, values: dict[str, str]) -> str:
    text = template
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    left = re.findall(r"\{\{[A-Z_]+\}\}", text)
    if left:
        raise ApacheError(f"unfilled placeholders in the Apache template: {sorted(set(left))}")
    return text


def _template(name: str) -> str:
    return (resources.files("apache") / name).read_text(encoding="utf-8")


def cors_config(cors: CorsPolicy) -> str:
    """The CORS part of the site config: the headers of `CorsPolicy.headers`, as Apache sends them.
    Restricted, SetEnvIf remembers an allowed Origin and every header is sent only then."""
    if cors.allow_all:
        return "\n".join(f'    Header always set {name} "{value}"'
                         for name, value in [("Access-Control-Allow-Origin", "*"), *CORS_HEADERS])
    pattern = cors.pattern
    if '"' in pattern:
        raise ApacheError(f"CORS origin pattern cannot be quoted for Apache: {pattern}")
    lines = [f'    SetEnvIf Origin "{pattern}" SLIDEPIPE_CORS_ORIGIN=$1',
             '    Header always set Access-Control-Allow-Origin "%{SLIDEPIPE_CORS_ORIGIN}e" env=SLIDEPIPE_CORS_ORIGIN']
    lines += [f'    Header always set {name} "{value}" env=SLIDEPIPE_CORS_ORIGIN' for name, value in CORS_HEADERS]
    lines.append('    Header always merge Vary "Origin"')
    return "\n".join(lines)


def render_site_config(data_root: str | Path, client_dir: str | Path | None = None,
                       cors_origins: str | CorsPolicy | None = None) -> str:
    """The slidepipe part of the configuration: fits a system-wide Apache's <VirtualHost>.
    `cors_origins`: see CorsPolicy.from_setting (None: the default origins; "*": all)."""
    data = checked_dir(Path(data_root), "data root")
    client = checked_dir(Path(client_dir) if client_dir else neuroglancer_client_dir(), "Neuroglancer client directory")
    static = checked_dir(web_static_dir(), "slidepipe web/static directory")
    return _fill(_template("site.conf.template"), {
        "DATA_ROOT": str(data),
        "DATA_ROOT_RE": re.escape(str(data)),
        "CLIENT_DIR": str(client),
        "WEB_STATIC": str(static),
        "CORS_HEADERS": cors_config(CorsPolicy.from_setting(cors_origins)),
        "OFFLINE_SCRIPT_TAG": OFFLINE_SCRIPT_TAG.replace('"', '\\"'),
    })


def render_virtual_host(data_root: str | Path, port: int = 8080, client_dir: str | Path | None = None,
                        cors_origins: str | CorsPolicy | None = None) -> str:
    """A complete sites-available file for a system-wide Apache (see docs/serving-and-viewing.md)."""
    site = render_site_config(data_root, client_dir, cors_origins)
    indented = "\n".join(("    " + line) if line else line for line in site.splitlines())
    return f"Listen {port}\n<VirtualHost *:{port}>\n{indented}\n</VirtualHost>\n"


def render_config(data_root: str | Path, port: int, run_dir: str | Path, *, host: str = "127.0.0.1",
                  client_dir: str | Path | None = None, log_level: str = "warn", apache: Apache | None = None,
                  cors_origins: str | CorsPolicy | None = None) -> str:
    """The whole httpd.conf of a private instance whose pid file and logs live in `run_dir`."""
    apache = apache or find_apache()
    run = Path(run_dir).resolve()
    if UNSAFE_PATH.search(str(run)):
        raise ApacheError("run directory path contains a character Apache configs cannot quote", run)
    loads = module_loads(apache)
    types = 'TypesConfig "/etc/mime.types"' if Path("/etc/mime.types").is_file() else "TypesConfig /dev/null"
    return _fill(_template("httpd.conf.template"), {
        "RUN_DIR": str(run),
        "HOST": host,
        "PORT": str(int(port)),
        "USER_LINES": _user_lines(),
        "LOAD_MODULES": "\n".join(loads),
        "LOG_LEVEL": log_level,
        "TYPES_CONFIG": types,
        "SITE": render_site_config(data_root, client_dir, cors_origins),
    })


def module_loads(apache: Apache) -> list[str]:
    """LoadModule lines for the required modules not compiled in; a missing one is an error."""
    loads = []
    for stem, struct in REQUIRED_MODULES:
        if f"mod_{stem}" in apache.compiled_in or stem in apache.compiled_in:
            continue
        so = apache.module_dir / f"mod_{stem}.so"
        if not so.is_file():
            raise ApacheError(f"Apache module mod_{stem} is missing ({so}): {INSTALL_HINT}")
        loads.append(f'LoadModule {struct} "{so}"')
    return loads


def check_apache(data_root: str | Path, client_dir: str | Path | None = None) -> Apache:
    """The installed Apache if it can serve `data_root`: binary, modules, and workers that may
    read the data, the client and web/static. Raises ApacheError saying what to do otherwise."""
    apache = find_apache()
    module_loads(apache)
    for path in (Path(data_root), Path(client_dir) if client_dir else neuroglancer_client_dir(), web_static_dir()):
        blocked = unreadable_for_workers(path)
        if blocked is not None:
            raise ApacheError(f"Apache's workers (user {_run_user().pw_name}) cannot enter this directory, so they "
                              f"cannot read {path}; give it o+x (chmod o+x) or run as an ordinary user", blocked)
    return apache


def _run_user() -> pwd.struct_passwd | None:
    """Whom the workers run as. Apache refuses to serve as root, so a root launch drops to
    www-data (or nobody); an ordinary user's Apache serves as that user."""
    if os.geteuid() != 0:
        return None
    for name in ("www-data", "apache", "daemon", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise ApacheError("running as root but none of the users www-data, apache, daemon, nobody exists "
                      "for Apache's workers to run as")


def _user_lines() -> str:
    user = _run_user()
    if user is None:
        return ""
    group = grp.getgrgid(user.pw_gid).gr_name
    return f"User {user.pw_name}\nGroup {group}"


def unreadable_for_workers(path: Path) -> Path | None:
    """The first directory on the way to `path` that Apache's workers cannot enter, or None."""
    user = _run_user()
    if user is None:
        return None
    gids = {user.pw_gid} | {g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem}
    current = Path(path).resolve()
    for directory in [*reversed(current.parents), current]:
        st = directory.stat()
        if st.st_uid == user.pw_uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid in gids:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            return directory
    return None


def _die_with_parent() -> None:
    """In the child before exec: Linux sends SIGTERM to Apache if its starter dies (even by
    SIGKILL), so a crashed test or a killed `serve` leaves no server holding the port."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _apache_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APACHE_")}
    env.setdefault("LANG", "C")
    return env


class ApacheServer(LocalServer):
    """A private Apache serving `data_root` on 127.0.0.1:`port` (0: a free port) while in `with`.

    `gzip_header=False` / `cors=False` exist only for negative-control tests: without them
    Neuroglancer cannot draw the data.
    """

    kind = "apache"
    name = "Apache"

    def __init__(self, data_root: str | Path, port: int = 0, client_dir: str | Path | None = None, *,
                 host: str = "127.0.0.1", gzip_header: bool = True, cors: bool = True,
                 cors_origins: str | CorsPolicy | None = None, log_level: str = "warn", start_timeout: float = 15.0):
        self.data_root = checked_dir(Path(data_root), "data root")
        self.requested_port = int(port)
        self.client_dir = client_dir
        self.host = host
        self.gzip_header = gzip_header
        self.cors = cors
        self.cors_policy = CorsPolicy.from_setting(cors_origins)
        self.log_level = log_level
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.run_dir: Path | None = None
        self.process: subprocess.Popen | None = None

    @property
    def error_log(self) -> str:
        if self.run_dir is None:
            return ""
        path = self.run_dir / "error.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def start(self) -> None:
        apache = check_apache(self.data_root, self.client_dir)
        if self.requested_port and not port_is_free(self.host, self.requested_port):
            raise ApacheError(port_in_use_message(self.host, self.requested_port, self.name))
        attempts = 1 if self.requested_port else 3
        for attempt in range(attempts):
            port = self.requested_port or free_port(self.host)
            self.run_dir = Path(tempfile.mkdtemp(prefix="slidepipe-httpd-"))
            conf = self.run_dir / "httpd.conf"
            conf.write_text(render_config(self.data_root, port, self.run_dir, host=self.host,
                                          client_dir=self.client_dir, log_level=self.log_level, apache=apache,
                                          cors_origins=self.cors_policy))
            defines = []
            if not self.gzip_header:
                defines += ["-D", "SLIDEPIPE_NO_GZIP_HEADER"]
            if not self.cors:
                defines += ["-D", "SLIDEPIPE_NO_CORS"]
            stderr = open(self.run_dir / "stderr.log", "wb")
            try:
                self.process = subprocess.Popen([str(apache.binary), "-f", str(conf), "-DFOREGROUND", *defines],
                                                stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                                                env=_apache_env(),
                                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
            finally:
                stderr.close()
            self.port = port
            if self._wait_until_answering():
                return
            reason = self._stop_process() or ""
            log = (self.run_dir / "stderr.log").read_text(errors="replace") + self.error_log
            self._remove_run_dir()
            self.port = None
            if "Address already in use" in log and attempt + 1 < attempts:
                continue
            raise ApacheError(f"Apache did not start on {self.host}:{port}{reason}: {log.strip()[-2000:]}", conf)

    def _wait_until_answering(self) -> bool:
        """True once *our* process wrote its pid file and the port answers (an answer alone could
        come from another server already on that port)."""
        deadline = time.monotonic() + self.start_timeout
        pid_file = self.run_dir / "httpd.pid"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                ours = int(pid_file.read_text().strip()) == self.process.pid
            except (FileNotFoundError, ValueError):
                ours = False
            if not ours:
                time.sleep(0.05)
                continue
            try:
                with urllib.request.urlopen(f"{self.url}/", timeout=2) as response:
                    response.read()
                return True
            except urllib.error.HTTPError:
                return True  # it answered
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                time.sleep(0.05)
        return False

    def _stop_process(self) -> str | None:
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is not None:
            return f" (exit status {process.returncode})"
        process.send_signal(signal.SIGTERM)  # Apache: stop now (connections are closed)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        return None

    def _remove_run_dir(self) -> None:
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        self._stop_process()
        self._remove_run_dir()
        self.port = None


def choose_server(requested: str, data_root: str | Path) -> tuple[str, str | None]:
    """("apache" | "fallback", why Apache is not used or None). `auto` takes Apache when it can
    serve this data root; `apache` raises ApacheError (with what to install or fix) when not."""
    if requested not in SERVER_KINDS:
        raise ServeError(f"unknown server {requested!r}: choose one of {', '.join(SERVER_KINDS)}")
    if requested == "fallback":
        return "fallback", None
    try:
        check_apache(data_root)
    except ApacheError as exc:
        if requested == "apache":
            raise
        return "fallback", str(exc)
    return "apache", None


def create_server(kind: str, data_root: str | Path, port: int = 0, **options):
    """An ApacheServer or a FallbackServer (apache.fallback): same interface, not started."""
    if kind == "apache":
        return ApacheServer(data_root, port, **options)
    if kind == "fallback":
        return FallbackServer(data_root, port, **options)
    raise ServeError(f"unknown server {kind!r}: choose apache or fallback")
