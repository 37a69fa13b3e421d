"""What a job is: JobInterface, AbstractJob, a plain function run as a job, ``current_job()``, and how a job
class (or function) is named and imported."""

from __future__ import annotations

import importlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TypeAlias

from bson import ObjectId

from .errors import InvalidArgumentError, InvalidJobError

if TYPE_CHECKING:
    from .scheduler import Scheduler


class JobInterface(ABC):
    """The contract of a job: the worker sets ``data``, ``id`` and ``scheduler``, then calls ``start()``."""

    data: Any
    id: ObjectId
    scheduler: Scheduler

    @abstractmethod
    def start(self) -> Any:
        """Do the work. An uncaught exception fails the job; a BSON-encodable return value is its result."""

    @abstractmethod
    def update_progress(self, progress: float | None = None) -> None:
        """Record progress (0..100) and show the job is alive; ``None`` keeps the stored progress."""


class AbstractJob(JobInterface):
    """Base class for jobs: subclass it and implement ``start()``."""

    def __init__(self) -> None:
        self.data: Any = None
        self.id: ObjectId = ObjectId()
        self.scheduler: Scheduler  # set by the worker before start()

    def update_progress(self, progress: float | None = None) -> None:
        self.scheduler.update_progress(self.id, progress)

    # Upstream-style accessors, so code ported from the PHP library reads the same.
    def set_data(self, data: Any) -> AbstractJob:
        self.data = data
        return self

    def get_data(self) -> Any:
        return self.data

    def set_id(self, job_id: ObjectId) -> AbstractJob:
        self.id = job_id
        return self

    def get_id(self) -> ObjectId:
        return self.id

    def set_scheduler(self, scheduler: Scheduler) -> AbstractJob:
        self.scheduler = scheduler
        return self


class FunctionJob(AbstractJob):
    """A plain module-level function ``f(data)`` run as a job: ``start()`` calls it with the job's data, and
    inside it ``current_job()`` offers what ``self`` offers a class."""

    def __init__(self, function: Callable[[Any], Any]) -> None:
        super().__init__()
        self.function = function

    def start(self) -> Any:
        return self.function(self.data)


#: What a stored job name resolves to: a job class, or a function run through FunctionJob.
JobTarget: TypeAlias = "type[JobInterface] | Callable[[Any], Any]"

_current: ContextVar[JobInterface | None] = ContextVar("taskscheduler_current_job", default=None)


def current_job() -> JobInterface | None:
    """The job running in this worker (its ``id``, ``data``, ``scheduler`` and ``update_progress``), or None
    outside a job. Works in a function job, in a class's ``start()``, and in the coroutine of an async one."""
    return _current.get()


def set_current_job(job: JobInterface | None) -> Any:
    """Make ``job`` the one ``current_job()`` returns; returns the token that ``reset_current_job`` takes."""
    return _current.set(job)


def reset_current_job(token: Any) -> None:
    _current.reset(token)


def is_job_function(target: Any) -> bool:
    """A function (sync or async) that can run as a job: not a lambda, and not a generator, whose body would
    only run when someone iterates it."""
    return (
        inspect.isfunction(target)
        and target.__name__ != "<lambda>"
        and not inspect.isgeneratorfunction(target)
        and not inspect.isasyncgenfunction(target)
    )


def class_path(job_class: type | Callable[..., Any] | str) -> str:
    """The stored name of a job class or function: ``"module:QualName"`` (a string is kept, dotted ones
    normalised)."""
    if is_job_function(job_class):
        function: Any = job_class
        if "<locals>" in function.__qualname__ or "." in function.__qualname__:
            raise InvalidArgumentError(
                f"job function {function.__qualname__} must be defined at module level, not inside a function or class"
            )
        return _importable(f"{function.__module__}:{function.__qualname__}")
    if callable(job_class) and not isinstance(job_class, (type, str)):
        raise InvalidArgumentError(
            f"a job must be a JobInterface class or a module-level function (not a lambda, generator, method or "
            f"builtin), got {job_class!r}"
        )
    if isinstance(job_class, type):
        if not issubclass(job_class, JobInterface):
            raise InvalidArgumentError(f"job class {job_class.__qualname__} must implement taskscheduler.JobInterface")
        if "<locals>" in job_class.__qualname__:
            raise InvalidArgumentError(
                f"job class {job_class.__qualname__} must be importable, not defined in a function"
            )
        return _importable(f"{job_class.__module__}:{job_class.__qualname__}")
    if not isinstance(job_class, str) or not job_class.strip() or job_class != job_class.strip():
        raise InvalidArgumentError(f"job class must be a class or a 'module:QualName' string, got {job_class!r}")
    if ":" not in job_class and "." in job_class:
        try:
            return class_path(load_job_class(job_class))
        except (InvalidJobError, InvalidArgumentError):
            return _importable(job_class)  # not importable here; the worker decides
    return _importable(job_class)


def _importable(path: str) -> str:
    if path.split(":")[0].split(".")[0] == "__main__":
        raise InvalidArgumentError(
            f"job class {path!r} is defined in __main__ (the script you ran), which no worker can import: "
            "move it into a module of its own and import it from there"
        )
    return path


def serves(path: str, modules: Iterable[str]) -> bool:
    """Whether a stored class name lies in one of ``modules`` (or their submodules): a node's allow-list."""
    module = path.partition(":")[0] if ":" in path else path
    return any(module == m or module.startswith(m + ".") for m in modules)


def load_job_class(path: str, allowed: Iterable[str] | None = None) -> JobTarget:
    """Import ``"module:QualName"`` or ``"module.QualName"`` (a job class or a job function); InvalidJobError when
    that fails. With ``allowed`` (a node's allow-list), nothing outside those modules is ever imported."""
    modules = None if allowed is None else tuple(allowed)
    if modules is not None and not serves(path, modules):
        raise InvalidJobError(f"job class {path!r} is outside this node's allowed modules ({', '.join(modules)})")
    candidates: list[tuple[str, str]]
    if ":" in path:
        module, _, qualname = path.partition(":")
        candidates = [(module, qualname)]
    else:
        parts = path.split(".")
        candidates = [(".".join(parts[:i]), ".".join(parts[i:])) for i in range(len(parts) - 1, 0, -1)]
        if modules is not None:
            candidates = [c for c in candidates if serves(c[0], modules)]
    problem = "it names no module"
    for module_name, qualname in candidates:
        try:
            target: Any = importlib.import_module(module_name)
        except Exception as exc:  # a broken module must fail the job, not the worker
            problem = f"{type(exc).__name__}: {exc}"
            continue
        try:
            for attr in qualname.split("."):
                target = getattr(target, attr)
        except AttributeError:
            problem = f"module {module_name!r} has no attribute {qualname!r}"
            continue
        if is_job_function(target):
            # Only a function defined in the module named, at its top level: walking attributes must not reach
            # a function the module merely imported (os.system) or a method of one of its classes.
            if target.__module__ != module_name or "." in qualname:
                raise InvalidJobError(
                    f"job {path!r} names a function that is not defined at the top level of module {module_name!r}"
                )
            function: Callable[[Any], Any] = target
            return function
        if not isinstance(target, type) or not issubclass(target, JobInterface):
            raise InvalidJobError(f"job class {path!r} does not implement taskscheduler.JobInterface")
        return target
    raise InvalidJobError(f"job class {path!r} cannot be imported: {problem}")
