# Hand-written stub for the compiled module; `python -m mypy.stubtest tierq._core` keeps it honest.
from typing import Self, final

__all__ = ["AdmissionCore", "ManualClock", "SHED_CODES", "TokenBucket"]

SHED_CODES: list[str]

@final
class ManualClock:
    def __new__(cls, start_ns: int = 1_000_000_000) -> Self: ...
    def now_ns(self) -> int: ...
    def advance_ns(self, ns: int) -> int: ...
    def advance(self, seconds: float) -> int: ...

@final
class TokenBucket:
    def __new__(
        cls,
        rate: float,
        burst: float | None = None,
        priority_reserve: float = 0.0,
        clock: ManualClock | None = None,
    ) -> Self: ...
    def try_take(self, cost: int = 1, tier: str = "default") -> float | None: ...
    def adjust(self, delta: int) -> None: ...
    def available(self) -> float: ...

@final
class AdmissionCore:
    def __new__(
        cls,
        max_concurrency: int = 64,
        queue_depth: int = 1024,
        max_wait_ms_default: float = 30000.0,
        max_wait_ms_priority: float = 60000.0,
        rate: float | None = None,
        burst: float | None = None,
        priority_reserve: float = 0.2,
        default_min_share: float = 0.0,
        clock: ManualClock | None = None,
    ) -> Self: ...
    @staticmethod
    def create_shared(
        name: str,
        workers: int,
        wake_fds: list[int],
        max_concurrency: int = 64,
        queue_depth: int = 1024,
        max_wait_ms_default: float = 30000.0,
        max_wait_ms_priority: float = 60000.0,
        rate: float | None = None,
        burst: float | None = None,
        priority_reserve: float = 0.2,
        default_min_share: float = 0.0,
    ) -> AdmissionCore: ...
    @staticmethod
    def attach_shared(
        name: str,
        worker: int | None,
        wake_fds: list[int],
        max_concurrency: int = 64,
        queue_depth: int = 1024,
        max_wait_ms_default: float = 30000.0,
        max_wait_ms_priority: float = 60000.0,
        rate: float | None = None,
        burst: float | None = None,
        priority_reserve: float = 0.2,
        default_min_share: float = 0.0,
    ) -> AdmissionCore: ...
    @staticmethod
    def unlink_shared(name: str) -> None: ...
    def drain(self) -> list[tuple[int, int]]: ...
    def reclaim(self, worker: int) -> tuple[int, int, list[int]]: ...
    def held_by(self, worker: int) -> int: ...
    def admit(self, lane: int, cost: int) -> tuple[int, int, int, int]: ...
    def release(self) -> int | None: ...
    def dispatch(self) -> int | None: ...
    def cancel(self, waiter: int) -> bool: ...
    def expire_due(self) -> list[int]: ...
    def deadline_ns(self, waiter: int) -> int | None: ...
    def retry_after_ns(self, lane: int) -> int: ...
    def now_ns(self) -> int: ...
    def stats(self) -> dict[str, object]: ...
