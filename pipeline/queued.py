"""Tasks on python-task-queue (`--queue fq://PATH` or `sqs://NAME`), for igneous and the runner.

The runner's tasks go onto the queue as one registered function, `execute_queued`, whose spec
names the task function and carries its kwargs with every path under the data root made
relative (`portable`): a worker may see the shared data root at another path. The worker runs
the task exactly as the local pool does (`run_in_worker`) and writes the outcome as a result file
under the data root (`layout.queue_result`), atomically; the waiting runner reads, records and
deletes it. So workers never open the database, and provenance is the same as a local run's.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import shutil
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from pipeline.atomic import atomic_path, sha256_file
from pipeline.errors import SlidepipeError
from pipeline.layout import queue_result, queue_results_dir, queue_results_root

log = logging.getLogger("slidepipe")


class QueueTaskError(SlidepipeError):
    """A task taken from a queue raised (igneous's tasks; the runner's report errors as results)."""


# ------------------------------------------------------------------------------------------
# running one task and describing its outputs (the local pool and queue workers alike)
def path_stats(path: Path) -> tuple[int, int, str]:
    """(size, mtime_ns, checksum) of a file, or of a directory tree (size = total bytes,
    checksum over the sorted (name, size) list: hashing every chunk of a pyramid is too slow)."""
    if path.is_dir():
        entries = []
        total = 0
        for root, _dirs, files in os.walk(path):
            for name in files:
                full = Path(root) / name
                size = full.stat().st_size
                total += size
                entries.append(f"{full.relative_to(path).as_posix()}\t{size}")
        entries.sort()
        digest = hashlib.sha256("\n".join(entries).encode()).hexdigest()
        return total, 0, digest
    st = path.stat()
    return st.st_size, st.st_mtime_ns, sha256_file(path)


def run_in_worker(func: Callable, kwargs: Mapping[str, Any], outputs: Sequence[str], where: str, debug: bool):
    """Worker side: run the task, then checksum its outputs here, in parallel, not in the parent.
    Returns ("ok", result, {output: stats}) or ("error", file, reason)."""
    try:
        result = func(**kwargs)
        stats = {}
        for out in outputs:
            path = Path(out)
            if not path.exists():
                raise SlidepipeError("the task finished without writing this output", path)
            stats[out] = path_stats(path)
        return ("ok", dict(result or {}), stats)
    except SlidepipeError as exc:
        reason = exc.reason if exc.path else str(exc)
        return ("error", exc.path or where, reason + (("\n" + traceback.format_exc()) if debug else ""))
    except MemoryError:
        return ("error", where, "out of memory")
    except Exception as exc:  # a bug or an unexpected library error: still one line per file
        detail = traceback.format_exc() if debug else f"{type(exc).__name__}: {exc}"
        return ("error", where, detail)


# ------------------------------------------------------------------------------------------
# paths relative to the data root while a task travels
DATA = "@data"
QUEUE = "@queue"


def portable(value: Any, data_root: Path, queue_url: str | None = None) -> Any:
    """`value` (JSON-able) with every string that is a path under `data_root` replaced by
    {"@data": relative path}, and the queue URL itself by {"@queue": ""}; `local` undoes it on
    another machine. Only whole strings are paths: free text is left as it is."""
    root = str(Path(data_root).absolute())
    if isinstance(value, str):
        if queue_url and value == queue_url:
            return {QUEUE: ""}
        if value == root:
            return {DATA: "."}
        if value.startswith(root + os.sep):
            return {DATA: Path(value).relative_to(root).as_posix()}
        return value
    if isinstance(value, Path):
        return portable(str(value), data_root, queue_url)
    if isinstance(value, (list, tuple)):
        return [portable(v, data_root, queue_url) for v in value]
    if isinstance(value, dict):
        return {k: portable(v, data_root, queue_url) for k, v in value.items()}
    return value


def local(value: Any, data_root: Path, queue_url: str | None = None) -> Any:
    """The inverse of `portable` against this machine's data root (and queue URL)."""
    if isinstance(value, dict):
        if len(value) == 1 and DATA in value:
            root = Path(data_root).absolute()
            return str(root if value[DATA] == "." else root / value[DATA])
        if len(value) == 1 and QUEUE in value:
            return queue_url
        return {k: local(v, data_root, queue_url) for k, v in value.items()}
    if isinstance(value, list):
        return [local(v, data_root, queue_url) for v in value]
    return value


ROOT_IN_TEXT = "<data root>"


def _text_portable(text: str, data_root: Path) -> str:
    return text.replace(str(Path(data_root).absolute()) + os.sep, ROOT_IN_TEXT + "/")


