"""The stage runner's command line: `create_pipeline --animal ID --task STAGE`.

Also `create_pipeline sample|serve|worker|tiff2omezarr ...` for the helper commands. Runnable as
the console script, as `python -m pipeline`, or as this file directly.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import logging
import os
import shlex
import signal
import sys
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import Settings  # noqa: E402
from pipeline.errors import ConfigError, SlidepipeError, UsageError  # noqa: E402
from pipeline.layout import check_animal_id, resolution_name  # noqa: E402

STAGES = ["extract", "mask", "clean", "histogram", "align", "create_metrics", "neuroglancer", "omezarr", "web"]
TASKS = STAGES + ["status", "all"]
SUBCOMMANDS = ("sample", "serve", "worker", "tiff2omezarr", "how")

EXIT_TASK_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_BUSY = 4  # another live runner holds the stage (db.locks): try again later

log = logging.getLogger("slidepipe")


def _bool(text: str) -> bool:
    from pipeline.stages.common import _bool as parse

    return parse(text)


def stage_module(name: str):
    """The module of a stage, or None while that stage is not built in this version."""
    if importlib.util.find_spec(f"pipeline.stages.{name}") is None:
        return None
    return importlib.import_module(f"pipeline.stages.{name}")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (flags > SLIDEPIPE_* environment > --config TOML > defaults)")
    group.add_argument("--data-root", type=Path, default=None, help="where animals' files live (default ./data)")
    group.add_argument("--db-url", default=None, help="SQLAlchemy URL (default sqlite:///<data-root>/slidepipe.db; "
                                                      "MySQL: mysql+pymysql://user:pw@host/db)")
    group.add_argument("--workers", type=int, default=None, help="parallel worker processes (default: all cores)")
    group.add_argument("--queue", dest="queue_url", default=None, help="task queue URL (fq://PATH or sqs://NAME)")
    group.add_argument("--config", type=Path, default=None, help="TOML settings file")
    group.add_argument("--debug", action="store_true", default=None, help="run tasks inline and show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    from pipeline.stages.common import add_scan_run_arguments

    parser = argparse.ArgumentParser(
        prog="create_pipeline",
        description="Run one slidepipe stage for an animal. Without --task, print the animal's status.",
        epilog="Other commands: create_pipeline sample|serve|worker|tiff2omezarr --help",
    )
    parser.add_argument("--animal", required=True, help="animal (prep) id, e.g. DK39")
    parser.add_argument("--task", default=None, help=f"one of: {', '.join(TASKS)}")
    parser.add_argument("--channel", type=int, default=1, help="channel number (1-based)")
    parser.add_argument("--downsample", type=_bool, default=True, metavar="true|false",
                        help="true: thumbnails (1/32); false: full resolution")
    add_common_arguments(parser)
    add_scan_run_arguments(parser)
    stage_group = parser.add_argument_group("stage options")
    seen: set[str] = set()
    for name in STAGES:
        module = stage_module(name)
        if module is not None and hasattr(module, "add_arguments"):
            module.add_arguments(_DedupGroup(stage_group, seen))
    return parser


class _DedupGroup:
    """Lets two stages declare the same flag (e.g. --section) without argparse conflicts."""

    def __init__(self, group, seen: set[str]):
        self._group = group
        self._seen = seen

    def add_argument(self, *names, **kwargs):
        if any(n in self._seen for n in names):
            return None
        self._seen.update(names)
        return self._group.add_argument(*names, **kwargs)

    def __getattr__(self, item):
        return getattr(self._group, item)


def settings_from(args: argparse.Namespace) -> Settings:
    flags = {name: getattr(args, name, None)
             for name in ("data_root", "db_url", "workers", "queue_url", "debug", "cors_origins")}
    return Settings.load(flags, config_file=getattr(args, "config", None))


def setup_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    for noisy in ("alembic", "sqlalchemy", "urllib3", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # tifffile logs what it meets in a damaged file at ERROR level, then our reader raises a
    # SlidepipeError naming the file and page: without this each problem would print 2-3 times.
    logging.getLogger("tifffile").setLevel(logging.DEBUG if debug else logging.CRITICAL)
    # When the database goes away mid-run, the pool logs a traceback for every connection it fails
    # to reset on return, after (or before) the OperationalError we report as one line.
    logging.getLogger("sqlalchemy.pool").setLevel(logging.DEBUG if debug else logging.CRITICAL)


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 done, 1 a task or file failed, 2 usage error, 3 settings or database unusable,
    4 another runner holds the stage; every error is one line on stderr (tracebacks only with --debug)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            setup_logging("--debug" in argv)
            return _subcommand(argv[0], argv[1:])
        return _stages(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:  # also DatabaseError: the database failed under the command
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def open_database(settings: Settings):
    """`init_db` of the settings' database. Only the default SQLite file may get its directory
    (the data root) created: a mistyped --db-url must not create directories anywhere."""
    from db.session import init_db

    return init_db(settings.database_url, create_dir=not settings.db_url)


def _stages(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(bool(args.debug))
    check_animal_id(args.animal)
    if args.task is not None and args.task not in TASKS:
        print(f"error: unknown task {args.task!r}; tasks are: {', '.join(TASKS)}", file=sys.stderr)
        return EXIT_USAGE
    from db.session import database_errors

    settings = settings_from(args)
    engine = open_database(settings)
    with database_errors(settings.database_url), sigterm_unwinds():
        return _run_task(engine, settings, args)


class Terminated(KeyboardInterrupt):
    """SIGTERM while stages run (scancel, kill, docker stop)."""

    def __init__(self) -> None:
        super().__init__("terminated (SIGTERM)")


@contextlib.contextmanager
def sigterm_unwinds():
    """SIGTERM ends a stage like Ctrl-C: the run is recorded as failed and its lock released at
    once (not after the lease, which another machine would have to wait for); then the process
    dies by the signal, as its sender expects. Forked pool workers keep dying outright."""
    owner = os.getpid()

    def handler(signum, _frame):
        if os.getpid() != owner:
            _die_by(signum)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except Terminated:
        _die_by(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _die_by(signum: int) -> None:
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)


def _run_task(engine, settings: Settings, args) -> int:
    _apply_scan_run_flags(engine, args)
    if args.task in (None, "status"):
        from pipeline.stages.status import StageInfo, print_status

        chain = [StageInfo.of(module) for module in map(stage_module, STAGES) if module is not None]
        print_status(engine, settings, args.animal, chain)
        return 0
    names = STAGES if args.task == "all" else [args.task]
    code = 0
    for name in names:
        module = stage_module(name)
        if module is None:
            message = f"task {name!r} is not built in this version of slidepipe yet"
            if args.task == "all":
                log.warning("%s: skipped", message)
                continue
            print(f"error: {message}", file=sys.stderr)
            return EXIT_USAGE
        channels = _channels_for(engine, args, module) if args.task == "all" else [args.channel]
        for channel in channels:
            code = max(code, run_stage(module, engine, settings, args, channel))
        # Pages link what was published: refresh them only when the stage published ('all' ends with web
        # anyway). After a failure the stage's own run stays the last one recorded, so `status` shows it.
        if getattr(module, "REFRESH_PAGES", False) and args.task != "all" and code == 0:
            # Another channel's publish may be refreshing them right now: wait for it, then refresh again.
            code = run_stage(stage_module("web"), engine, settings, args, 1, wait_for_lock=settings.lock_lease_seconds)
        if code and args.task == "all":
            print(f"stopping 'all' after {name} failed", file=sys.stderr)
            break
    return code


def _channels_for(engine, args, module) -> list[int]:
    if not getattr(module, "PER_CHANNEL", False):
        return [1]
    from db.session import session_scope
    from pipeline.stages.common import active_scan_run

    with session_scope(engine) as session:
        run = active_scan_run(session, args.animal)
        count = (run.channels_per_scene if run else 1) or 1
    return list(range(1, count + 1))


def _apply_scan_run_flags(engine, args) -> None:
    from db.session import session_scope
    from pipeline.stages.common import SCAN_RUN_FLAGS, ensure_scan_run

    fields = {name: getattr(args, name) for name in SCAN_RUN_FLAGS if getattr(args, name, None) is not None}
    if not fields and args.task in (None, "status"):
        return
    with session_scope(engine) as session:
        ensure_scan_run(session, args.animal, fields=fields)


def run_stage(module, engine, settings: Settings, args, channel: int, wait_for_lock: float = 0) -> int:
    """Run one stage for one channel under its lock (`db.locks`): refused with EXIT_BUSY while
    another live runner holds it, released however the run ends."""
    from pipeline.errors import StageBusy
    from pipeline.runner import StageLease, lock_key

    resolution = resolution_name(args.downsample)
    key = lock_key(module, args.animal, channel, resolution)
    try:
        with StageLease(engine, key, settings.lock_lease_seconds, wait_seconds=wait_for_lock) as lease:
            return _run_locked(module, engine, settings, args, channel, resolution, lease)
    except StageBusy as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BUSY


def _run_locked(module, engine, settings: Settings, args, channel: int, resolution: str, lease) -> int:
    from pipeline.runner import StageContext, finish_run, start_run

    name = module.NAME
    own = {k: v for k, v in vars(args).items() if k not in {"animal", "task", "config", "db_url", "data_root", "workers", "queue_url", "debug"}}
    own["channel"] = channel
    params = {"channel": channel, "downsample": args.downsample, **{k: v for k, v in own.items() if v is not None}}
    command = "create_pipeline " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    run_id = start_run(engine, animal=args.animal, stage=name, channel=channel, resolution=resolution, params=params, command=command)
    lease.attach(run_id)
    ctx = StageContext(settings=settings, engine=engine, animal=args.animal, stage=name, version=module.VERSION,
                       channel=channel, downsample=args.downsample, params=params, args=args, run_id=run_id, lease=lease)
    ctx.remove_ended_batches()
    extra = None
    try:
        module.run(ctx)
    except SlidepipeError as exc:
        extra = str(exc)
    except KeyboardInterrupt as exc:
        extra = str(exc) or "interrupted"
        finish_run(engine, run_id, ctx.failures, extra, ctx.summary)
        raise
    except Exception as exc:
        from db.session import DATABASE_FAILURES, database_error

        if isinstance(exc, DATABASE_FAILURES):
            # The database itself failed (full, locked, gone): record the run as failed if it
            # still takes a write (else the next run marks it); main prints the one line.
            with contextlib.suppress(*DATABASE_FAILURES):
                finish_run(engine, run_id, ctx.failures, str(database_error(settings.database_url, exc)))
            raise
        extra = f"{type(exc).__name__}: {exc}"
        if settings.debug:
            traceback.print_exc()
    finish_run(engine, run_id, ctx.failures, extra, ctx.summary)
    c = ctx.counts
    # Each task failure was printed once, as it happened (TaskFailure.report); the summary counts them.
    summary = (f"{name} (channel {channel}, {resolution}): {c['tasks_run']} run, {c['tasks_skipped']} already done, "
               f"{c['tasks_failed']} failed [pipeline_run {run_id}]")
    print(summary, file=sys.stderr)
    for note in ctx.notes:
        print(f"  {note}", file=sys.stderr)
    if extra:
        print(f"error: {extra}", file=sys.stderr)
    return EXIT_TASK_FAILED if (extra or ctx.failures) else 0


# ---------------------------------------------------------------------------------------
def _subcommand(name: str, argv: list[str]) -> int:
    try:
        if name == "sample":
            return _sample(argv)
        if name == "serve":
            return _serve(argv)
        if name == "worker":
            return _worker(argv)
        if name == "how":
            return _how(argv)
        if name == "tiff2omezarr":
            from pipeline.publish.omezarr import main as omezarr_main

            return omezarr_main(argv) or 0
    except (UsageError, ConfigError):
        raise  # main: exit status 2 / 3
    except SlidepipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_TASK_FAILED
    return EXIT_USAGE


def _sample(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="create_pipeline sample", description="Write the built-in sample brain as CZI slides.")
    parser.add_argument("--animal", default="DEMO")
    parser.add_argument("--seed", type=int, default=0)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--large", action="store_true", help="a bigger brain (slower)")
    size.add_argument("--hard", action="store_true",
                      help="the alignment test: rotations up to +-45 degrees, mirrored, torn and broken sections, "
                           "24 sections (neighbours differ more)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    check_animal_id(args.animal)
    settings = settings_from(args)
    from pipeline.sample import build_sample

    truth = build_sample(settings.data_root, animal=args.animal, seed=args.seed,
                         size="large" if args.large else "hard" if args.hard else "small")
    print(f"sample brain {args.animal}: {truth}")
    return 0


def _how(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="create_pipeline how",
                                     description="How was this file made? (provenance from the database, as JSON)")
    parser.add_argument("path", help="a file (absolute, or relative to the data root), e.g. a chunk of a published layer")
    parser.add_argument("--lineage", action="store_true", help="every input, recursively, back to the raw slides")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    import json

    from db.queries import how_was_made, lineage
    from db.session import database_errors, session_scope

    settings = settings_from(args)
    path = _data_relative(Path(args.path), settings.data_root)
    engine = open_database(settings)
    with database_errors(settings.database_url), session_scope(engine) as session:
        answer = (lineage if args.lineage else how_was_made)(session, path, data_root=settings.data_root.absolute())
    print(json.dumps(answer, indent=2, default=str))
    return 0


def _data_relative(path: Path, data_root: Path) -> str:
    """A path as typed (absolute, relative to here, or relative to the data root; it need not
    exist: a chunk is asked for by the name Neuroglancer uses, without .gz) -> file_log form.

    A path under the data root must be in an animal's directory (a valid id first); an absolute
    path elsewhere is allowed (extract records a TIFF folder outside the data root that way), a
    relative one that climbs out (`../x`) is a usage error.
    """
    root = data_root.absolute()
    for candidate in (Path(os.path.normpath(path.absolute())), Path(os.path.normpath(root / path))):
        try:
            relative = candidate.relative_to(root).as_posix()
        except ValueError:
            continue
        if relative == ".":
            raise UsageError("this is the data root itself: give a file under it, e.g. DK39/preps/tif/...", path)
        check_animal_id(relative.split("/", 1)[0])
        return relative
    if not path.is_absolute():
        raise UsageError(f"outside the data root {root}: give a path under it, e.g. DK39/preps/tif/...", path)
    return Path(os.path.normpath(path)).as_posix()


def _serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="create_pipeline serve",
        description="Serve published volumes (Apache httpd, or a built-in fallback server without it) and print "
                    "Neuroglancer links. Without --background it runs until Ctrl-C.")
    parser.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default 8080; 0: any free port)")
    parser.add_argument("--animal", default=None,
                        help="print Neuroglancer links for this animal (default: every animal with published volumes)")
    parser.add_argument("--server", choices=("auto", "apache", "fallback"), default="auto",
                        help="auto (default): Apache when it is installed and can read the data, else the built-in "
                             "fallback server (Python standard library)")
    parser.add_argument("--cors-origins", default=None, metavar="ORIGINS",
                        help="web pages (origins, e.g. https://viewer.example.org) besides loopback pages and the public "
                             "Neuroglancer that may read the data, separated by commas; '*': every origin, for a public "
                             "deployment (setting cors_origins, SLIDEPIPE_CORS_ORIGINS)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--background", action="store_true",
                      help="start detached (survives this shell), print the links and return; a server already "
                           "running for this data root is reused")
    mode.add_argument("--stop", action="store_true", help="stop the server of this data root")
    mode.add_argument("--status", action="store_true", help="say whether a server runs for this data root "
                                                             "(exit status 0 if it runs and answers, else 1)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.animal is not None:
        check_animal_id(args.animal)
    settings = settings_from(args)
    from apache import background

    if args.stop:
        return background.stop_server(settings.data_root)
    if args.status:
        return background.server_status(settings.data_root)
    if args.background:
        return background.start_background(settings.data_root, args.port, args.server, animal=args.animal,
                                           cors_origins=settings.cors_origins)
    return background.serve_forever(settings.data_root, args.port, animal=args.animal, db_url=settings.database_url,
                                    server=args.server, cors_origins=settings.cors_origins) or 0


def _worker(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="create_pipeline worker",
        description="Run queued tasks, every stage's and igneous's, on this machine. Needs the queue and the "
                    "shared data root as this machine sees it (it may be mounted elsewhere than on the runner's); "
                    "never the database. See docs/cluster.md.")
    add_common_arguments(parser)
    parser.add_argument("--lease-seconds", type=int, default=600,
                        help="a task this worker took is given to another worker when this worker has not renewed "
                             "its lease for this long (it renews it every quarter of it while the task runs, so a "
                             "slow task is not run twice; a killed machine stops renewing); at least 2 (default 600)")
    parser.add_argument("--stop-when-empty", action="store_true",
                        help="exit when the queue has no task left (e.g. a SLURM array job); default: wait for more")
    args = parser.parse_args(argv)
    settings = settings_from(args)
    if not settings.queue_url:
        print("error: --queue URL (or SLIDEPIPE_QUEUE_URL) is required", file=sys.stderr)
        return EXIT_USAGE
    if not settings.data_root.is_dir():
        print(f"error: {settings.data_root}: the data root is not a directory here (--data-root)", file=sys.stderr)
        return EXIT_USAGE
    from pipeline.queued import MIN_LEASE_SECONDS, run_worker, runner_tasks_done

    if args.lease_seconds < MIN_LEASE_SECONDS:
        print(f"error: --lease-seconds {args.lease_seconds}: at least {MIN_LEASE_SECONDS} (a worker renews its lease "
              "while a task runs; fq:// counts lease ends in whole seconds)", file=sys.stderr)
        return EXIT_USAGE

    print(f"worker {os.getpid()}: tasks of {settings.queue_url}, data root {settings.data_root.absolute()}",
          file=sys.stderr, flush=True)
    with sigterm_unwinds():  # scancel / kubectl delete: say what was done, then die by the signal
        try:
            run_worker(settings.queue_url, lease_seconds=args.lease_seconds, stop_when_empty=args.stop_when_empty,
                       data_root=settings.data_root)
        finally:
            print(f"worker {os.getpid()}: {runner_tasks_done()} stage task(s) run", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
