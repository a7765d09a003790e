"""Process and platform definitions, and how to find them.

A ``Process`` is an ordered set of ``Platform``s (external systems) with a deduplication
strategy. Each platform has one or more stages, run in order, and a retry policy.

Example:
    >>> p = Process(
    ...     "CANCELLATION",
    ...     platforms=[
    ...         Platform("A", order=1, stages=("validate",), retry=RetryPolicy(max_attempts=1)),
    ...         Platform("B", order=2, stages=("process", "confirm")),
    ...     ],
    ...     dedup=KeyFields("request_id"),
    ... )
    >>> [(s.platform, s.stage) for s in p.stage_plan()]
    [('A', 'validate'), ('B', 'process'), ('B', 'confirm')]

Platform functions are attached with the ``Process.platform`` decorator; they stay plain
functions here (the Prefect task that tracks them is built at the edge, by
``tracking.decorator.tracked_task``). Processes are found by import path
(``module:attribute``), the same way by the API, the CLI and the deployments: see
``load_processes`` and ``find_process``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, ParamSpec, TypeVar

from tracking.dedup import DedupStrategy, KeyFields, as_strategy
from tracking.errors import UnknownProcessError
from tracking.policy import RetryPolicy

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_STAGE = "main"
_CODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def _check_code(kind: str, code: Any) -> str:
    if not isinstance(code, str) or not _CODE.match(code):
        raise ValueError(
            f"{kind} code must be 1-64 letters, digits, '_', '.' or '-' "
            f"(starting with a letter or digit), got {code!r}"
        )
    return code


@dataclass
class Platform:
    """An external system a transaction passes through.

    Attributes:
        code: unique within its process (``"SAP"``).
        order: position among the process's platforms (distinct, lower runs first).
        stages: the steps done in this platform, in order; one ``"main"`` stage by default.
        retry: the RetryPolicy for system errors (unlimited attempts by default).
        fn: the function that does the work, ``fn(tx: TxContext) -> int | ExecutionResult``
            (``None`` for catalog-only definitions).
        task_options: Prefect task options for its task runs (``retries``,
            ``timeout_seconds``...).
        concurrency: at most this many calls of this platform at once, across all workers
            and runs (licensed robot or application sessions), through a Prefect global
            concurrency limit; ``None`` (default) is no limit and costs no API call.
        idempotent: its calls may safely be repeated: then batch granularity records a
            batch's results together (``Tracker.complete_many``, much faster), and a process
            killed mid-batch repeats the batch's unrecorded calls. By default each result is
            recorded as its call returns, so a crash repeats at most the call in flight.
    """

    code: str
    order: int
    stages: tuple[str, ...] = (DEFAULT_STAGE,)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    fn: Callable[..., Any] | None = None
    task_options: dict[str, Any] = field(default_factory=dict)
    concurrency: int | None = None
    idempotent: bool = False

    def __post_init__(self) -> None:
        _check_code("platform", self.code)
        if isinstance(self.order, bool) or not isinstance(self.order, int):
            raise ValueError(f"platform {self.code!r}: order must be an int, got {self.order!r}")
        if isinstance(self.stages, str):
            self.stages = (self.stages,)
        self.stages = tuple(self.stages)
        if not self.stages:
            raise ValueError(f"platform {self.code!r} needs at least one stage")
        for s in self.stages:
            _check_code(f"platform {self.code!r}: stage", s)
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"platform {self.code!r} repeats a stage: {self.stages}")
        if not isinstance(self.retry, RetryPolicy):
            raise TypeError(f"platform {self.code!r}: retry must be a RetryPolicy")
        c = self.concurrency
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ValueError(f"platform {self.code!r}: concurrency must be an int >= 1 or None, "
                             f"got {c!r}")
        if "retry_condition_fn" in self.task_options:
            raise ValueError("retry_condition_fn is set by the tracking decorator; do not pass it")

    def resolve_stage(self, stage: str | None) -> str:
        """The stage name to use; ``None`` is allowed only for a one-stage platform."""
        if stage is None:
            if len(self.stages) > 1:
                raise ValueError(
                    f"platform {self.code!r} has stages {list(self.stages)}: pass stage="
                )
            return self.stages[0]
        if stage not in self.stages:
            raise ValueError(
                f"unknown stage {stage!r} for platform {self.code!r} "
                f"(stages: {', '.join(self.stages)})"
            )
        return stage


@dataclass(frozen=True)
class PlannedStage:
    """One stage of a transaction as the process lays it out."""

    seq: int
    platform: str
    platform_order: int
    stage: str


class Process:
    """A business process: ordered platforms plus how to recognise the same item twice.

    Args:
        code: the process code (``"CANCELLATION"``).
        platforms: platforms defined up front (more can be added with ``@process.platform``).
        dedup: a strategy (``KeyFields``, ``PayloadHash``, ``Custom``) or a callable returning
            the item's key; default ``PayloadHash()``.
        description: free text shown in the catalog.
        retention: how long its finished transactions are kept (``tracking purge`` without
            ``--older-than`` archives and deletes those finished longer ago); ``None``
            (default) keeps them forever.
        sla: how long an item may take from its creation (``timedelta(hours=4)``): one not
            finished by then (or by its own earlier ``deadline``) is overdue, claimed first
            and reported. Fixed per item at intake, so a changed SLA applies to new items;
            ``None`` (default) is no SLA.
    """

    def __init__(
        self,
        code: str,
        platforms: Iterable[Platform] = (),
        dedup: DedupStrategy | Callable[[Mapping[str, Any]], str] | None = None,
        description: str = "",
        retention: timedelta | None = None,
        sla: timedelta | None = None,
    ) -> None:
        self.code = _check_code("process", code)
        self.dedup = as_strategy(dedup)
        self.description = description
        if retention is not None and (
            not isinstance(retention, timedelta) or retention <= timedelta(0)
        ):
            raise ValueError(f"process {code!r}: retention must be a timedelta > 0 or None, "
                             f"got {retention!r}")
        self.retention = retention
        if sla is not None and (not isinstance(sla, timedelta) or sla <= timedelta(0)):
            raise ValueError(f"process {code!r}: sla must be a timedelta > 0 or None, got {sla!r}")
        self.sla = sla
        self._platforms: dict[str, Platform] = {}
        for p in platforms:
            self.add_platform(p)

    def __repr__(self) -> str:
        return f"Process({self.code!r}, platforms={[p.code for p in self.platforms]})"

    @property
    def platforms(self) -> list[Platform]:
        """Platforms in execution order."""
        return sorted(self._platforms.values(), key=lambda p: p.order)

    def add_platform(self, platform: Platform) -> Platform:
        if not isinstance(platform, Platform):
            raise TypeError(f"expected a Platform, got {platform!r}")
        if platform.code in self._platforms:
            raise ValueError(f"process {self.code!r} repeats platform code {platform.code!r}")
        clash = [p.code for p in self._platforms.values() if p.order == platform.order]
        if clash:
            raise ValueError(
                f"process {self.code!r}: platform {platform.code!r} has order {platform.order}, "
                f"already used by {clash[0]!r} (orders must be distinct)"
            )
        self._platforms[platform.code] = platform
        return platform

    def get_platform(self, code: str) -> Platform:
        try:
            return self._platforms[code]
        except KeyError:
            known = ", ".join(p.code for p in self.platforms) or "none"
            raise ValueError(
                f"unknown platform {code!r} for process {self.code!r} (platforms: {known})"
            ) from None

    def stage_plan(self) -> list[PlannedStage]:
        """Every stage of a transaction, in execution order."""
        plan: list[PlannedStage] = []
        for platform in self.platforms:
            for stage in platform.stages:
                plan.append(PlannedStage(len(plan) + 1, platform.code, platform.order, stage))
        return plan

    def platform(
        self,
        code: str,
        *,
        order: int | None = None,
        stages: Iterable[str] = (DEFAULT_STAGE,),
        retry: RetryPolicy | None = None,
        concurrency: int | None = None,
        idempotent: bool = False,
        **task_options: Any,
    ) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """Decorator: make a function a platform of this process.

        ``order`` defaults to one more than the highest order so far. Extra keyword arguments
        are Prefect task options (``retries``, ``timeout_seconds``, ``log_prints``...). The
        function is returned as it is (call it directly in a unit test); the resume flow
        runs it as a tracked Prefect task.

        Example:
            @cancellation.platform("SAP", order=1, retry=RetryPolicy(max_attempts=3, delay=300))
            def cancel_in_sap(tx: TxContext) -> int:
                ...
        """

        def wrap(fn: Callable[P, R]) -> Callable[P, R]:
            next_order = max((p.order for p in self._platforms.values()), default=0) + 1
            self.add_platform(
                Platform(
                    code,
                    order=next_order if order is None else order,
                    stages=tuple(stages),
                    retry=retry or RetryPolicy(),
                    fn=fn,
                    task_options=dict(task_options),
                    concurrency=concurrency,
                    idempotent=idempotent,
                )
            )
            return fn

        return wrap

    def describe(self) -> dict[str, Any]:
        """The catalog entry stored in the database and shown by the API."""
        return {
            "code": self.code,
            "description": self.description,
            "dedup": self.dedup.describe(),
            "retention_seconds": (
                None if self.retention is None else self.retention.total_seconds()
            ),
            "sla_seconds": None if self.sla is None else self.sla.total_seconds(),
            "platforms": [
                {
                    "code": p.code,
                    "order": p.order,
                    "stages": list(p.stages),
                    "retry": p.retry.as_dict(),
                    "concurrency": p.concurrency,
                }
                for p in self.platforms
            ],
        }


def _import(path: str) -> Any:
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"process path must look like 'module:attribute', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} for process path {path!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None


def _flatten(obj: Any, path: str) -> Iterator[Process]:
    if isinstance(obj, Process):
        yield obj
    elif isinstance(obj, list | tuple):
        for item in obj:
            yield from _flatten(item, path)
    else:
        raise ValueError(f"{path!r} is not a Process or a list of Processes: {obj!r}")


def find_process(processes: Iterable[Process], code: str) -> Process:
    """The process with this code among ``processes`` (the configured ones)."""
    found = {p.code: p for p in processes}
    if code not in found:
        known = ", ".join(sorted(found)) or "none"
        raise UnknownProcessError(f"unknown process {code!r} (TRACKING_PROCESSES has: {known})")
    return found[code]


def load_processes(paths: Iterable[str]) -> list[Process]:
    """Import processes from ``module:attribute`` paths (a Process or a list of them)."""
    found: dict[str, Process] = {}
    for path in paths:
        for process in _flatten(_import(path), path):
            if found.get(process.code, process) is not process:
                raise ValueError(f"process code {process.code!r} is defined twice")
            found[process.code] = process
    return list(found.values())


__all__ = ["DEFAULT_STAGE", "KeyFields", "PlannedStage", "Platform", "Process", "find_process",
           "load_processes"]