def _text_local(text: str, data_root: Path) -> str:
    return text.replace(ROOT_IN_TEXT + "/", str(Path(data_root).absolute()) + os.sep)


# ------------------------------------------------------------------------------------------
# the runner's side
def task_spec(batch: str, key: str, func: Callable, kwargs: Mapping[str, Any], outputs: Sequence[str], where: str,
              debug: bool, data_root: Path, queue_url: str) -> dict:
    """What goes onto the queue for one runner task (JSON)."""
    return {"batch": batch, "key": key, "func": [func.__module__, func.__qualname__],
            "kwargs": portable(dict(kwargs), data_root, queue_url),
            "outputs": [portable(str(o), data_root) for o in outputs],
            "where": portable(where, data_root), "debug": bool(debug)}


def read_outcome(path: Path, outputs: Sequence[str], data_root: Path):
    """(key, outcome) of a result file, the outcome as `run_in_worker` returns it here."""
    data = json.loads(path.read_text())
    status, first, second = data["outcome"]
    if status == "ok":
        result = local(first, data_root)
        return data["key"], ("ok", result, {str(o): tuple(s) for o, s in zip(outputs, second)})
    return data["key"], ("error", local(first, data_root), _text_local(second, data_root))


class Batch:
    """One `ctx.execute` call's tasks on the queue: a sub-queue of its own on an fq:// queue, and
    a results directory under the data root; both removed when the call ends, however it ends."""

    def __init__(self, queue_url: str, data_root: Path, name: str):
        self.queue_url = queue_url
        self.data_root = Path(data_root).absolute()
        self.name = name
        self.url, self.sub_queue = build_queue(queue_url, RUN_BATCH + name)
        self.results = queue_results_dir(self.data_root, name)

    def insert(self, specs: Iterable[dict]) -> int:
        from functools import partial

        from taskqueue import TaskQueue

        self.results.mkdir(parents=True, exist_ok=True)
        return TaskQueue(self.url, progress=False).insert([partial(execute_queued, spec) for spec in specs])

    def arrived(self) -> list[Path]:
        """Result files written so far (never a worker's temporary file)."""
        from pipeline.atomic import is_temp

        try:
            return sorted(p for p in self.results.iterdir() if p.suffix == ".json" and not is_temp(p))
        except FileNotFoundError:
            return []

    def remove(self) -> None:
        remove_build_queue(self.url, self.sub_queue)
        shutil.rmtree(self.results, ignore_errors=True)


def batch_run_id(batch: str) -> int | None:
    """The pipeline_run id in a batch name (`<animal>-<stage>-<run>-<random>`), or None."""
    parts = batch.rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def remove_ended_batches(data_root: Path, queue_url: str | None, running: Callable[[int], bool]) -> list[str]:
    """Remove the results directories (and, on this fq:// queue, the sub-queues) of batches whose
    run is no longer `running`. A SIGKILLed runner cannot remove its own (`Batch.remove` runs in
    a `finally`); without this its directory stays under the data root for good, and workers keep
    running its tasks for no one. Once the directory is gone they drop them unrun."""
    try:
        entries = sorted(e for e in queue_results_root(data_root).iterdir() if e.is_dir())
    except FileNotFoundError:
        return []
    removed = []
    for entry in entries:
        run_id = batch_run_id(entry.name)
        if run_id is None or running(run_id):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry.name)
        if queue_url and queue_url.startswith("fq://"):
            builds = Path(queue_url[len("fq://"):]) / BUILDS_DIR
            for sub in builds.glob(f"{RUN_BATCH}{entry.name}-*"):
                remove_build_queue(f"{queue_url.rstrip('/')}/{BUILDS_DIR}/{sub.name}", f"{BUILDS_DIR}/{sub.name}")
    return removed


# ------------------------------------------------------------------------------------------
# the worker's side
_WORKER: dict[str, Any] = {"data_root": None, "queue_url": None, "done": 0, "igneous": False}


def execute_queued(spec: dict) -> None:
    """Run one of the runner's tasks here and leave its outcome in the run's results directory.

    A task of a run that has ended (its results directory is gone: finished, failed or
    interrupted) is dropped unrun. Never raises for the task's own failure: the error is the
    result, reported by the runner; a task is not retried forever.
    """
    root = _WORKER["data_root"]
    if root is None:
        raise QueueTaskError("this process is not a worker: start `create_pipeline worker --data-root DIR`")
    if not queue_results_dir(root, spec["batch"]).is_dir():
        log.info("skipping %s of %s: that run has ended", spec["key"], spec["batch"])
        return
    module, name = spec["func"]
    func = importlib.import_module(module)
    for part in name.split("."):
        func = getattr(func, part)
    outputs = [local(o, root) for o in spec["outputs"]]
    outcome = run_in_worker(func, local(spec["kwargs"], root, _WORKER["queue_url"]), outputs,
                            local(spec["where"], root), spec.get("debug", False))
    if outcome[0] == "ok":
        record = ["ok", portable(outcome[1], root), [list(outcome[2][o]) for o in outputs]]
    else:
        record = ["error", portable(outcome[1], root), _text_portable(outcome[2], root)]
    data = {"key": spec["key"], "host": socket.gethostname(), "pid": os.getpid(), "outcome": record}
    try:
        with atomic_path(queue_result(root, spec["batch"], spec["key"]), make_parent=False) as tmp:
            tmp.write_text(json.dumps(data, default=str))
    except FileNotFoundError:
        log.info("%s of %s finished after its run ended: result dropped", spec["key"], spec["batch"])
    _WORKER["done"] += 1


