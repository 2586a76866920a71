"""Money arithmetic in integer pence, mirrored exactly by the Lua scripts (see lua/_money.lua)."""

from credit_engine.engine import limits


def billed_seconds_from_ms(duration_ms: int) -> int:
    """Calls are billed per started second."""
    assert isinstance(duration_ms, int)
    assert duration_ms >= 0
    return -(-duration_ms // 1000)


def billed_seconds_from_us(duration_us: int) -> int:
    """billed_seconds_from_ms for a duration known to the microsecond (a report's timestamps)."""
    assert isinstance(duration_us, int)
    assert duration_us >= 0
    return -(-duration_us // 1_000_000)


def call_cost_pence(billed_seconds: int, rate_pence_per_minute: int) -> int:
    """Cost of a call, rounded up to a whole penny per call."""
    assert 0 <= billed_seconds <= limits.billed_seconds_max
    assert 0 < rate_pence_per_minute <= limits.rate_pence_per_minute_max
    cost_pence = -(-(billed_seconds * rate_pence_per_minute) // 60)
    assert cost_pence >= 0
    return cost_pence


def charge_with_floor(balance_pence: int, overdraft_pence: int, cost_pence: int) -> tuple[int, int]:
    """Charge `cost_pence` in full: the balance goes down to the overdraft floor, the rest is debt.

    Returns (balance_pence_after, debt_delta_pence). Nothing is dropped:
    (balance_pence - balance_pence_after) + debt_delta_pence == cost_pence.
    """
    assert cost_pence >= 0
    assert overdraft_pence >= 0
    floor_pence = min(-overdraft_pence, balance_pence)
    balance_pence_after = max(balance_pence - cost_pence, floor_pence)
    debt_delta_pence = cost_pence - (balance_pence - balance_pence_after)
    assert debt_delta_pence >= 0
    assert balance_pence_after <= balance_pence
    return balance_pence_after, debt_delta_pence


def format_pence(amount_pence: int) -> str:
    assert isinstance(amount_pence, int)
    sign = "-" if amount_pence < 0 else ""
    magnitude = abs(amount_pence)
    return f"{sign}{magnitude // 100}.{magnitude % 100:02d}"
