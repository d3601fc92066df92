"""Where a study's runs happen: one after another in this process, in worker processes
(``--jobs``, ``--devices``), or as tasks on an existing Ray cluster (``--backend ray``).

A run is a module-level function ``run(plan, spec, device, report)`` and a picklable plan; it
returns a picklable result. Workers send progress events through ``report`` (a queue between
processes, a Ray queue actor on a cluster), and this process hands them to ``on_event`` while it
waits, so progress bars move whatever the backend. Results come back as each run finishes, in
the order they finish; what to keep is the caller's business (it writes each finished run at once).
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import queue
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

import torch

from ..core.threads import available_cores
from ..errors import BnmoveError

BACKENDS = ("local", "ray")

Report = Callable[[Any], None]
RunFunction = Callable[[Any, Any, str, Report], Any]


def slots(jobs: int, devices: Sequence[str]) -> list[str]:
    """The device of each worker: ``jobs`` workers over ``devices`` in turn (one per device by default)."""
    if jobs < 1:
        raise BnmoveError("--jobs must be at least 1")
    return [devices[i % len(devices)] for i in range(jobs)]


def execute(
    run: RunFunction,
    plan: Any,
    specs: Sequence[Any],
    *,
    devices: Sequence[str],
    jobs: int = 1,
    backend: str = "local",
    on_event: Callable[[Any], None] | None = None,
) -> Iterator[Any]:
    """Run ``run(plan, spec, device, report)`` for every spec; yield each result as it finishes.

    ``jobs`` workers (default one per device) run at once; each holds one device, so a GPU runs
    one job at a time unless ``jobs`` exceeds the number of devices. A CPU worker gets an equal
    share of this machine's cores as torch threads.
    """
    if backend not in BACKENDS:
        raise BnmoveError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    workers = slots(jobs, devices)
    report = on_event or (lambda event: None)
    if backend == "ray":
        yield from _on_ray(run, plan, specs, workers, report)
    elif len(workers) == 1 or len(specs) <= 1:
        for spec in specs:
            yield run(plan, spec, workers[0], report)
    else:
        yield from _in_processes(run, plan, specs, workers, report)


# ---------------------------------------------------------------------------- worker processes

_worker: dict[str, Any] = {}
#: process groups of commands that runs started here (``--run``), stopped with this process
_children: set[subprocess.Popen[bytes]] = set()


def thread_share() -> int | None:
    """In a CPU worker process, its share of this machine's cores; None elsewhere."""
    return _worker.get("threads")


@contextlib.contextmanager
def child(process: subprocess.Popen[bytes]) -> Iterator[None]:
    """While a run waits for ``process`` (started in its own session): if the wait ends by an
    exception (Ctrl-C, a failure elsewhere) or this worker is terminated, stop its whole group."""
    _children.add(process)
    try:
        yield
    finally:
        _children.discard(process)
        if process.poll() is None:
            _stop_group(process)


def _stop_group(process: subprocess.Popen[bytes], grace: float = 3.0) -> None:
    """SIGTERM to the process group, then SIGKILL after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        try:
            process.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _start_worker(plan_file: str, events: Any, devices: Any, threads: int) -> None:
    """In each worker process, once: the plan, the device it holds, its share of the cores."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the workers
    signal.signal(
        signal.SIGTERM, _exit
    )  # ... by terminating them, which must stop their DataLoader workers too
    device = devices.get()
    if not device.startswith("cuda"):
        torch.set_num_threads(threads)
    # memory-mapped: the workers share the pages of the data instead of holding a copy each
    plan = torch.load(plan_file, weights_only=False, mmap=True)
    _worker.update(plan=plan, device=device, events=events)
    if not device.startswith("cuda"):
        _worker["threads"] = threads


def _exit(signum: int, frame: Any) -> None:
    """Stop now: this worker's own children (DataLoader workers) first, then the worker, without
    the seconds a normal interpreter exit spends waiting for them, and the commands it started."""
    for process in list(_children):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    for worker in multiprocessing.active_children():
        worker.kill()
    os._exit(128 + signum)


def _run_in_worker(run: RunFunction, spec: Any) -> tuple[Any, int]:
    """The run's result and how many events it sent: a queue's feeder thread may still be carrying
    the last of them when the result is back, and the parent waits for them all."""
    sent = 0

    def report(event: Any) -> None:
        nonlocal sent
        _worker["events"].put(event)
        sent += 1

    return run(_worker["plan"], spec, _worker["device"], report), sent


