"""What a job is: JobInterface, AbstractJob, a plain function run as a job, ``current_job()``, and how a job
class (or function) is named and imported."""

from __future__ import annotations

import importlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from types import ModuleType
from typing import Any, Protocol, TypeAlias

from bson import ObjectId

from ..errors import InvalidArgumentError, InvalidJobError
from .process import Process


class JobScheduler(Protocol):
    """The Scheduler as a job's code uses it (``self.scheduler``): the worker sets the one it runs the job with
    (a :class:`taskscheduler.Scheduler`), whose other methods are there too."""

    def add_job(
        self, job_class: type | str, data: Any = None, options: Mapping[str, Any] | None = None, **kw: Any
    ) -> Process: ...

    def add_job_once(
        self, job_class: type | str, data: Any = None, options: Mapping[str, Any] | None = None, **kw: Any
    ) -> Process: ...

    def get_job(self, job_id: ObjectId) -> Process: ...

    def get_jobs(self, query: Mapping[str, Any] | None = None) -> Iterator[Process]: ...

    def cancel_job(self, job_id: ObjectId) -> None: ...

    def update_progress(self, job_id: ObjectId, progress: float | None = None) -> None: ...

    def wait_for(self, processes: Iterable[Process], options: int = 0, timeout: float | None = None) -> None: ...


class JobInterface(ABC):
    """The contract of a job: the worker sets ``data``, ``id`` and ``scheduler``, then calls ``start()``."""

    data: Any
    id: ObjectId
    scheduler: JobScheduler

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
        self.scheduler: JobScheduler  # set by the worker before start()

    def update_progress(self, progress: float | None = None) -> None:
        self.scheduler.update_progress(self.id, progress)

    def dependencies(self) -> list[Process]:
        """The jobs this one depends on (option ``depends_on``), in the order given, to read their results (all
        ended DONE, or this job would not run)."""
        ids = self.scheduler.get_job(self.id).options.get("depends_on") or []
        return [self.scheduler.get_job(job_id) for job_id in ids]

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

    def set_scheduler(self, scheduler: JobScheduler) -> AbstractJob:
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


def split_name(path: object) -> tuple[str, str]:
    """The module and qualified name a job name stands for, read without importing anything.

    ``"pkg.mod:Outer.Inner"`` is exact. In the dotted form the last segment is the class or function:
    ``"pkg.mod.Job"`` is ``("pkg.mod", "Job")`` (a nested class needs the colon form). A bare ``"name"`` (as
    upstream's tests use) has no module: it is stored as given, and no node serves it. Every segment is a Python
    identifier, none starts with ``_`` (no ``pkg.__main__``, ``pkg.__init__``, dunder attributes or private
    names: nodes never run them), so a stored name can never carry a newline or markup into a log or terminal.
    InvalidArgumentError when ``path`` is not such a name.
    """
    if not isinstance(path, str):
        raise InvalidArgumentError(f"a job name must be a string, got {type(path).__name__}")
    module, _, qualname = path.partition(":") if ":" in path else path.rpartition(".")
    segments = [*(module.split(".") if module or ":" in path else []), *qualname.split(".")]
    if not all(segment.isidentifier() for segment in segments):
        raise InvalidArgumentError(
            f"job name {path!r} is not 'module:QualName' (Python identifiers joined by dots, one colon)"
        )
    if segments[0] == "__main__":
        raise InvalidArgumentError(
            f"job class {path!r} is defined in __main__ (the script you ran), which no worker can import: "
            "move it into a module of its own and import it from there"
        )
    private = next((segment for segment in segments if segment.startswith("_")), None)
    if private is not None:
        raise InvalidArgumentError(
            f"job name {path!r} has the segment {private!r}: nodes never run a name with a segment starting with '_'"
        )
    return module, qualname


