"""Benchmark 11 (scale-out): its model on made-up numbers, and one tiny run of the benchmark itself."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from taskscheduler.ops.embedded import EmbeddedServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))  # as run.py runs them

import scale_out  # noqa: E402
from scaling_model import KINDS, Costs, Model, check, least_squares  # noqa: E402


def linear(nodes: int, curve: float = 0.0) -> dict[str, float]:
    """Commands per job shaped as issue 22 measured them: a losing claim and 2.5 getMores per extra node."""
    return {
        "insert": 2.0,
        "query": 1.0,
        "update": 2.0 + 0.66 * (nodes - 1) + curve * nodes**2,
        "delete": 0.0,
        "getmore": 1.2 + 2.5 * nodes,
        "command": 0.05,
    }


def test_least_squares_finds_the_line_through_exact_points() -> None:
    line = least_squares([(1, 5.0), (2, 7.0), (4, 11.0), (8, 19.0)])
    assert line.intercept == pytest.approx(3.0)
    assert line.slope == pytest.approx(2.0)
    assert least_squares([(3, 4.0)]).slope == 0.0


def test_the_model_prices_a_jobs_own_updates_as_writes_and_the_rest_as_losing_claims() -> None:
    costs = Costs({"insert": 1.0, "query": 0.5, "update": 0.8, "delete": 0.0, "getmore": 0.3, "command": 0.1}, 0.2)
    model = Model.fit({n: linear(n) for n in (1, 2, 4, 8)}, costs)

    assert model.lines["update"].slope == pytest.approx(0.66)
    assert model.lines["getmore"].slope == pytest.approx(2.5)
    at_100 = model.commands(100)
    assert at_100["update"] == pytest.approx(2.0 + 0.66 * 99)
    assert at_100["getmore"] == pytest.approx(251.2)
    # Two own updates at 0.8, 65.34 losing claims at 0.2.
    expected = 2 * 1.0 + 1 * 0.5 + 2 * 0.8 + 0.66 * 99 * 0.2 + 251.2 * 0.3 + 0.05 * 0.1
    assert model.server_ms(100) == pytest.approx(expected)


def test_the_check_is_exact_on_straight_lines_and_shows_a_curve_in_the_holdout() -> None:
    straight = check({n: linear(n) for n in (1, 2, 4, 8)})
    assert straight.worst == pytest.approx(0.0, abs=1e-9)
    assert straight.holdout_nodes == 8

    curved = check({n: linear(n, curve=0.1) for n in (1, 2, 4, 8)})
    assert curved.holdout < -0.05  # a line through 1, 2 and 4 nodes falls short of a curve at 8
    assert curved.worst >= abs(curved.holdout)


def test_the_check_compares_server_work_when_given_it() -> None:
    costs = Costs(dict.fromkeys(KINDS, 1.0), 1.0)
    measured = {n: linear(n) for n in (1, 2, 4)}
    model = Model.fit(measured, costs)
    server = {n: model.server_ms(n) * 1.1 for n in measured}

    verdict = check(measured, costs, server)

    assert set(verdict.server) == {1, 2, 4}
    assert all(e == pytest.approx(1 / 1.1 - 1) for e in verdict.server.values())
    with pytest.raises(ValueError):
        check({1: linear(1), 2: linear(2)})


@pytest.mark.e2e
def test_a_tiny_scale_out_run_counts_every_kind_per_job(server: EmbeddedServer) -> None:
    result = scale_out.scale_out(
        server.uri, nodes=2, jobs=20, burst=10, database="bench_scale_smoke", idle_seconds=1.0
    )

    assert result["warm_workers"] == 2
    assert result["insert"] >= 1.0  # each job's own insert, whatever else is written
    assert result["update"] >= 2.0  # a claim and an end per job at least
    assert result["getmore"] > 0 and result["burst_getmore"] > 0
    assert 0 < result["start_p50"] <= result["start_p99"] < 10_000
    assert result["server_ms"] > 0  # the session's server is this process's child: its CPU is read
    assert {f"idle_{kind}" for kind in KINDS} <= set(result)


@pytest.mark.e2e
def test_command_costs_time_each_kind_against_the_server(server: EmbeddedServer) -> None:
    costs = scale_out.command_costs(server.uri, fill=5, repeat=20)

    assert costs["server_cpu"] == 1.0
    names = ("insert", "claim", "lost_claim", "end", "find_and_modify", "query", "delete", "getmore", "command")
    assert all(costs[name] > 0 and costs[f"rtt_{name}"] > 0 for name in names)
    assert 0 < costs["changes_per_getmore"] <= 1.0  # one change per getMore, as a paced node reads them
    assert costs["documents"] == 5 + 2 * 20
