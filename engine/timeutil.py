"""Exact conversions between Redis milliseconds and Postgres timestamps."""

from datetime import UTC, datetime, timedelta

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_MS = timedelta(milliseconds=1)


def dt_from_ms(ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=ms)


def ms_from_dt(value: datetime) -> int:
    return (value - EPOCH) // ONE_MS
