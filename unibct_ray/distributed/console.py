"""Ray's own log lines on the driver go to the run's log file, not the console.

A run's console holds the project's progress lines, notes and results. What Ray itself writes
from the driver process reaches the console by three paths, each routed where Ray puts it:

- Python loggers (``ray`` and the libraries' ``ray.*`` loggers, e.g. the token-authentication
  notice and "Started a local Ray instance"): their console handlers are swapped for one
  writing to the log file, as Ray's logging guide describes for the ``ray`` logger;
- the core worker's C++ log (``[... E pid tid] core_worker.cc: ...``): its file sink is the
  session's ``python-core-driver-*.log``, and its second sink writes ERROR lines to the
  process's stderr (fd 2) with no setting to turn it off short of raising
  ``RAY_BACKEND_LOG_LEVEL`` for every log at once. So fd 2 points at the log file while
  Python's ``sys.stderr`` keeps a duplicate of the console: the project's lines, tracebacks,
  progress bars and Python warnings still reach the user;
- cluster messages relayed to the driver (``(raylet) ...`` lines, e.g. how many worker
  processes a node started): Ray's relay threads (named ``ray_*``) print them to
  ``sys.stdout``; writes from those threads go to the log file.

Worker processes' own output is already kept out of the console by ``log_to_driver=False``
(``ensure_ray``); it stays in the session's ``logs/worker-*`` files.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
from pathlib import Path
from typing import IO, Iterator

from unibct_ray.errors import UserError

__all__ = ["ray_logs_to", "ray_console", "RAY_LOG_FORMAT", "RUN_LOG"]

#: Where a run keeps Ray's log lines, under its output folder.
RUN_LOG = Path("logs") / "ray.log"

#: Ray's own console format with the logger's name added (which library said it).
RAY_LOG_FORMAT = "%(asctime)s\t%(levelname)s %(name)s %(filename)s:%(lineno)s -- %(message)s"


class _RayThreadsTo(io.TextIOBase):
    """``sys.stdout`` for the run: text written by Ray's relay threads goes to ``log``, the
    rest to ``console``. Routing by the writing thread, not by what the text says."""

    def __init__(self, console: IO[str], log: IO[str]) -> None:
        self._console, self._log = console, log

    def _target(self) -> IO[str]:
        return self._log if threading.current_thread().name.startswith("ray_") else self._console

    def write(self, s: str) -> int:
        return self._target().write(s)

    def flush(self) -> None:
        self._console.flush()
        self._log.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self._console.isatty()

    def fileno(self) -> int:
        return self._console.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._console, "encoding", "utf-8")


def _fd_of(stream: object) -> int | None:
    try:
        return stream.fileno()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return None


def _console_handlers() -> list[tuple[logging.Logger, logging.Handler]]:
    """(logger, handler) for every handler of ``ray`` / ``ray.*`` that writes to a stream
    other than a file (Ray's PlainRayHandler, Ray Data's "console" handler)."""
    names = ["ray"] + sorted(n for n in logging.Logger.manager.loggerDict if n.startswith("ray."))
    found = []
    for name in names:
        logger = logging.getLogger(name)
        for h in logger.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                found.append((logger, h))
    return found


@contextlib.contextmanager
def ray_logs_to(path: Path) -> Iterator[Path]:
    """While inside, Ray's own driver-side log lines are appended to ``path`` (created with its
    folder), not printed; everything is put back on exit, and a Ray started inside is shut down
    before that. Yields ``path``.

    When the block raises a ``UserError`` (a bad input found once Ray runs), a log this call
    created is removed with the folders made for it: a bad input leaves no output behind.
    """
    import ray  # (Ray configures its loggers on import; they must exist to be moved)
    import ray.data  # noqa: F401  (and Ray Data its own console handler)

    path = Path(path)
    made = [d for d in (path.parent, *path.parent.parents) if not d.exists()]  # deepest first
    existed = path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter(RAY_LOG_FORMAT))
    handler.setLevel(logging.INFO)  # what Ray prints on a console; Ray Data's DEBUG stays in its session file
    moved = _console_handlers()
    # Each logger's handler list as it was, order included (put back as a whole on exit).
    saved_handlers = {lg: list(lg.handlers) for lg, _ in moved}
    for logger in saved_handlers:
        logger.addHandler(handler)
    for logger, h in moved:
        logger.removeHandler(h)

    old_stdout, old_stderr = sys.stdout, sys.stderr
    for stream in (old_stdout, old_stderr):
        stream.flush()
    saved_fd2 = os.dup(2)
    console_err = None
    bad_input = False
    # A Ray this block starts is stopped inside it: its relay threads print what the raylet
    # reports (e.g. how many worker processes it started) whenever it arrives, and a note
    # arriving after the block, or flushed by Ray's exit handler, would reach the console.
    started_here = not ray.is_initialized()
    try:
        os.dup2(log.fileno(), 2)
        if _fd_of(old_stderr) == 2:  # Python's stderr is fd 2: keep it on the console
            console_err = open(saved_fd2, "w", buffering=1, encoding=getattr(old_stderr, "encoding", None) or "utf-8",
                               errors="backslashreplace", closefd=False)
            sys.stderr = console_err
        sys.stdout = _RayThreadsTo(old_stdout, log)
        try:
            yield path
        except UserError:
            bad_input = True
            raise
    finally:
        if started_here and ray.is_initialized():
            # Stopping, Ray prints the notes its deduplicator held back ("[repeated 3x ...]")
            # from this thread: they are Ray's too.
            sys.stdout = sys.stderr = log
            with contextlib.suppress(Exception):  # the run's result stands; a failed stop is Ray's
                ray.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        sys.stdout, sys.stderr = old_stdout, old_stderr
        os.dup2(saved_fd2, 2)
        if console_err is not None:
            console_err.close()
        os.close(saved_fd2)
        for logger, handlers in saved_handlers.items():
            logger.handlers[:] = handlers
        log.close()
        if bad_input and not existed:  # a bad input leaves no output behind; its error line says why
            path.unlink(missing_ok=True)
            for d in made:
                with contextlib.suppress(OSError):  # only folders left empty
                    d.rmdir()


def ray_console(log: Path, verbose: bool = False) -> contextlib.AbstractContextManager:
    """The run's console: Ray's own lines to ``log`` (named in one line printed now), or, with
    ``verbose``, left where Ray prints them."""
    if verbose:
        return contextlib.nullcontext(None)
    print(f"Ray's own log lines go to {log} (--verbose prints them here)", flush=True)
    return ray_logs_to(log)
