"""HTTPS settings of the client: the trust store (--ca_bundle, SSL_CERT_FILE), never unverified;
the open-file limit raised to what max_concurrency needs."""

import resource
import ssl
import subprocess
import sys

import pytest

from arkbatch_beam import ClientConfig, Endpoint
from arkbatch_beam._attempt import FILES_BESIDES_SOCKETS, raise_open_file_limit, tls_context


def test_tls_always_verifies_and_reads_the_ca_bundle(tmp_path):
    ctx = tls_context(ClientConfig(Endpoint("m")))
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    bad = tmp_path / "not-a-pem.pem"
    bad.write_text("nothing here")
    with pytest.raises(OSError, match=r"cannot read the CA bundle .*not-a-pem.pem.*\(ca_bundle\)"):
        tls_context(ClientConfig(Endpoint("m", ca_bundle=str(bad))))
    with pytest.raises(OSError, match="ca_bundle"):
        tls_context(ClientConfig(Endpoint("m", ca_bundle=str(tmp_path / "missing.pem"))))


def test_the_open_file_limit_is_raised_to_what_the_cap_needs():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2000 + FILES_BESIDES_SOCKETS:
        pytest.skip(f"hard open-file limit {hard} here")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        want = 2000 + FILES_BESIDES_SOCKETS
        assert raise_open_file_limit(2000) == want
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == want
        assert raise_open_file_limit(100) == want  # never lowered
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


_LOW_HARD_LIMIT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300))  # (a hard limit is lowered for good: a child)
from arkbatch_beam import ArkClient, ChatRequest, ClientConfig, Endpoint, OptionError
import asyncio
async def main():
    cfg = ClientConfig(Endpoint("m", base_url="http://127.0.0.1:9/api/v3", api_key_env=""), max_concurrency=1000)
    try:
        async with ArkClient(cfg) as client:
            await client.complete(ChatRequest("a", {"messages": [{"role": "user", "content": "x"}]}))
    except OptionError as exc:
        print("OptionError:", exc)
asyncio.run(main())
"""


def test_a_hard_open_file_limit_below_the_cap_fails_fast_naming_both():
    # Before: a warning, then a job that runs out of sockets mid-way (each one a retried error).
    proc = subprocess.run([sys.executable, "-c", _LOW_HARD_LIMIT], capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert f"OptionError: max_concurrency must be at most {300 - FILES_BESIDES_SOCKETS} here" in out, out
    assert "hard limit 300" in out and "ulimit -Hn" in out and "lower --max_concurrency" in out


def _post_once(url: str, ca_bundle: str | None):
    import asyncio

    from arkbatch_beam._attempt import HttpTransport

    async def go():
        t = HttpTransport(ClientConfig(Endpoint("m", base_url=url, api_key_env="", ca_bundle=ca_bundle)))
        await t.start()
        try:
            status, _, _ = await t(b'{"model":"m","messages":[{"role":"user","content":"x"}]}', "r-1")
            return status
        finally:
            await t.close()

    return asyncio.run(go())


def test_https_trusts_the_ca_bundle_or_ssl_cert_file_and_nothing_else(monkeypatch):
    from arkbatch_beam._errors import CertificateError
    from arkbatch_beam.testing import FakeArkServer

    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with FakeArkServer(api_key=None, tls=True) as srv:
        assert _post_once(srv.base_url, srv.ca_pem_path) == 200
        with pytest.raises(CertificateError, match="CERTIFICATE_VERIFY_FAILED.*--ca_bundle"):
            _post_once(srv.base_url, None)  # the system's store does not know the test CA
        monkeypatch.setenv("SSL_CERT_FILE", srv.ca_pem_path)
        assert _post_once(srv.base_url, None) == 200
        assert srv.total_requests == 2  # the refused handshake sent nothing


def test_at_most_max_opening_connections_are_opened_at_once(monkeypatch):
    # Before: every request in flight started its own connect and TLS handshake at once; on a busy
    # server they timed out behind each other and were retried (27,503 connections for 10,000).
    import asyncio

    import aiohttp

    from arkbatch_beam import ArkClient, ChatRequest, _attempt
    from arkbatch_beam.testing import FakeArkServer

    monkeypatch.setattr(_attempt, "MAX_OPENING", 3)
    opening = {"now": 0, "peak": 0}
    real = aiohttp.TCPConnector._create_connection

    async def counted(self, req, traces, timeout):
        opening["now"] += 1
        opening["peak"] = max(opening["peak"], opening["now"])
        try:
            await asyncio.sleep(0)  # let every other request reach its own connect meanwhile
            return await real(self, req, traces, timeout)
        finally:
            opening["now"] -= 1

    monkeypatch.setattr(aiohttp.TCPConnector, "_create_connection", counted)
    with FakeArkServer(api_key=None, tls=True) as srv:

        async def run():
            cfg = ClientConfig(Endpoint("ep", base_url=srv.base_url, api_key_env="", ca_bundle=srv.ca_pem_path),
                               max_concurrency=20, pacing="fixed", timeout=60)
            async with ArkClient(cfg) as client:
                return await asyncio.gather(*(
                    client.complete(ChatRequest(f"r{i}", {"messages": [{"role": "user", "content": f"p {i}"}]}))
                    for i in range(20)))

        results = asyncio.run(run())
        assert all(r.ok for r in results) and srv.connections_opened == 20
    assert opening["peak"] == 3
