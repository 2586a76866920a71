"""engine/forwarding.AssistantServers: a saved assistant's own server URL, asked of Vapi once per
assistant while cached, however many messages want it at once."""

import asyncio
from dataclasses import replace

import httpx

from credit_engine.engine.config import Settings
from credit_engine.engine.forwarding import AssistantServers


def servers_answering(asked: list[str], delay_s: float = 0.05) -> AssistantServers:
    async def vapi(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        await asyncio.sleep(delay_s)
        return httpx.Response(200, json={"id": "asst-1", "server": {"url": "https://platform.example/vapi"}})

    settings = replace(Settings(), vapi_api_key="key", vapi_base_url="https://api.vapi.test")
    return AssistantServers(settings, httpx.AsyncClient(transport=httpx.MockTransport(vapi)))


async def test_many_messages_at_once_ask_vapi_once() -> None:
    asked: list[str] = []
    servers = servers_answering(asked)
    try:
        urls = await asyncio.gather(*(servers.server_url("asst-1") for _ in range(20)))
        assert urls == ["https://platform.example/vapi"] * 20 and asked == ["/assistant/asst-1"]
        assert await servers.server_url("asst-1") == "https://platform.example/vapi" and len(asked) == 1
    finally:
        await servers.aclose()


async def test_the_answer_is_cached_before_the_lookup_counts_as_done() -> None:
    """The gap CI once fell into (two GETs for one assistant): the lookup under way is forgotten as
    it completes, and a message whose turn came before the first asker resumed found neither the
    lookup nor a cached answer. At the moment the lookup completes, its answer must be cached."""
    servers = servers_answering([])
    seen_at_completion: list[bool] = []
    try:
        first = asyncio.ensure_future(servers.server_url("asst-1"))
        await asyncio.sleep(0)  # the lookup has started
        servers.pending["asst-1"].add_done_callback(lambda _: seen_at_completion.append("asst-1" in servers.cache))
        await first
        assert seen_at_completion == [True]
    finally:
        await servers.aclose()
