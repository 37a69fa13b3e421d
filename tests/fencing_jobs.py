"""Job classes of the self-fencing edge tests (tests/e2e/test_self_fencing_edges.py): jobs that hold the interpreter
in one C call, ignore the fence signal, double-fork a daemon, start a helper or run a command. Each logs
``<what> <pid> <time.monotonic()>`` lines to ``data["log"]``."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

from crash_jobs import SUB_TICKS, append_line
from taskscheduler import AbstractJob


def _line(path: str, what: str) -> None:
    """``<what> <pid> <time.monotonic()>``: one clock for every process of the machine."""
    append_line(path, f"{what} {os.getpid()} {time.monotonic():.4f}")


def hold_gil(seconds: float) -> None:
    """One C call that holds the interpreter lock for ``seconds`` (as a long regex, a big-integer power, a sort of
    a huge list or a C extension that does not release it would; this one lasts exactly as long on any machine)."""

    class Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    libc = ctypes.PyDLL(None)  # PyDLL: the call keeps the GIL (CDLL would release it)
    request = Timespec(int(seconds), int((seconds % 1) * 1e9))
    remaining = Timespec(0, 0)
    while libc.nanosleep(ctypes.byref(request), ctypes.byref(remaining)) != 0:  # interrupted by a signal
        request = Timespec(remaining.tv_sec, remaining.tv_nsec)


class HoldGil(AbstractJob):
    """``start``, one GIL-holding C call of ``data["hold"]`` s, then ``after``. With ``data["ignore_fence_signal"]``
    it first sets the real-time signal the library's kernel timer uses to SIG_IGN (as a job using real-time signals
    for itself, or a library that ignores "all signals it does not know", would)."""

    def start(self) -> str:
        if self.data.get("ignore_fence_signal"):
            signal.signal(signal.SIGRTMIN + 2, signal.SIG_IGN)
        _line(self.data["log"], "start")
        hold_gil(float(self.data["hold"]))
        _line(self.data["log"], "after")
        return "held"


#: A daemon in the classic way (fork, setsid, fork; the middle process exits): what `nohup cmd &`, a
#: `start-stop-daemon`, or a server the job launches for itself do. It ticks ``daemon <pid> <time>`` until killed.
_DAEMON = (
    "import os, sys, time\n"
    "if os.fork():\n"
    "    os._exit(0)\n"
    "os.setsid()\n"
    "if os.fork():\n"
    "    os._exit(0)\n"
    "while True:\n"
    "    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)\n"
    "    os.write(fd, f'daemon {os.getpid()} {time.monotonic():.4f}\\n'.encode())\n"
    "    os.close(fd)\n"
    "    time.sleep(0.05)\n"
)


class WithDaemon(AbstractJob):
    """Starts a double-forked daemon (a process of its job), then ticks ``tick`` for ``data["seconds"]`` s."""

    def start(self) -> str:
        subprocess.run([sys.executable, "-c", _DAEMON, self.data["log"]], check=True, stdin=subprocess.DEVNULL)
        _line(self.data["log"], "start")
        end = time.monotonic() + float(self.data["seconds"])
        while time.monotonic() < end:
            time.sleep(0.05)
            _line(self.data["log"], "tick")
        _line(self.data["log"], "end")
        return "done"


class HoldGilWithHelper(AbstractJob):
    """Starts a helper process that ticks ``sub`` (in the worker's own process group, as ``subprocess.Popen``
    does), writes ``start``, then holds the GIL in one C call for ``data["hold"]`` s."""

    def start(self) -> str:
        subprocess.Popen([sys.executable, "-c", SUB_TICKS, self.data["log"]], stdin=subprocess.DEVNULL)
        _line(self.data["log"], "start")
        hold_gil(float(self.data["hold"]))
        return "held"


class RunsCommand(AbstractJob):
    """Runs a program and waits for it (ffmpeg, rsync, a shell script...): ``start``, then the command."""

    def start(self) -> str:
        _line(self.data["log"], "start")
        code = "import time; time.sleep(float(__import__('sys').argv[1]))"
        subprocess.run([sys.executable, "-c", code, str(self.data["seconds"])], check=True)
        _line(self.data["log"], "end")
        return "ran"
