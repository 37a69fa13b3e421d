"""Self-fencing of the process that runs a job's code: it stops the job (and every process the job started) before
the lease it runs under can expire on the server, whatever happens to its node, its manager or its process group.

Three lines of defence, each a little later than the one before and all before the lease can end on the server
(a renewal sent at ``t`` holds the lease until at least ``t + lease``; the manager's fence is ``t + lease / 2``):

1. the manager kills a worker whose lease its node did not renew in time (:class:`~taskscheduler.node.protocol.Fence`);
2. the worker's own watchdog thread kills the worker's process group, and every process its job started, at the
   fence plus :data:`WATCHDOG_GRACE` of a lease: when the manager (or the node behind it) stopped moving the fence
   on (paused, killed, cut off), when the manager is gone, or when the manager asks its workers to stop;
3. a kernel timer (a POSIX timer that sends SIGKILL: no Python code has to run, and no job can catch or ignore
   it) ends the worker at the fence plus :data:`KERNEL_GRACE` of a lease, even when the worker itself was paused
   or a C call holds the interpreter: a worker continued after that moment dies before it runs one more
   instruction. Only the watchdog moves it on, and the watchdog needs the interpreter: a job that holds it in one
   call for most of a lease is stopped although its lease holds (its manager records that as the run's failure).

All of it is measured on :func:`lease_clock` (CLOCK_BOOTTIME: it goes on while the machine is suspended, as the
server's clock does).

The manager and each worker share a :class:`LeaseSlot` (a few bytes of memory mapped into both), so moving a
fence on costs no message and no server command.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import signal
import struct
import sys
import threading
import time

import psutil

#: Fractions of the lease after the manager's fence at which the watchdog, then the kernel timer, end the worker
#: (the lease on the server lasts at least half a lease past the fence).
WATCHDOG_GRACE = 1 / 8
KERNEL_GRACE = 2 / 5
#: Longest the watchdog sleeps while a job's code runs (it looks at the slot and at its manager this often).
WATCH_PERIOD_SECONDS = 0.1
#: A stop request ends a job's code only if it has not returned this long after the watchdog saw the request: the
#: code's last statements and its return to the worker are not one instant, and a stop never kills a run whose
#: code has returned.
STOP_RETURN_SECONDS = 0.05
_DEADLINE = struct.Struct("d")
_STOP = struct.Struct("q")


def lease_clock() -> float:
    """The clock fences are measured on, the same for every process of the machine; unlike ``time.monotonic()``
    it goes on while the machine is suspended (so does the server's clock, and with it every lease)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic()


class LeaseSlot:
    """Memory shared by a manager and one worker (an anonymous shared mapping, inherited by fork): the time (on
    :func:`lease_clock`) until which the manager vouches for the worker's lease, whether the manager asks the worker
    to stop, when the worker's kernel timer is set to end it, and whether the worker stopped its job itself (so
    that its manager can tell such an end from a death)."""

    SIZE = 32

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, self.SIZE)

    def set_fence(self, deadline: float) -> None:
        _DEADLINE.pack_into(self._map, 0, deadline)

    def fence(self) -> float:
        value: float = _DEADLINE.unpack_from(self._map, 0)[0]
        return value

    def request_stop(self) -> None:
        _STOP.pack_into(self._map, 8, 1)

    def stop_requested(self) -> bool:
        return bool(_STOP.unpack_from(self._map, 8)[0])

    def set_timer(self, deadline: float) -> None:
        _DEADLINE.pack_into(self._map, 16, deadline)

    def timer(self) -> float:
        """When the worker's kernel timer ends it (0: not armed)."""
        value: float = _DEADLINE.unpack_from(self._map, 16)[0]
        return value

    def mark_self_stopped(self) -> None:
        _STOP.pack_into(self._map, 24, 1)

    def self_stopped(self) -> bool:
        """Whether the worker ended its job (and itself) by its own fence: a lease it lost, not a death."""
        return bool(_STOP.unpack_from(self._map, 24)[0])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._map.close()


