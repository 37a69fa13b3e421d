"""The scale-out model of benchmark 11: server commands and server work per job as a function of the node count.

Fed with what ``scale_out.py`` measures: commands per job of each kind (serverStatus opcounters) at a few node
counts, and the server's CPU per command of each kind (a loop of each against the same server). Each kind is
fitted as ``intercept + slope * nodes`` by least squares: the intercept is what a job costs whoever runs it (its
insert, the winning claim, the end), the slope what every further node adds (its change stream's reads of the
job's changes, its losing claims). Server work per job is the sum over kinds of commands times their cost; a
job's own updates (as many as with the fewest nodes measured, where no other worker races for it) are priced as
writes, every update beyond them as a losing claim (a conditional update that finds the job taken and writes
nothing).

No server here: the functions are pure, so the model can be checked on made-up numbers (tests/test_bench_scale.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: The opcounters kinds, in the order tables show them.
KINDS = ("insert", "query", "update", "delete", "getmore", "command")

#: Node counts the model predicts for (docs/scaling.md).
PREDICT_FOR = (10, 100, 1000)


@dataclass(frozen=True)
class Line:
    """``intercept + slope * nodes``."""

    intercept: float
    slope: float

    def at(self, nodes: float) -> float:
        return self.intercept + self.slope * nodes


def least_squares(points: Iterable[tuple[float, float]]) -> Line:
    """The straight line closest to ``points`` (x, y) in squared error; a flat line through one point."""
    pts = list(points)
    if not pts:
        raise ValueError("no points to fit")
    n = len(pts)
    mean_x = sum(x for x, _ in pts) / n
    mean_y = sum(y for _, y in pts) / n
    spread = sum((x - mean_x) ** 2 for x, _ in pts)
    if spread == 0:
        return Line(mean_y, 0.0)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in pts) / spread
    return Line(mean_y - slope * mean_x, slope)


@dataclass(frozen=True)
class Costs:
    """Server CPU milliseconds per command of each kind; ``lost_claim`` prices the update slope (see the module
    docstring)."""

    per_kind: Mapping[str, float]
    lost_claim: float


@dataclass(frozen=True)
class Model:
    """Commands per job of each kind as lines in the node count, and what they cost the server."""

    lines: Mapping[str, Line]
    costs: Costs | None = None
    #: Updates a job makes itself (its claim, its end): the updates per job measured with the fewest nodes.
    own_updates: float = 0.0

    @classmethod
    def fit(cls, measured: Mapping[int, Mapping[str, float]], costs: Costs | None = None) -> Model:
        """``measured``: node count -> commands per job of each kind (a missing kind counts 0)."""
        return cls(
            {kind: least_squares((n, float(m.get(kind, 0.0))) for n, m in sorted(measured.items())) for kind in KINDS},
            costs,
            float(measured[min(measured)].get("update", 0.0)) if measured else 0.0,
        )

    def commands(self, nodes: float) -> dict[str, float]:
        """Commands per job of each kind with ``nodes`` nodes (never below 0)."""
        return {kind: max(0.0, line.at(nodes)) for kind, line in self.lines.items()}

    def server_ms(self, nodes: float) -> float:
        """Server CPU milliseconds per job with ``nodes`` nodes; needs ``costs``."""
        if self.costs is None:
            raise ValueError("the model has no per-command costs")
        per_kind = self.costs.per_kind
        total = 0.0
        for kind, count in self.commands(nodes).items():
            if kind == "update":
                own = min(count, self.own_updates)
                total += own * per_kind.get(kind, 0.0) + (count - own) * self.costs.lost_claim
            else:
                total += count * per_kind.get(kind, 0.0)
        return total


def relative_error(predicted: float, measured: float) -> float:
    """(predicted - measured) / measured; 0 when both are 0, infinite when only the measurement is."""
    if measured == 0:
        return 0.0 if predicted == 0 else float("inf")
    return (predicted - measured) / measured


def total(commands: Mapping[str, float]) -> float:
    return sum(commands.get(kind, 0.0) for kind in KINDS)


@dataclass(frozen=True)
class Check:
    """How far the model is from the measurements it was fitted on (``in_sample``: node count -> relative error
    of all commands per job) and from the largest node count when fitted without it (``holdout``)."""

    in_sample: Mapping[int, float]
    holdout_nodes: int
    holdout: float
    #: Node count -> relative error of the predicted server CPU per job against the measured one (when given).
    server: Mapping[int, float]

    @property
    def worst(self) -> float:
        return max([abs(e) for e in self.in_sample.values()] + [abs(self.holdout)])


def check(
    measured: Mapping[int, Mapping[str, float]],
    costs: Costs | None = None,
    server_ms: Mapping[int, float] | None = None,
) -> Check:
    """The model fitted on ``measured`` checked against it (needs at least three node counts for the holdout):
    commands per job in sample, the largest count predicted from the others, and, with ``costs`` and the
    measured server CPU per job, the server work."""
    if len(measured) < 3:
        raise ValueError("need measurements at three node counts or more")
    model = Model.fit(measured, costs)
    in_sample = {n: relative_error(total(model.commands(n)), total(m)) for n, m in sorted(measured.items())}
    last = max(measured)
    rest = Model.fit({n: m for n, m in measured.items() if n != last})
    holdout = relative_error(total(rest.commands(last)), total(measured[last]))
    server = {}
    if costs is not None and server_ms:
        server = {n: relative_error(model.server_ms(n), ms) for n, ms in sorted(server_ms.items()) if n in measured}
    return Check(in_sample, last, holdout, server)
