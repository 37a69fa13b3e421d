"""What applications import: the Scheduler, the Process handle of a job, job base classes, the asyncio API."""