def runner_tasks_done() -> int:
    """How many of the runner's tasks this worker process ran (what it reports when it stops)."""
    return _WORKER["done"]


# ------------------------------------------------------------------------------------------
# sub-queues and polling (igneous's builds and the runner's batches)
BUILDS_DIR = "builds"
"""Under an fq:// queue directory: one sub-queue per layer build (`<layer>-<random>`) and per
runner batch (`run-<animal>-<stage>-<run>-<random>`)."""
RUN_BATCH = "run-"
"""The name of a runner batch's sub-queue starts so: a worker tells them from igneous's builds."""


def build_queue(queue_url: str, layer_name: str) -> tuple[str, str]:
    """(URL, name) of a new sub-queue of its own for one build on the shared `queue_url`.

    A lab-wide fq:// queue is shared by every run; each build inserts, waits for and (on failure)
    purges only its own sub-queue, so one run never runs, waits for or deletes another's tasks.
    `create_pipeline worker --queue URL` finds the sub-queues under URL (`run_worker`). Other
    queue kinds (sqs://) are used as they are, shared, and never purged.
    """
    import uuid

    if not queue_url.startswith("fq://"):
        return queue_url, ""
    name = f"{BUILDS_DIR}/{layer_name}-{uuid.uuid4().hex[:12]}"
    return f"{queue_url.rstrip('/')}/{name}", name


