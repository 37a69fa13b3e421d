"""How much the dashboard serves at once, and how long it waits when stopping."""

from __future__ import annotations

#: Seconds uvicorn gives open live streams (server-sent events never end by themselves) when stopping.
SHUTDOWN_SECONDS = 1
#: Live streams (open pages) served at once by default (``dashboard --max-streams``); beyond, a page gets 503 and
#: tries again later. Each costs a connection and a share of every change's fan-out: 2,000 idle ones slowed every
#: other request to seconds.
MAX_STREAMS = 100
#: Connections served at once besides the live streams: uvicorn answers 503 at once beyond ``max_streams`` plus
#: this (its ``limit_concurrency``), instead of letting a flood slow every request.
REQUEST_ROOM = 50
