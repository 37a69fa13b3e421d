"""Clients, and what a driver error means to us: the one place that turns "cannot reach the server" into
ServerUnavailableError (every read and write of the store runs inside :func:`server_errors`)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

from pymongo import MongoClient
from pymongo.database import Database
from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError, ServerSelectionTimeoutError

from ...errors import ConfigurationError, InvalidArgumentError, ServerUnavailableError
from ...redact import redact_uri, scrub
from .documents import Document


def connect(uri: str, database: str, timeout_ms: int = 10_000) -> Database[Document]:
    """A new client (one per process: never share a MongoClient across fork) and its database."""
    if not isinstance(database, str) or not database or any(c in database for c in '/\\. "$\0') or len(database) > 63:
        raise InvalidArgumentError(f'invalid database name {database!r}: 1 to 63 characters, none of / \\ . space " $')
    try:
        client: MongoClient[Document] = MongoClient(uri, serverSelectionTimeoutMS=timeout_ms, tz_aware=True)
    except (PyMongoError, ValueError, TypeError, OSError) as exc:
        # pymongo raises ValueError for a bad host or port, OSError for an unreadable TLS file. The driver's
        # error is not chained: no message or traceback may show the URI's password.
        raise InvalidArgumentError(
            f"invalid MongoDB URI {redact_uri(uri)!r}: {scrub(first_line(exc), uri)}"
        ) from None
    return client[database]


def sync_twin(db: Any) -> Database[Document]:
    """The synchronous twin of a ``pymongo.asynchronous.database.AsyncDatabase``: a new MongoClient with the
    async client's own settings (hosts, credentials, TLS, timeouts...) and the same database options."""
    try:
        from pymongo.asynchronous.database import AsyncDatabase
    except ImportError:  # pragma: no cover - pymongo < 4.13
        raise ConfigurationError("AsyncScheduler needs pymongo >= 4.13 (its AsyncMongoClient)") from None
    if not isinstance(db, AsyncDatabase):
        raise InvalidArgumentError(f"db must be a pymongo AsyncDatabase, got {type(db).__name__}")
    # The one private attribute read in src/: pymongo offers no public way to get an AsyncMongoClient's settings
    # (its credentials and TLS context are private), and asking the caller for a URI would break the SPEC's
    # AsyncScheduler(db) signature. A pymongo without it gets a clear ConfigurationError below.
    settings = getattr(db.client, "_init_kwargs", None)
    if not isinstance(settings, dict):  # pragma: no cover - a pymongo that no longer keeps them
        raise ConfigurationError("cannot read the AsyncMongoClient's settings; build AsyncScheduler on pymongo 4.13+")
    client: MongoClient[Document] = MongoClient(**{**settings, "connect": False})
    return client.get_database(
        db.name,
        codec_options=db.codec_options,
        read_preference=db.read_preference,
        write_concern=db.write_concern,
        read_concern=db.read_concern,
    )


@contextlib.contextmanager
def server_errors() -> Iterator[None]:
    """Turns 'cannot reach the server' into ServerUnavailableError; other driver errors pass through."""
    try:
        yield
    except (ServerSelectionTimeoutError, ConnectionFailure) as exc:
        raise ServerUnavailableError(f"cannot reach MongoDB: {first_line(exc)}{_set_name_hint(exc)}") from exc
    except OperationFailure as exc:
        if exc.code in (13, 18):  # Unauthorized, AuthenticationFailed: the deployment will not serve us
            raise ConfigurationError(
                f"MongoDB refused access: {first_line(exc)} (check the URI's credentials)"
            ) from exc
        raise


def _set_name_hint(exc: BaseException) -> str:
    """What to check when no server of the replica set the URI names was found: the driver drops servers of
    another set from its view without a word, so the operator cannot tell a wrong name from a dead set."""
    found = re.search(r'for replica set name "([^"]*)"', str(exc))
    if found is None:
        return ""
    return (
        f" (found no member of a set named {found.group(1)!r}: check replicaSet= in the URI; the"
        " embedded server of `taskscheduler server` is a set named 'secantus': use the URI it prints)"
    )


def first_line(exc: BaseException) -> str:
    """The useful start of a driver message (without its topology description, which runs over lines)."""
    text = str(exc).split(", Timeout:")[0].split(" (configured timeouts")[0]
    return text.splitlines()[0] if text else type(exc).__name__
