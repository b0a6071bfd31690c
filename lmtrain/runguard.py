"""What a training run holds for its lifetime besides the model: the workdir lock, the log
file that keeps the libraries' noise (orbax, absl, asyncio) off the console, the stop flag that
turns SIGINT/SIGTERM into an agreed checkpoint, the watchdog that ends a hung process, and the
profiler of chosen steps."""

from __future__ import annotations

import contextlib
import fcntl
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import jax

from lmtrain.errors import ConfigError

log = logging.getLogger("lmtrain")


@contextlib.contextmanager
def workdir_lock(workdir: Path):
    """One run at a time in `workdir`: an exclusive flock on WORKDIR/lock for the whole run.

    Only process 0 takes it (a multi-process run is one run). The kernel drops the lock when its
    holder exits or dies, kill -9 included, so a stale lock never blocks a rerun; the file keeps
    the holder's host and pid for the refusal's message.
    """
    if jax.process_index() != 0:
        yield
        return
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = path.read_text().strip() or "holder unknown"
        raise ConfigError(
            f"workdir {workdir} is in use by another lmtrain run ({holder}); wait for it to "
            "end or stop it (its checkpoints resume), or choose another --workdir"
        ) from None
    try:
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)
        os.write(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {since}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


# orbax logs through absl; its async writers' failures also end as asyncio's "Task exception
# was never retrieved" records, logged when the failed tasks are garbage-collected.
LIBRARY_LOGGERS = ("absl", "orbax", "asyncio")


class _LogFile:
    """An append-only log file whose write errors (the full disk that caused the noise) are
    remembered instead of raised: the noise must not turn into tracebacks of its own."""

    def __init__(self, path: Path):
        self.path, self.error, self._f, self._closed = path, None, None, False

    def _do(self, fn, *args) -> None:
        if self.error is not None or self._closed:
            return  # (a library thread that outlives the run may still log: dropped)
        if self._f is None:  # opened at the first record: a quiet run leaves no file
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._f = open(self.path, "a")  # closed by close()
            except OSError as e:
                self.error = e.strerror or str(e)
                return
        try:
            fn(*args)
        except (OSError, ValueError) as e:
            self.error = getattr(e, "strerror", None) or str(e)

    def write(self, text: str) -> None:
        self._do(lambda t: self._f.write(t), text)

    def flush(self) -> None:
        if self._f is not None:
            self._do(lambda: self._f.flush())

    def close(self) -> None:
        self.flush()
        self._closed = True
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass


@contextlib.contextmanager
def library_noise_to(path: Path):
    """Sends the libraries' log records and unraisable exceptions to `path` instead of the
    console for the run. A failed async checkpoint save (a full disk) makes orbax log an error
    per writer thread and its closed event loops raise in callbacks: hundreds of tracebacks
    that buried lmtrain's one line saying what failed and what to do; a damaged checkpoint's
    failed reads raise "Event loop is closed" in tensorstore's callbacks. If `path` cannot be
    written either (the same full disk), the records are dropped and counted. The file is
    created at the first record."""
    stream = _LogFile(path)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    saved = [(lg, lg.propagate) for lg in map(logging.getLogger, LIBRARY_LOGGERS)]
    count = {"n": 0}

    class _Counting(logging.Filter):
        def filter(self, record):
            count["n"] += record.levelno >= logging.ERROR
            return True

    handler.addFilter(_Counting())
    for lg, _ in saved:
        lg.addHandler(handler)
        lg.propagate = False

    def unraisable(u):
        count["n"] += 1
        stream.write(f"unraisable exception in {u.object!r}:\n")
        stream.write("".join(traceback.format_exception(u.exc_type, u.exc_value, u.exc_traceback)))
        stream.flush()

    old_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield
    finally:
        # Failed writer tasks log their errors when collected: make that happen now, into the
        # file, not at exit. The error on its way out holds them through its frames' locals.
        exc, seen = sys.exc_info()[1], set()
        while exc is not None and id(exc) not in seen:
            seen.add(id(exc))
            traceback.clear_frames(exc.__traceback__)
            exc = exc.__cause__ or exc.__context__
        gc.collect()
        sys.unraisablehook = old_hook
        for lg, propagate in saved:
            lg.removeHandler(handler)
            lg.propagate = propagate
        stream.close()
        if count["n"]:
            where = (
                f"were written to {path}"
                if stream.error is None
                else f"were dropped: writing them to {path} failed too ({stream.error})"
            )
            print(
                f"lmtrain: {count['n']} library errors (orbax, absl) {where}",
                file=sys.stderr,
                flush=True,
            )


def orphaned_save_threads() -> list:
    """Orbax's writer threads still alive (non-daemon) from a save that failed.

    Each waits up to orbax's barrier timeout (300 s) for a signal the failed save never sends,
    and the interpreter joins non-daemon threads at exit: the process would sit there for
    minutes after printing its error.
    """
    return [
        t
        for t in threading.enumerate()
        if t.is_alive() and not t.daemon and type(t).__module__.startswith("orbax.")
    ]


def exit_now_if_orphaned(code: int) -> None:
    """Ends the process with `code` at once (streams and logs flushed) when a failed save left
    orbax threads behind; otherwise returns and the interpreter exits normally."""
    if not orphaned_save_threads():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


class StopFlag:
    """SIGINT/SIGTERM ask the loop to save and exit; a second SIGINT aborts at once."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Watchdog:
    """Ends the process with a clear error when the loop stops making progress.

    A process whose peer died waits forever inside a collective or a checkpoint barrier; no
    Python exception ever reaches it. This thread turns that into exit status 1 within
    `timeout_s`, so schedulers see a failure and the rerun resumes from the last checkpoint.
    """

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.where = "start-up"
        self._last = time.monotonic()
        self._done = threading.Event()
        if timeout_s > 0:
            threading.Thread(target=self._watch, daemon=True, name="lmtrain-watchdog").start()

    def pet(self, where: str) -> None:
        self.where = where
        self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._done.wait(min(self.timeout_s / 10, 5.0)):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                print(
                    f"lmtrain: error: no progress for {idle:.0f} s after {self.where} on "
                    f"process {jax.process_index()} (another process may have died or hung; "
                    "train.hang_timeout_s sets the limit); exiting. Rerun to resume from the "
                    "last complete checkpoint.",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(1)

    def stop(self) -> None:
        self._done.set()


class Profiler:
    """A jax.profiler trace of steps first .. first+count-1 (train.profile_steps, numbered as
    the logs number them) into WORKDIR/profile, on train.profile_process (-1: every process).
    TensorBoard's profile plugin and Perfetto read it; each step is a StepTraceAnnotation."""

    def __init__(self, workdir: Path, steps: tuple[int, int], process: int):
        first, count = steps
        self.want = count > 0 and process in (-1, jax.process_index())
        self.first, self.end = max(first, 1), max(first, 1) + count
        self.dir, self.on = workdir / "profile", False

    def step(self, n: int):
        """Context for running step n: starts the trace at the first profiled step."""
        if self.want and not self.on and self.first <= n < self.end:
            self.dir.mkdir(parents=True, exist_ok=True)
            # No Python tracer: it hooks every Python thread (grain's and orbax's workers
            # included), adds overhead to the steps it measures, and crashed a long-lived
            # process that had started many threads. Device ops and step annotations remain.
            opts = jax.profiler.ProfileOptions()
            opts.python_tracer_level = 0
            jax.profiler.start_trace(str(self.dir), profiler_options=opts)
            self.on = True
        if self.on:
            return jax.profiler.StepTraceAnnotation("train", step_num=n)
        return contextlib.nullcontext()

    def done(self, n: int, state: Any) -> None:
        """After step n was dispatched: ends the trace once the last profiled step finished."""
        if self.on and n >= self.end - 1:
            jax.block_until_ready(state)
            self.close()

    def close(self) -> None:
        if self.on:
            jax.profiler.stop_trace()
            self.on = self.want = False
            log.info("profile of steps %d-%d written to %s", self.first, self.end - 1, self.dir)
