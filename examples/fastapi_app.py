"""A FastAPI application that adds jobs and streams their progress, on AsyncScheduler (no blocking calls).

    pip install -r examples/requirements-fastapi.txt
    taskscheduler queue --import examples.fastapi_app
    uvicorn examples.fastapi_app:app

`POST /jobs` with `{"steps": 5}` adds a job and answers its id; `GET /jobs/{id}` shows it; `GET
/jobs/{id}/progress` streams server-sent events (`data: {"status": ..., "progress": ...}`) until the job ends.
The node imports this module for the job class only: FastAPI is imported when the app is built.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from taskscheduler import AbstractJob, AsyncScheduler, JobStatus

MODULE = "examples.fastapi_app"


class Countdown(AbstractJob):
    def start(self) -> str:
        steps = int(self.data.get("steps", 5))
        for step in range(1, steps + 1):
            time.sleep(float(self.data.get("pause", 0.2)))
            self.update_progress(step * 100 / steps)
        return f"counted {steps} steps"


def create_app() -> Any:
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import StreamingResponse
    from pymongo import AsyncMongoClient

    from taskscheduler.errors import InvalidArgumentError, JobNotFoundError

    state: dict[str, AsyncScheduler] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        uri = os.environ.get("TASKSCHEDULER_MONGODB_URI", "mongodb://127.0.0.1:27017/?directConnection=true")
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri, tz_aware=True)
        async with AsyncScheduler(client[os.environ.get("TASKSCHEDULER_DATABASE", "taskscheduler")]) as scheduler:
            state["scheduler"] = scheduler
            yield
        await client.close()

    app = FastAPI(lifespan=lifespan)

    async def job(job_id: str) -> Any:
        try:
            return await state["scheduler"].get_job(job_id)
        except (JobNotFoundError, InvalidArgumentError) as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None

    @app.post("/jobs")
    async def add(body: dict[str, Any]) -> dict[str, str]:
        try:
            process = await state["scheduler"].add_job(f"{MODULE}:Countdown", {"steps": int(body.get("steps", 5))})
        except (InvalidArgumentError, ValueError, TypeError) as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        return {"id": str(process.id)}

    @app.get("/jobs/{job_id}")
    async def show(job_id: str) -> dict[str, Any]:
        process = await job(job_id)
        return dict(process.to_dict(), result=process.result, error=process.error)

    @app.get("/jobs/{job_id}/progress")
    async def progress(job_id: str) -> StreamingResponse:
        process = await job(job_id)

        async def events() -> AsyncIterator[str]:
            last = None
            while True:
                now = (process.status.name, process.progress)
                if now != last:  # one event per change of status or progress
                    last = now
                    yield f"data: {json.dumps({'status': now[0], 'progress': now[1]})}\n\n"
                if process.status.is_terminal:
                    return
                await asyncio.sleep(0.2)  # progress writes are rate limited too; a refresh is one indexed read
                await process.refresh()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def __getattr__(name: str) -> Any:
    """``examples.fastapi_app:app`` for uvicorn, built on first use (a queue node never needs FastAPI)."""
    if name == "app":
        app = create_app()
        globals()["app"] = app
        return app
    raise AttributeError(name)


__all__ = ["Countdown", "JobStatus", "create_app"]
