"""Flow controls of a job queue (SPEC 8), in a small ordinary collection ``<job_queue>.flow`` keyed by ``_id``:

- ``{_id: "pause:<key>", kind: "pause", key, since}``: no new run under ``key`` starts;
- ``{_id: "limit:<key>", kind: "limit", key, concurrency, rate: {count, seconds} | None, holders, starts}``: at
  most ``concurrency`` runs under ``key`` at once (``holders``: one ``{job, worker, since}`` per run holding a
  slot), at most ``rate.count`` starts in any ``rate.seconds`` (``starts``: the last ``rate.count`` starts).

A slot is taken in one conditional update (a pipeline on the limit's document, on the server's clock) and given
back when its run ends; a holder whose run died is dropped by the next worker that finds the limit full (its
job is no longer running under it), so a slot is never leaked. Shard key, on a sharded cluster: ``_id``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from bson import ObjectId
from pymongo import ReturnDocument
from pymongo.errors import OperationFailure

from ...constants import JobStatus
from .connection import server_errors
from .deployment import Deployment
from .documents import Document, literal, utcnow

logger = logging.getLogger("taskscheduler.store")


class FlowControls(Deployment):
    def _start(self) -> None:
        super()._start()
        self.flow = self.db.get_collection(f"{self.job_queue}.flow")

    def flow_controls(self) -> list[Document]:
        """Every pause and limit."""
        with server_errors():
            return list(self.flow.find({}))

    def set_pause(self, key: str) -> None:
        with server_errors():
            self.flow.update_one(
                {"_id": f"pause:{key}"},
                {"$set": {"kind": "pause", "key": key}, "$setOnInsert": {"since": utcnow()}},
                upsert=True,
            )

    def remove_pause(self, key: str) -> bool:
        with server_errors():
            return self.flow.delete_one({"_id": f"pause:{key}"}).deleted_count == 1

    def set_limit(self, key: str, concurrency: int | None, rate: Mapping[str, Any] | None) -> None:
        """Create or change a limit; the runs holding its slots and its recent starts are kept (as arrays: one that
        is not, written by hand, is started afresh, so setting a limit again repairs a broken one)."""
        kept = {name: {"$cond": [{"$isArray": f"${name}"}, f"${name}", []]} for name in ("holders", "starts")}
        fields = {"kind": "limit", "key": key, "concurrency": concurrency, "rate": rate}
        with server_errors():
            self.flow.update_one(
                {"_id": f"limit:{key}"},
                [{"$set": {**{name: literal(value) for name, value in fields.items()}, **kept}}],
                upsert=True,
            )

    def count_running_runs(self, key: str) -> int:
        """Give the runs PROCESSING under ``key`` now (its class or ``limit_key``) a slot of its limit each, if they
        hold none: a limit set while they run counts them. Returns how many were added."""
        query = {"status": int(JobStatus.PROCESSING), "$or": [{"class": key}, {"options.limit_key": key}]}
        added = 0
        with server_errors():
            running = list(self.jobs.find(query, {"worker": 1}))
            for doc in running:
                holder = {"job": doc["_id"], "worker": doc.get("worker"), "since": self.clock.now()}
                result = self.flow.update_one(
                    {"_id": f"limit:{key}", "holders": {"$type": "array"}, "holders.job": {"$ne": doc["_id"]}},
                    {"$push": {"holders": holder}},
                )
                if not result.modified_count:
                    continue
                # The run may have ended (and its worker given its slots back) between the read and the push: then
                # nobody would give this one back. Looked at again after the push, so no end slips between.
                still = self.jobs.find_one(
                    {"_id": doc["_id"], "status": int(JobStatus.PROCESSING), "worker": holder["worker"]}, {"_id": 1}
                )
                if still is None:
                    self.flow.update_one(
                        {"_id": f"limit:{key}"}, {"$pull": {"holders": {"job": doc["_id"], "worker": holder["worker"]}}}
                    )
                    continue
                added += 1
        return added

    def remove_limit(self, key: str) -> bool:
        with server_errors():
            return self.flow.delete_one({"_id": f"limit:{key}"}).deleted_count == 1

    def take_slot(self, key: str, job_id: ObjectId, worker: ObjectId) -> bool:
        """Take a slot of the limit on ``key`` for this run, if the limit allows a start now (on the server's
        clock); True when the run holds one (also when it did already). No limit on ``key``: True."""
        holder = {"job": job_id, "worker": worker}
        # The server's clock as this process reads it, as a literal: some servers compare $$NOW oddly with
        # stored dates, and every time in this document is written so.
        now = literal(self.clock.now())
        window_start = {"$subtract": [now, {"$multiply": [{"$ifNull": ["$rate.seconds", 0]}, 1000]}]}
        recent = {"$size": {"$filter": {"input": "$starts", "cond": {"$gt": ["$$this", window_start]}}}}
        # Only a limit as this library writes it is one (see core.flow): the node never asks for another.
        # This worker's own slot for the job: two workers handed the same job (two nodes) hold one each until one
        # claim wins, so the loser's giving back never frees the winner's.
        mine = {"$and": [{"$eq": ["$$this.job", literal(job_id)]}, {"$eq": ["$$this.worker", literal(worker)]}]}
        held = {"$gt": [{"$size": {"$filter": {"input": "$holders", "cond": mine}}}, 0]}
        allows = {
            "$and": [
                {
                    "$or": [
                        {"$eq": [{"$ifNull": ["$concurrency", None]}, None]},
                        {"$lt": [{"$size": "$holders"}, "$concurrency"]},
                    ]
                },
                {"$or": [{"$eq": [{"$ifNull": ["$rate", None]}, None]}, {"$lt": [recent, "$rate.count"]}]},
            ]
        }
        pipeline: list[Document] = [
            {"$set": {"_take": {"$and": [{"$not": [held]}, allows]}}},
            {
                "$set": {
                    "holders": {
                        "$cond": [
                            "$_take",
                            {
                                "$concatArrays": [
                                    "$holders",
                                    [{**{k: literal(v) for k, v in holder.items()}, "since": now}],
                                ]
                            },
                            "$holders",
                        ]
                    },
                    "starts": {
                        "$cond": [
                            {"$and": ["$_take", {"$ne": [{"$ifNull": ["$rate", None]}, None]}]},
                            {
                                "$slice": [
                                    {"$concatArrays": ["$starts", [now]]},
                                    {"$multiply": ["$rate.count", -1]},
                                ]
                            },
                            "$starts",
                        ]
                    },
                }
            },
            {"$unset": "_take"},
        ]
        try:
            with server_errors():
                after = self.flow.find_one_and_update(
                    {"_id": f"limit:{key}"}, pipeline, projection={"holders": 1}, return_document=ReturnDocument.AFTER
                )
        except OperationFailure as exc:  # a limit document the server cannot evaluate (written by hand): none
            logger.warning("the limit on %r is not one this library wrote, and limits nothing: %s", key, exc)
            return True
        if after is None:
            return True
        holders = after.get("holders")
        holders = holders if isinstance(holders, list) else []
        return any(isinstance(h, Mapping) and (h.get("job"), h.get("worker")) == (job_id, worker) for h in holders)

    def free_slots(self, keys: Iterable[str], job_id: ObjectId, worker: ObjectId | None = None) -> None:
        """The run of ``job_id`` (by ``worker``, when given) holds no slot of these limits any more."""
        holder: Document = {"job": job_id} if worker is None else {"job": job_id, "worker": worker}
        ids = [f"limit:{key}" for key in keys]
        if not ids:
            return
        with server_errors():
            self.flow.update_many({"_id": {"$in": ids}}, {"$pull": {"holders": holder}})

    def limit_holders(self, key: str) -> list[Any]:
        """The holders of the limit on ``key`` as stored (a hostile entry is returned as it is, to be dropped)."""
        with server_errors():
            doc = self.flow.find_one({"_id": f"limit:{key}"}, {"holders": 1})
        holders = (doc or {}).get("holders")
        return list(holders) if isinstance(holders, list) else []

    def drop_holders(self, key: str, holders: Iterable[Any]) -> None:
        """Drop these holders from the limit on ``key``, each by its stored value."""
        with server_errors():
            for holder in holders:  # a few, rarely: one $pull each
                self.flow.update_one(
                    {"_id": f"limit:{key}", "holders": {"$type": "array"}}, {"$pull": {"holders": holder}}
                )
