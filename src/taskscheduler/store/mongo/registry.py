"""The node registry: one entry per live queue node, alive on the server's clock."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bson import ObjectId
from pymongo import ASCENDING

from .connection import server_errors
from .deployment import Deployment
from .documents import SERVER_NOW, Document, lease_end, literal


class NodeRegistry(Deployment):
    """Registering, refreshing and listing queue nodes."""

    def register_node(self, node_id: ObjectId, facts: Mapping[str, Any], lifetime: float) -> None:
        """Write (or refresh) a queue node's registry entry, alive on the server's clock for ``lifetime`` s."""
        stage = {**{name: literal(value) for name, value in facts.items()}, "alive": SERVER_NOW}
        stage["expires"] = lease_end(lifetime)
        with server_errors():
            self.nodes.update_one({"_id": node_id}, [{"$set": stage}], upsert=True)

    def unregister_node(self, node_id: ObjectId) -> None:
        with server_errors():
            self.nodes.delete_one({"_id": node_id})

    def node_entries(self, fields: tuple[str, ...]) -> list[Document]:
        """``fields`` of every registry entry not yet expired, on the server's clock as :attr:`clock` reads it (no
        command of its own): what a queue node reads every heartbeat to know its peers."""
        now = self.clock.now()
        with server_errors():
            return list(self.nodes.find({"expires": {"$gt": now}}, dict.fromkeys(fields, 1)))

    def live_nodes(self) -> list[Document]:
        """Registry entries not yet expired on the server's clock (TTL deletes them only every minute)."""
        now = self.server_time()
        with server_errors():
            return list(self.nodes.find({"expires": {"$gt": now}}).sort("started", ASCENDING))