def _serialised(plan: Any) -> bytes:
    buffer = io.BytesIO()
    try:
        torch.save(plan, buffer)
    except Exception as exc:
        raise BnmoveError(
            f"--jobs/--devices send the model and data to worker processes, and they cannot be pickled "
            f"({type(exc).__name__}: {exc}); run with --jobs 1"
        ) from exc
    return buffer.getvalue()


def _in_processes(
    run: RunFunction, plan: Any, specs: Sequence[Any], workers: list[str], report: Report
) -> Iterator[Any]:
    # spawn, not fork: CUDA cannot be used in a forked child, and a fork copies this process's threads' locks
    context = multiprocessing.get_context("spawn")
    events = context.Queue()
    devices = context.Queue()
    for device in workers:
        devices.put(device)
    cpu_workers = sum(1 for d in workers if not d.startswith("cuda"))
    threads = max(1, available_cores() // max(cpu_workers, 1))
    # The plan goes through a file, not the start-up pipe: a parent writing a large plan into a
    # child's pipe waits until that child has imported torch, which starts the workers one by one.
    handle, plan_file = tempfile.mkstemp(prefix="bnmove-plan-", suffix=".pt")
    with os.fdopen(handle, "wb") as fh:
        fh.write(_serialised(plan))
    pool = ProcessPoolExecutor(
        len(workers),
        mp_context=context,
        initializer=_start_worker,
        initargs=(plan_file, events, devices, threads),
    )
    pending: set[Future[tuple[Any, int]]] = {pool.submit(_run_in_worker, run, spec) for spec in specs}
    finished = False
    sent = received = 0
    try:
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            received += _drain(events, report)
            for future in done:
                result, count = future.result()
                sent += count
                yield result
        while received < sent:  # the events still on their way from the workers
            report(events.get(timeout=60))
            received += 1
        finished = True
    finally:
        if not finished:  # interrupted, or a run failed: stop the others now, not when they end
            for process in list((pool._processes or {}).values()):
                process.terminate()
        pool.shutdown(wait=finished, cancel_futures=True)
        events.close()
        devices.close()
        with contextlib.suppress(OSError):
            os.unlink(plan_file)


def _drain(events: Any, report: Report) -> int:
    """Hand on every event that has arrived; returns how many."""
    count = 0
    while True:
        try:
            event = events.get_nowait()
        except queue.Empty:
            return count
        report(event)
        count += 1


# ---------------------------------------------------------------------------------------- Ray


def _ray_task(run: RunFunction, payload: bytes, spec: Any, device: str, events: Any) -> Any:
    plan = torch.load(io.BytesIO(payload), weights_only=False)
    return run(plan, spec, "cuda" if device.startswith("cuda") else device, events.put)


def _on_ray(
    run: RunFunction, plan: Any, specs: Sequence[Any], workers: list[str], report: Report
) -> Iterator[Any]:
    """Each run a Ray task on the cluster ``ray.init()`` connects to (``RAY_ADDRESS``, or the one
    started on this machine; without one Ray starts a local instance). GPU runs ask Ray for one
    GPU each (Ray picks which); CPU runs for an equal share of ``len(workers)`` of the cluster."""
    try:
        import ray
        from ray.util.queue import Empty, Queue
    except ImportError:
        raise BnmoveError("--backend ray needs Ray: pip install 'bnmove[ray]'") from None
    if not ray.is_initialized():
        with contextlib.redirect_stdout(io.StringIO()):
            ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
    gpu = any(d.startswith("cuda") for d in workers)
    task = ray.remote(num_gpus=1 if gpu else 0, num_cpus=1)(_ray_task)
    payload = ray.put(_serialised(plan))
    events = Queue()
    device = "cuda" if gpu else "cpu"
    waiting = list(specs)
    running: list[Any] = []
    try:
        while waiting or running:
            while waiting and len(running) < len(workers):  # at most --jobs runs at once
                running.append(task.remote(run, payload, waiting.pop(0), device, events))
            done, running = ray.wait(running, num_returns=1, timeout=0.2)
            while True:
                try:
                    report(events.get_nowait())
                except Empty:
                    break
            for ref in done:
                try:
                    yield ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.cause if isinstance(exc.cause, Exception) else None
                    if isinstance(cause, ModuleNotFoundError):
                        raise BnmoveError(
                            f"the Ray workers cannot import {cause.name!r}, which the model needs: install "
                            "it on every node, or start Ray with a runtime_env that ships it "
                            "(py_modules, working_dir, or env_vars PYTHONPATH on one machine)"
                        ) from exc
                    raise (cause or exc) from exc
    finally:
        for ref in running:
            ray.cancel(ref)
        events.shutdown()
