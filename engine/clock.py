"""One clock for every money decision.

Scripts read Redis `TIME` themselves, so every web process and worker decides by the same
clock, whatever their own clocks say. Tests replace it with a ManualClock, whose time is passed
to the scripts as `now_ms` (the only way a script's clock can be overridden).
"""

from typing import Protocol

from redis.asyncio import Redis


class Clock(Protocol):
    def script_arg(self) -> int:
        """The `now_ms` argument for a script: 0 means "use Redis TIME"."""
        ...

    async def now_ms(self, redis: Redis) -> int: ...


class RedisClock:
    def script_arg(self) -> int:
        return 0

    async def now_ms(self, redis: Redis) -> int:
        seconds, microseconds = await redis.time()
        return int(seconds) * 1000 + int(microseconds) // 1000


class ManualClock:
    def __init__(self, now_ms: int = 1_750_000_000_000) -> None:
        assert now_ms > 0
        self.value_ms = now_ms

    def script_arg(self) -> int:
        return self.value_ms

    async def now_ms(self, redis: Redis) -> int:
        return self.value_ms

    def advance(self, delta_ms: int) -> None:
        assert delta_ms >= 0
        self.value_ms += delta_ms


async def redis_now_ms(redis: Redis) -> int:
    """Redis's own clock, whatever clock the process decides money by: for operational figures
    (heartbeats, lag) that processes with disagreeing clocks compare with each other."""
    return await RedisClock().now_ms(redis)
