"""Which addresses an org's URL may reach (engine/outbound.py): the rule itself, the save-time check,
and the send-time check pinned to the connection, against real servers on loopback."""

import ipaddress
import shutil
import ssl
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from credit_engine.engine.outbound import Failure, Outbound, address_allowed, literal_address, url_refusal
from tests.alert_receivers import ANSWER, receiver

REFUSED = (
    "127.0.0.1",
    "127.255.0.9",
    "10.1.2.3",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "169.254.169.254",
    "169.254.0.1",
    "100.64.0.1",
    "100.127.255.254",
    "0.0.0.0",
    "0.1.2.3",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    "192.0.2.1",
    "198.18.0.1",
    "::",
    "::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "::127.0.0.1",
    "fe80::1",
    "fc00::1",
    "fd12:3456::1",
    "ff02::1",
    "64:ff9b::7f00:1",
    "2002:7f00:1::",
    "2001:db8::1",
    "fec0::1",
)
ALLOWED = (
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "100.128.0.1",
    "172.32.0.1",
    "::ffff:8.8.8.8",
    "2606:4700::1111",
    "2001:4860:4860::8888",
)
BODY = b'{"id": "a1"}'


@pytest.mark.parametrize("address", REFUSED)
def test_internal_addresses_are_refused(address: str) -> None:
    assert not address_allowed(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_allowed(address: str) -> None:
    assert address_allowed(ipaddress.ip_address(address))


def test_the_old_numeric_forms_the_resolver_accepts_are_judged_as_addresses() -> None:
    for host in ("127.1", "0x7f000001", "2130706433", "0177.0.0.1", "[::1]"):
        literal = literal_address(host)
        assert literal is not None and not address_allowed(literal), host
    assert literal_address("alerts.example.com") is None


async def test_at_save_a_literal_is_judged_a_name_is_resolved_and_an_unresolvable_name_passes() -> None:
    names = {
        "inside.example.test": ["10.0.0.5"],
        "mixed.example.test": ["93.184.216.34", "127.0.0.1"],
        "outside.example.test": ["93.184.216.34", "2606:4700::1111"],
    }

    async def resolver(host: str, port: int) -> list[str]:
        if host not in names:
            raise OSError("does not resolve")
        return names[host]

    async def refusal(url: str, allow_private: bool = False) -> str | None:
        return await url_refusal(url, allow_private=allow_private, resolver=resolver)

    for url in (
        "http://inside.example.test/h",
        "https://mixed.example.test/h",
        "http://localhost:8080/h",
        "http://api.localhost/h",
        "http://127.0.0.1/h",
        "http://[::ffff:127.0.0.1]/h",
        "http://127.1/h",
    ):
        assert await refusal(url) is not None, url
        assert await refusal(url, allow_private=True) is None, url
    assert await refusal("https://outside.example.test/alerts") is None
    assert await refusal("https://acme.test/alerts") is None  # checked again, pinned, at every send
    assert await refusal("ftp://outside.example.test/") == "must be an http(s) URL"


async def test_at_send_a_name_resolving_inside_is_refused_before_any_connection() -> None:
    async with receiver(ANSWER) as server:

        async def resolver(host: str, port: int) -> list[str]:
            return {"alerts.example.test": ["127.0.0.1"], "mixed.example.test": ["93.184.216.34", "127.0.0.1"]}[host]

        strict = Outbound(allow_private=False, connections_max=2, resolver=resolver)
        try:
            for host in (
                "alerts.example.test",
                "mixed.example.test",
                "127.0.0.1",
                "localhost",
                "[::ffff:127.0.0.1]",
                "[::1]",
                "2130706433",
            ):
                answer = await strict.post(server.url(host=host), BODY, {}, total_s_max=2.0, response_bytes_max=64)
                assert (answer.status, answer.failure) == (None, Failure.refused), host
        finally:
            await strict.aclose()
        assert server.connections == 0


async def test_at_send_the_connection_goes_to_the_address_checked_once_with_the_name_as_host() -> None:
    """alerts.example.test resolves nowhere but in our resolver: the request arriving proves the
    socket went to the address the check saw, resolved once, not looked up again."""
    async with receiver(ANSWER) as server:
        lookups: Counter[str] = Counter()

        async def resolver(host: str, port: int) -> list[str]:
            lookups[host] += 1
            return ["127.0.0.1"]

        pinned = Outbound(allow_private=True, connections_max=2, resolver=resolver)
        try:
            answer = await pinned.post(
                server.url(host="alerts.example.test"), BODY, {"X-A": "1"}, total_s_max=2.0, response_bytes_max=64
            )
        finally:
            await pinned.aclose()
        assert (answer.status, answer.failure) == (200, None)
        assert lookups == {"alerts.example.test": 1}
        [request] = server.requests
        assert request.headers["host"] == f"alerts.example.test:{server.port}"
        assert (request.body, request.headers["x-a"]) == (BODY, "1")


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=alerts.example.test",
            "-addext",
            "subjectAltName=DNS:alerts.example.test",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_tls_is_verified_against_the_name_not_the_pinned_address(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    client_tls = ssl.create_default_context(cafile=str(cert))

    async def resolver(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]  # both names: the same pinned address

    async with receiver(ANSWER, ssl_context=server_tls) as server:
        pinned = Outbound(allow_private=True, connections_max=2, resolver=resolver, ssl_context=client_tls)
        try:
            right = await pinned.post(
                server.url(host="alerts.example.test"), BODY, {}, total_s_max=2.0, response_bytes_max=64
            )
            wrong = await pinned.post(
                server.url(host="other.example.test"), BODY, {}, total_s_max=2.0, response_bytes_max=64
            )
        finally:
            await pinned.aclose()
        assert (right.status, right.failure) == (200, None)
        assert (wrong.status, wrong.failure) == (None, Failure.no_response)  # the certificate names another host
        assert [r.headers["host"] for r in server.requests] == [f"alerts.example.test:{server.port}"]
