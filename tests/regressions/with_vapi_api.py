"""A kill switch that can ask Vapi's REST API (the `vapi_api` fake) about a call: a test module
imports `worker_rt` from here in place of the kill-switch tests' own."""

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from credit_engine.engine.clock import ManualClock
from credit_engine.engine.config import Settings
from credit_engine.engine.runtime import Runtime
from tests.fake_vapi import FakeVapi
from tests.fake_vapi_api import API_KEY, FakeVapiApi
from tests.webapp.test_kill_switch import KILL_SETTINGS


@pytest.fixture
async def worker_rt(
    settings: Settings, clock: ManualClock, fake: FakeVapi, vapi_api: FakeVapiApi
) -> AsyncIterator[Runtime]:
    with_api = replace(
        settings,
        vapi_control_base_url=fake.base_url,
        vapi_api_key=API_KEY,
        vapi_base_url=vapi_api.base_url,
        **KILL_SETTINGS,
    )
    runtime = await Runtime.open(with_api, clock=clock)
    yield runtime
    await runtime.close()
