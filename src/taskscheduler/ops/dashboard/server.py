"""uvicorn's server for the dashboard (imported only once the extra ``dashboard`` is known to be installed)."""

from __future__ import annotations

from collections.abc import Callable
from types import FrameType

import uvicorn


class Server(uvicorn.Server):
    """A uvicorn server that, told to exit (SIGINT/SIGTERM), first ends the live streams: server-sent events
    never end by themselves, and uvicorn would otherwise wait for them, then cancel them with an error and
    tracebacks. ``on_exit`` must not block (it runs in the signal handler)."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], object]) -> None:
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.on_exit()
        super().handle_exit(sig, frame)