def remove_build_queue(queue_url: str, name: str) -> None:
    """Delete a build's sub-queue (its tasks, leased ones included, and its directory)."""
    if name:
        from taskqueue import TaskQueue

        TaskQueue(queue_url, progress=False).purge()
        # Renamed away first, in one step: a worker opening the sub-queue while it is deleted
        # would make its folders again (FileQueueAPI does) and leave an empty sub-queue behind.
        path = Path(queue_url[len("fq://"):])
        trash = path.with_name(f".removed-{path.name}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _build_queues(queue_url: str) -> list[str]:
    """The sub-queues of the builds under an fq:// queue, oldest first."""
    if not queue_url.startswith("fq://"):
        return []
    builds = Path(queue_url[len("fq://"):]) / BUILDS_DIR
    try:
        found = []
        for entry in os.scandir(builds):
            with contextlib.suppress(FileNotFoundError):  # removed by its run meanwhile
                if entry.is_dir() and not entry.name.startswith("."):
                    found.append((entry.stat().st_mtime, entry))
    except FileNotFoundError:
        return []
    found = [entry for _mtime, entry in sorted(found, key=lambda pair: pair[0])]
    return [f"{queue_url.rstrip('/')}/{BUILDS_DIR}/{e.name}" for e in found]


def run_worker(queue_url: str, lease_seconds: int = 600, stop_when_empty: bool = False,
               sub_queues: bool = True, data_root: str | Path | None = None) -> int:
    """Process queued tasks, igneous's and the runner's (the `create_pipeline worker` command);
    returns tasks run. `data_root`: where this machine sees the shared data root (the runner's
    tasks need it; igneous's carry their own URLs).

    With `stop_when_empty` it returns once no task is left, leased ones included (they are
    re-leased here if their worker dies); otherwise it polls forever. `sub_queues`: also work on
    every build's own sub-queue under an fq:// `queue_url` (what the neuroglancer stage inserts
    into, `build_queue`); a task that fails there is left to its build, which fails on it.
    """
    from taskqueue import queueable

    check_lease_seconds(lease_seconds)
    queueable(execute_queued)  # the runner's tasks (registered here: only workers run them)
    if data_root is not None:
        _WORKER.update(data_root=Path(data_root).absolute(), queue_url=queue_url)

    if sub_queues and queue_url.startswith("fq://"):
        done = 0
        while True:
            ran = False
            builds = _build_queues(queue_url)
            if any(not url.rpartition("/")[2].startswith(RUN_BATCH) for url in builds):
                _prepare_for_igneous()  # igneous's tasks are on its builds' sub-queues only: import it for the first
            for url in [queue_url, *builds]:
                try:
                    if _run_one(url, lease_seconds):
                        done += 1
                        ran = True
                except Exception as exc:  # that build fails on its own task; the others go on
                    log.warning("%s: a task failed: %s: %s", url, type(exc).__name__, exc)
            if not ran:
                if stop_when_empty and all(_is_empty(url) for url in [queue_url, *_build_queues(queue_url)]):
                    return done
                time.sleep(IDLE_SECONDS)
    _prepare_for_igneous()
    return _poll(queue_url, lease_seconds, stop_when_empty)


def _prepare_for_igneous() -> None:
    """Register igneous's task classes (for deserialising) and set what its tasks need here
    (`prepare_igneous_process`: slidepipe's gzip level, step-1 layers read directly). Once per
    process, and only when igneous's tasks may come: the import costs ~2 s of CPU, which a worker
    that runs only stage tasks (or is restarted often) should not pay."""
    if _WORKER.get("igneous"):
        return
    import igneous.tasks  # noqa: F401

    from pipeline.publish.common import prepare_igneous_process

    prepare_igneous_process()
    _WORKER["igneous"] = True


IDLE_SECONDS = 0.2
"""A worker that found nothing to lease on any (sub-)queue looks again after this long."""


def _run_one(url: str, lease_seconds: int) -> bool:
    """Lease one task of `url`, run it (renewing its lease) and delete it; False when none is
    free (all done, all leased by other workers, or the sub-queue removed by its run). One task
    per queue in turn, so no queue whose tasks are all leased elsewhere keeps a worker from the
    others."""
    from taskqueue import QueueEmptyError, TaskQueue

    if _gone(url):
        return False
    queue = TaskQueue(url, progress=False)
    try:
        task = queue.lease(seconds=int(lease_seconds))
    except QueueEmptyError:
        return False
    except FileNotFoundError:  # removed between the check and the lease
        return False
    with _renewing(queue, task, lease_seconds):
        task.execute()
    queue.delete(task)
    return True


MIN_LEASE_SECONDS = 2
"""The shortest lease a worker takes: fq:// stores lease ends in whole seconds, so a lease of
`s` seconds may end `s - 1` seconds after it was taken, and the renewal must come before."""


def check_lease_seconds(lease_seconds: float) -> None:
    if lease_seconds < MIN_LEASE_SECONDS:
        raise QueueTaskError(f"a lease of {lease_seconds} s is too short: at least {MIN_LEASE_SECONDS} s "
                             "(fq:// counts lease ends in whole seconds)", "--lease-seconds")


@contextlib.contextmanager
def _renewing(queue, task, lease_seconds: int):
    """Renew the task's lease every quarter of it while it runs here, so no other worker takes a
    task that is slower than the lease but alive; a killed (or frozen) worker stops renewing and
    its task goes to another worker once the lease runs out. A failed renewal (the sub-queue
    removed by its run, a file system hiccup) is logged; the task goes on."""
    import threading

    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease_seconds / 4):
            try:
                queue.renew(task, int(lease_seconds))
            except FileNotFoundError:  # its sub-queue removed: the run ended, nothing left to renew
                return
            except Exception as exc:  # noqa: BLE001  never kill the task for its bookkeeping
                log.warning("could not renew the lease of a task: %s: %s", type(exc).__name__, exc)

    thread = threading.Thread(target=renew, name="lease-renewal", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _gone(url: str) -> bool:
    """A build's sub-queue its build already removed (opening it would create it again)."""
    return url.startswith("fq://") and f"/{BUILDS_DIR}/" in url and not (Path(url[len("fq://"):]) / "queue").is_dir()


def _is_empty(url: str) -> bool:
    from taskqueue import TaskQueue

    if _gone(url):
        return True
    try:
        return TaskQueue(url, progress=False).is_empty()
    except OSError:
        return True


def _poll(queue_url: str, lease_seconds: int, stop_when_empty: bool) -> int:
    """One queue's tasks (`_run_one`, so leases are renewed) until it is empty if asked, or
    forever; a task that raises ends it with QueueTaskError. A sub-queue removed by its run while
    we poll it is a queue with nothing left, not an error."""
    done = 0
    while True:
        try:
            ran = _run_one(queue_url, lease_seconds)
        except Exception as exc:
            if _gone(queue_url):
                return done
            raise QueueTaskError(f"a task from the queue failed: {type(exc).__name__}: {exc}", queue_url) from exc
        if ran:
            done += 1
        elif stop_when_empty and _is_empty(queue_url):
            return done
        else:
            time.sleep(IDLE_SECONDS)


