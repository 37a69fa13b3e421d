"""The processes of a seed as the operating system sees them: nodes, workers, the subprocesses of jobs."""

from __future__ import annotations

from pathlib import Path

import psutil

# -- processes ----------------------------------------------------------------------------------------------------


def _node_processes(db_name: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info.get("cmdline") or []
        if db_name in cmdline and "queue" in cmdline and proc.info.get("status") != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def _workers(node_pid: int) -> list[int]:
    """Worker processes of a node: the children of its manager (the node's only child)."""
    try:
        return [w.pid for m in psutil.Process(node_pid).children() for w in m.children()]
    except psutil.Error:
        return []


def _is_worker(pid: int, db_name: str) -> bool:
    try:
        proc = psutil.Process(pid)
        return db_name in proc.cmdline() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _chaos_children(log: Path) -> list[psutil.Process]:
    """Subprocesses of ChaosJob executions that log to ``log`` and still run."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info.get("cmdline") or []
        if "chaos-child" in cmdline and str(log) in cmdline and proc.info.get("status") != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def tail(text: str, lines: int = 25) -> str:
    """The last lines of a node's log, without the driver's DEBUG chatter."""
    kept = [line for line in text.splitlines() if " pymongo." not in line]
    return "\n".join("    " + line[:300] for line in kept[-lines:])
