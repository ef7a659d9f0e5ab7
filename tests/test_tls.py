"""HTTPS settings of the client: the trust store (--ca_bundle, SSL_CERT_FILE), never unverified;
the open-file limit raised to what max_concurrency needs."""

import resource
import ssl

import pytest

from arkbatch_beam import ClientConfig, Endpoint
from arkbatch_beam._attempt import raise_open_file_limit, tls_context


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
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        want = 2000 if hard == resource.RLIM_INFINITY else min(2000, hard)
        assert raise_open_file_limit(2000) == want
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == want
        assert raise_open_file_limit(100) == want  # never lowered
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_hard_limit_below_the_need_is_named_in_a_warning(caplog):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = (hard + 1000) if hard != resource.RLIM_INFINITY else None
    if need is None:
        pytest.skip("no hard limit here")
    assert raise_open_file_limit(need) == hard or raise_open_file_limit(need) == soft
    assert any("raise the hard limit" in r.getMessage() and "ulimit -Hn" in r.getMessage() for r in caplog.records)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


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
