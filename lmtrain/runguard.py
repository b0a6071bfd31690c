"""What a training run holds for its lifetime besides the model: the workdir lock, and the
log file that keeps the libraries' noise (orbax, absl, asyncio) off the console."""

from __future__ import annotations

import contextlib
import fcntl
import gc
import logging
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import jax

from lmtrain.errors import ConfigError


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
    import threading

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
