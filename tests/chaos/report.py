"""What a seed reports: a summary line, the history of each job with a problem, the faults and node log tails."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from chaos.checks import _kind_of, _seconds
from chaos.config import FAULT_KINDS, NODE_FAULTS
from chaos.harness import Harness
from chaos.processes import tail
from chaos.runlog import Judged, NodeState
from taskscheduler import JobStatus

# -- reporting ----------------------------------------------------------------------------------------------------


def history(j: Judged, h: Harness) -> str:
    lines = [f"  job {j.spec.id} {j.spec.kind} data={_short(j.spec.data)} options={j.spec.options}"]
    status = JobStatus(j.doc.get("status", 0)).name
    lines.append(f"    final {status} run {j.doc.get('run')} orphaned {j.doc.get('orphaned')}")
    for e in j.events:
        error = e.get("error") or {}
        lines.append(
            f"    event run {e['run']} {JobStatus(e['status']).name:<10} worker ..{str(e.get('worker'))[-6:]} "
            f"at {_seconds(e['time'], h.t0_wall)} {error.get('class', '')} {str(error.get('message', ''))[:80]}"
        )
    for x in sorted(j.executions, key=lambda x: x.start):
        lines.append("    " + x.describe(h.t0))
    return "\n".join(lines)


def _short(data: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in data.items() if k != "log"}


def summary(h: Harness, judged: list[Judged]) -> str:
    statuses = Counter(JobStatus(j.doc.get("status", 0)).name for j in judged)
    executions = sum(len(j.executions) for j in judged)
    runs = sum(len(j.ends()) for j in judged)
    releases = sum(1 for j in judged for e in j.events if _kind_of(e) == "release")
    tolerated = sum(len(j.tolerated) for j in judged)
    faults = " ".join(f"{k}={h.faults[k]}" for k in FAULT_KINDS + NODE_FAULTS)
    if h.skewed:
        faults += f" (clock {h.skew:+d} s on {h.skewed})"
    return (
        f"chaos seed {h.seed}: {len(h.nodes)} nodes started | faults {faults} | {len(judged)} jobs "
        f"{dict(statuses)} | {executions} executions ({h.leases_checked} with their lease), {runs} runs, "
        f"{releases} releases, {tolerated} tolerated | claims won {h.claims[0]} lost {h.claims[1]} ({h.claims[2]} "
        f"nodes said) | "
        f"faults {h.timings.get('faults', 0):.1f} s, stop all {h.timings.get('stop all', 0):.1f} s, "
        f"settle {h.timings.get('settle', 0):.1f} s, stop {h.timings.get('stop', 0):.1f} s, total {h.now():.1f} s"
    )


def report(h: Harness, judged: list[Judged], head: str) -> str:
    parts = [head, "violations:"]
    parts += [f"  {v}" for v in h.violations]
    for j in judged:
        parts += [f"  job {j.spec.id} ({j.spec.kind}): {p}" for p in j.problems]
    parts.append("tolerated:")
    parts += [f"  job {j.spec.id}: {t}" for j in judged for t in j.tolerated]
    parts.append("histories of the jobs concerned (times in s from the start):")
    parts += [history(j, h) for j in judged if j.problems or j.tolerated]
    parts.append("fault timeline:")
    parts += [f"  {line}" for line in h.timeline]
    for n in h.nodes:
        parts.append(f"node {n.label} ({n.state}) log tail:\n{tail(n.node.output())}")
    parts.append(f"rerun: .venv/bin/python -m pytest tests/chaos/test_chaos.py --chaos-seeds {h.seed}-{h.seed}")
    return "\n".join(parts)


#: What the node logs say about the mechanisms the faults exercised (counted for the summary).
LOG_MARKS = {
    "fenced": "lease of a running job not renewed in time",
    "lost": "is no longer ours",
    "timed out": "timed out after",
    "released": "put back to waiting",
    "held": "its third orphaning if its owner is dead",
    "step failures": "queue node step failed",
}


def _log_marks(nodes: Iterable[NodeState]) -> str:
    logs = [n.node.output() for n in nodes]
    return ", ".join(f"{name} {sum(log.count(mark) for log in logs)}" for name, mark in LOG_MARKS.items())
