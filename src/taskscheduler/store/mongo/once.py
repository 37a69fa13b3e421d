"""add_job_once keys: at most one active job per key, held in a small collection keyed by the key itself."""

from __future__ import annotations

from datetime import datetime

from bson import ObjectId
from pymongo.errors import DuplicateKeyError

from .connection import server_errors
from .deployment import Deployment
from .documents import SERVER_NOW, Document, literal


class OnceKeys(Deployment):
    """Who holds which add_job_once key."""

    def once_holder(self, key: str) -> Document | None:
        """Who holds an add_job_once key: ``{_id: key, job, since}``, or None."""
        with server_errors():
            return self.once.find_one({"_id": key})

    def take_once(
        self, key: str, job_id: ObjectId, holder: ObjectId | None, since: datetime | None = None
    ) -> bool:
        """Make ``job_id`` hold ``key`` if ``holder`` still holds it (None: nobody) and, with ``since``, still
        since then (so a caller acts on the hold it read, not one renewed meanwhile, as a requeue renews it); of
        racing callers one wins. ``since`` is the server's time, so a producer's clock never decides when a key
        counts as abandoned."""
        stage = {"job": literal(job_id), "since": SERVER_NOW, "inserted": literal(False)}
        query: Document = {"_id": key, "job": holder}
        if since is not None:
            query["since"] = since
        with server_errors():
            try:
                done = self.once.update_one(query, [{"$set": stage}], upsert=holder is None)
            except DuplicateKeyError:
                return False  # someone holds it now
        return done.modified_count == 1 or done.upserted_id is not None

    def confirm_once(self, key: str, job_id: ObjectId) -> bool:
        """The job holding ``key`` is stored; False when someone took the key over meanwhile."""
        with server_errors():
            done = self.once.update_one({"_id": key, "job": job_id}, {"$set": {"inserted": True}})
        return done.matched_count == 1

    def release_once(self, key: str, job_id: ObjectId) -> None:
        with server_errors():
            self.once.delete_one({"_id": key, "job": job_id})