def class_path(job_class: type | Callable[..., Any] | str) -> str:
    """The stored name of a job class or function: ``"module:QualName"``. A string is checked and normalised
    (see :func:`split_name`) but never imported: a producer need not have the job's code, and naming a module
    must not run it."""
    if is_job_function(job_class):
        function: Any = job_class
        if "<locals>" in function.__qualname__ or "." in function.__qualname__:
            raise InvalidArgumentError(
                f"job function {function.__qualname__} must be defined at module level, not inside a function or class"
            )
        return _stored(f"{function.__module__}:{function.__qualname__}")
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
        return _stored(f"{job_class.__module__}:{job_class.__qualname__}")
    if not isinstance(job_class, str):
        raise InvalidArgumentError(f"job class must be a class or a 'module:QualName' string, got {job_class!r}")
    return _stored(job_class)


def _stored(path: str) -> str:
    module, qualname = split_name(path)
    return f"{module}:{qualname}" if module else qualname


def serves(path: object, modules: Iterable[str]) -> bool:
    """Whether a stored job name lies in one of ``modules`` (or their submodules): a node's allow-list. Only the
    module part is read (as :func:`split_name` splits it), so a malformed name under a served module is claimed
    by that node and failed by its worker (InvalidJobError) instead of waiting for ever; a name that is not a
    string, or has no module, is served by no node."""
    if not isinstance(path, str):
        return False
    module = path.partition(":")[0] if ":" in path else path.rpartition(".")[0]
    return bool(module) and any(module == m or module.startswith(m + ".") for m in modules)


def load_job_class(path: str, allowed: Iterable[str] | None = None) -> JobTarget:
    """Import the job class or function a stored name names; InvalidJobError when that fails. With ``allowed``
    (a node's allow-list), nothing outside those modules is ever imported.

    The name must be that of the object itself: the class or function found must have been defined in the named
    module (its ``__module__``) under exactly the named qualified name (its ``__qualname__``). A class or function
    an allowed module merely imported, re-exported or holds under another name (``allowed:os.system``,
    ``allowed:Alias``), or a module reached through an attribute, is refused: the allow-list is by the module
    that defines the code, not by the module it is reached through.
    """
    try:
        module_name, qualname = split_name(path)
    except InvalidArgumentError as exc:
        raise InvalidJobError(str(exc)) from None
    if not module_name:
        raise InvalidJobError(f"job name {path!r} names no module")
    modules = None if allowed is None else tuple(allowed)
    if modules is not None and not serves(f"{module_name}:{qualname}", modules):
        raise InvalidJobError(f"job class {path!r} is outside this node's allowed modules ({', '.join(modules)})")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # a broken module must fail the job, not the worker
        raise InvalidJobError(f"job class {path!r} cannot be imported: {type(exc).__name__}: {exc}") from None
    for attr in qualname.split("."):
        # Read from the namespace itself, not with getattr: no module __getattr__, descriptor or metaclass hook
        # runs, and nothing is inherited (a nested class is in the __dict__ of the class that defines it).
        namespace = vars(target) if isinstance(target, (ModuleType, type)) else {}
        if attr not in namespace:
            raise InvalidJobError(f"job class {path!r} cannot be imported: module {module_name!r} has no {qualname!r}")
        target = namespace[attr]
    if not is_job_function(target) and not isinstance(target, type):
        raise InvalidJobError(f"job {path!r} names neither a job class nor a job function")
    defined = f"{target.__module__}:{target.__qualname__}"
    if defined != f"{module_name}:{qualname}":
        raise InvalidJobError(
            f"job {path!r} names {defined}, which module {module_name!r} did not define under that name: "
            "a job is named by the module that defines it"
        )
    if is_job_function(target):
        if "." in qualname:  # a method: the worker would call it unbound with the job's data
            raise InvalidJobError(f"job {path!r} names a function that is not defined at the top level of its module")
        function: Callable[[Any], Any] = target
        return function
    if not issubclass(target, JobInterface):
        raise InvalidJobError(f"job class {path!r} does not implement taskscheduler.JobInterface")
    job_class: type[JobInterface] = target
    return job_class
