"""The MongoDB store: every part (collections, room ledger, jobs, events, add_job_once keys, node registry,
operator reads, the dashboard's trends, change streams) in one object, and what needs them all (flush, close)."""

from __future__ import annotations

from ...errors import ConfigurationError
from .connection import server_errors
from .events import EventLog
from .feeds import Feeds
from .flow import FlowControls
from .jobs import JobWrites
from .ledger import ROOM_ATTEMPTS, ROOM_EXIT_SECONDS
from .once import OnceKeys
from .reads import OperatorReads
from .registry import NodeRegistry
from .trends import TrendReads


class Store(JobWrites, EventLog, OnceKeys, NodeRegistry, OperatorReads, TrendReads, Feeds, FlowControls):
    """Collections, indexes and every read and write of jobs and events, on MongoDB."""

    def close(self) -> None:
        """Give back the room this producer reserved and did not use, then close the client this store's database
        belongs to (its owner is done with it)."""
        self.give_back(ROOM_EXIT_SECONDS)  # bounded: this may run from a finalizer
        self.db.client.close()

    def flush(self) -> None:
        """Drop jobs and events, then create them again so running queue nodes keep a valid collection.

        A node or worker writing in the moment between the drop and the create makes the server create the
        collection itself, as an ordinary one (neither capped nor expiring): such a collection is dropped and
        created again, as configured.

        The room ledger stays: producers in other processes may still spend room they reserved before the flush,
        and their grants keep it counted. The dropped jobs' bytes are given back by reconciling the ledger with
        the new, empty collection (see _reconcile).
        """
        for _ in range(5):
            with server_errors():
                self.jobs.drop()
                self.events.drop()
                self.once.drop()
            self._ready = False
            self.ensure()
            if (not self.job_queue_size or self._capped_size(self.job_queue)) and (
                not self.event_queue_size or self._capped_size(self.event_queue)
            ):
                break
        else:
            raise ConfigurationError("flush: the job or event collection keeps being created uncapped by writers")
        for _ in range(ROOM_ATTEMPTS):  # until no producer's reservation races the correction
            with server_errors():
                ledger = self.room.find_one({"_id": "used"})
            if not self._cap or ledger is None or not self._reconcile(int(ledger["bytes"]), self._cap).corrected:
                return

