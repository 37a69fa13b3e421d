"""Forking processes with a clean signal state, dying with the parent, killing a whole process tree.

(Not to be confused with child *jobs*, whose ``data`` names a ``parent`` job: see ``Store.children``.)"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection

import psutil

from ..errors import SpawnForkError

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(option, value, 0, 0, 0)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (no-op elsewhere)."""
    _prctl(_PR_SET_PDEATHSIG, int(sig))


def become_subreaper() -> None:
    """Descendants orphaned below this process (a dead worker's job processes) become its children, not init's, so
    that it can find and end them (Linux; no-op elsewhere)."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def kill_strays(known: Iterable[int]) -> None:
    """SIGKILL every child of this process that is not one of ``known``, and their descendants: with
    :func:`become_subreaper`, what a dead worker's job left running."""
    keep = set(known)
    try:
        strays = [p for p in psutil.Process().children() if p.pid not in keep]
    except psutil.Error:
        return
    for proc in strays:
        kill_tree(proc.pid)


def fork(
    child: Callable[[], int], close: Iterable[object] = (), new_group: bool = False, parent_death: bool = True
) -> int:
    """Fork; the child runs ``child()`` and exits with its return code, never returning into the caller. With
    ``parent_death`` the kernel kills the child when this process dies."""
    try:
        pid = os.fork()
    except OSError as exc:
        raise SpawnForkError(f"failed to fork: {exc}") from exc
    if pid:
        return pid
    code = 1
    try:
        if new_group:
            os.setpgrp()  # the job and its own children form one group: killpg ends them all
        if parent_death:
            die_with_parent()
        for handle in close:
            with contextlib.suppress(Exception):
                handle.close()  # type: ignore[attr-defined]
        code = child()
    except BaseException:  # the child must never unwind into the parent's code
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to a child, its process group and every descendant that left the group."""
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)
    for proc in descendants:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


def writable(connection: Connection, timeout: float = 0.0) -> bool:
    """Whether a pipe end has room to send (a blocked send to a peer that is itself blocked sending would
    never return)."""
    import select

    try:
        return bool(select.select([], [connection], [], timeout)[1])
    except (OSError, ValueError):
        return True  # closed: let send() raise and the caller handle it


def exited() -> Iterator[tuple[int, int]]:
    """(pid, waitpid status) of each child of this process that has ended, reaped without waiting."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def running(pid: int) -> bool:
    """Whether a child process still runs (a zombie does not)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def exit_signal(status: int) -> int | None:
    """The signal that ended a child, from its ``waitpid`` status (None for a normal exit)."""
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else None


def reset_signals() -> None:
    """Default dispositions in a fresh child (the parent's Python handlers must not run there)."""
    for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGALRM):
        signal.signal(sig, signal.SIG_DFL)
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)