class SelfFence:
    """The worker's side: armed before each claim, watching while the job's code runs, off once the code returned
    (recording a run that ended needs no fence, and must not be killed: its work is done)."""

    def __init__(self, slot: LeaseSlot, lease: float) -> None:
        self.slot = slot
        self.lease = float(lease)
        self._parent = os.getppid()
        self._cond = threading.Condition()
        self._watching = False
        self._own_fence = 0.0  # from the claim: before the manager has heard of it
        self._timer = KernelTimer.create()
        self._armed = -1.0
        self._thread: threading.Thread | None = None
        self._stop_seen: float | None = None  # when the watchdog first saw a stop request during this job

    def arm(self, lease: float) -> float:
        """Call right before a claim is sent: the lease it may win holds at least ``lease`` from now on the server,
        so the job may run until half of it has passed. Returns the claim's moment (on :func:`lease_clock`)."""
        self.lease = float(lease)
        claimed_at = lease_clock()
        with self._cond:
            self._own_fence = claimed_at + self.lease / 2
            self._set_timer(self._own_fence, claimed_at)
        return claimed_at

    def fence(self) -> float:
        """Until when the job may run: the claim's own fence, or a later one the manager shared. A value further
        ahead than a whole lease is not one the manager wrote (it never vouches for more than half), and counts not."""
        shared = self.slot.fence()
        if not shared < lease_clock() + self.lease:
            shared = 0.0
        return max(self._own_fence, shared)

    def holds(self) -> bool:
        """Whether job code may start now: the lease holds, the manager lives and has not asked to stop."""
        return lease_clock() < self.fence() and os.getppid() == self._parent and not self.slot.stop_requested()

    def stop_requested(self) -> bool:
        return self.slot.stop_requested()

    def watch(self) -> None:
        """The job's code starts: watch it until :meth:`end`."""
        with self._cond:
            self._watching = True
            self._stop_seen = None
            self._cond.notify()
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="taskscheduler-fence", daemon=True)
            self._thread.start()

    def end(self) -> None:
        """The job's code returned (or was never started): no fence from here on. Atomic with the watchdog: once
        this returns, the watchdog will not kill this run."""
        with self._cond:
            self._watching = False
            self._own_fence = 0.0
            self._set_timer(None, 0.0)

    def stop_now(self, why: str) -> None:
        """Kill this worker's process group and every process the job started (never returns)."""
        with contextlib.suppress(OSError):  # no logging here: its lock may be held by the thread we interrupt
            os.write(2, f"taskscheduler worker {os.getpid()}: stopping its job: {why}\n".encode())
        with contextlib.suppress(Exception):
            self.slot.mark_self_stopped()
        kill_own_processes()

    def _watch(self) -> None:
        with self._cond:
            while True:
                while not self._watching:
                    self._cond.wait()
                now = lease_clock()
                fence = self.fence()
                if os.getppid() != self._parent:
                    self.stop_now("its worker manager is gone")
                elif self.slot.stop_requested():
                    if self._stop_seen is None:
                        self._stop_seen = now
                    elif now - self._stop_seen >= STOP_RETURN_SECONDS:
                        self.stop_now("its queue node stops")
                elif now >= fence + self.lease * WATCHDOG_GRACE:
                    # Nothing is written from here: the job's own thread runs on until the process dies, so a run
                    # put back from here could end (its code return) after another node took it. Its lease ends
                    # on the server and the run is swept, or its manager records it as a lease it lost (vouched).
                    self.stop_now("its lease was not renewed in time (its node is paused, gone or cut off)")
                self._set_timer(fence, now)
                period = STOP_RETURN_SECONDS if self._stop_seen is not None else WATCH_PERIOD_SECONDS
                self._cond.wait(min(period, max(0.001, fence + self.lease * WATCHDOG_GRACE - now)))

    def _set_timer(self, fence: float | None, now: float) -> None:
        if self._timer is None or fence == self._armed:
            return
        self._armed = -1.0 if fence is None else fence
        self.slot.set_timer(0.0 if fence is None else fence + self.lease * KERNEL_GRACE)
        self._timer.set(None if fence is None else fence + self.lease * KERNEL_GRACE - now)


def kill_descendants() -> None:
    """SIGKILL every descendant of this process (those that left its process group too)."""
    with contextlib.suppress(psutil.Error):
        for proc in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                proc.kill()


def kill_own_processes() -> None:
    """SIGKILL every descendant (those that left our process group too), then our whole group, ourselves included."""
    kill_descendants()
    with contextlib.suppress(OSError):
        os.killpg(0, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


class KernelTimer:
    """A POSIX timer on CLOCK_BOOTTIME that sends SIGKILL to this process (Linux; None elsewhere)."""

    _CLOCK_BOOTTIME = 7
    _SIGEV_SIGNAL = 0

    def __init__(self, libc: ctypes.CDLL, timer: ctypes.c_void_p) -> None:
        self._libc = libc
        self._timer = timer

    @classmethod
    def create(cls) -> KernelTimer | None:
        if not sys.platform.startswith("linux"):
            return None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            event = ctypes.create_string_buffer(64)  # struct sigevent: value (8 bytes), signo, notify, padding
            struct.pack_into("ii", event, 8, int(signal.SIGKILL), cls._SIGEV_SIGNAL)
            timer = ctypes.c_void_p()
            if libc.timer_create(cls._CLOCK_BOOTTIME, event, ctypes.byref(timer)) != 0:
                return None
        except (OSError, AttributeError):
            return None
        return cls(libc, timer)

    def set(self, seconds: float | None) -> None:
        """Fire once, ``seconds`` from now (at once when not positive); None disarms it."""
        if seconds is None:
            value = (0, 0)
        else:
            nanos = max(1, int(seconds * 1e9))  # zero would disarm it
            value = divmod(nanos, 1_000_000_000)
        spec = (ctypes.c_long * 4)(0, 0, value[0], value[1])  # struct itimerspec: interval, then value
        self._libc.timer_settime(self._timer, 0, ctypes.byref(spec), None)
