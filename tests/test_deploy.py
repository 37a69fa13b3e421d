"""docker-compose.yml cannot run here (no Docker engine): check that it is valid and complete."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_compose_has_replica_set_and_two_queue_nodes() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    members = [name for name, s in services.items() if "--replSet" in s.get("command", [])]
    assert len(members) == 3
    init = " ".join(services["mongo-init"]["command"])
    assert "rs.initiate" in init and all(f"{m}:27017" in init for m in members)
    queues = [s for s in services.values() if s.get("build") == "."]
    assert len(queues) == 2
    for q in queues:
        assert q["command"][:2] == ["taskscheduler", "queue"]
        assert "replicaSet=rs0" in q["environment"]["TASKSCHEDULER_MONGODB_URI"]
    assert (ROOT / "Dockerfile").exists()


def test_systemd_unit_runs_the_queue() -> None:
    unit = (ROOT / "examples/deploy/taskscheduler-queue.service").read_text()
    assert "ExecStart=" in unit and "taskscheduler queue" in unit and "KillSignal=SIGTERM" in unit
