
import aiohttp
import pytest

from arkbatch_beam import (
    AttemptTimeout,
    EndpointError,
    RateLimited,
    RequestRejected,
    RetryableStatus,
    TransportError,
)
from arkbatch_beam._attempt import map_transport_error, mapped_transport_errors
from arkbatch_beam._errors import error_for_status

BODY = {"error": {"code": "InvalidParameter", "message": "messages is required", "type": "x"}}


@pytest.mark.parametrize(
    "status, cls, retryable",
    [
        (400, RequestRejected, False), (401, EndpointError, False), (403, EndpointError, False),
        (404, EndpointError, False), (422, RequestRejected, False), (408, RetryableStatus, True),
        (409, RetryableStatus, True), (429, RateLimited, True), (500, RetryableStatus, True),
        (502, RetryableStatus, True), (503, RetryableStatus, True), (504, RetryableStatus, True),
    ],
)
def test_status_mapping(status, cls, retryable):
    err = error_for_status(status, BODY)
    assert type(err) is cls and err.retryable is retryable
    assert (err.http_status, err.error_code, err.message) == (status, "InvalidParameter",
                                                              "messages is required")


def test_503_with_retry_after_is_pushback():
    assert isinstance(error_for_status(503, None, retry_after=2.0), RateLimited)


def test_non_json_error_body_keeps_text():
    err = error_for_status(502, None, text="<html>bad gateway</html>")
    assert err.message == "<html>bad gateway</html>" and err.error_code is None


@pytest.mark.parametrize(
    "exc, cls",
    [
        (aiohttp.ServerDisconnectedError(), TransportError),
        (aiohttp.ClientOSError(104, "reset"), TransportError),
        (ConnectionResetError(), TransportError),
        (TimeoutError(), AttemptTimeout),
        (aiohttp.ClientPayloadError("cut"), TransportError),  # the connection broke mid-body
        (aiohttp.ConnectionTimeoutError(), TransportError),
    ],
)
def test_transport_mapping(exc, cls):
    mapped = map_transport_error(exc)
    assert type(mapped) is cls and mapped.retryable
    with pytest.raises(cls):
        with mapped_transport_errors():
            raise exc


def test_unrelated_exceptions_pass_through():
    with pytest.raises(KeyError):
        with mapped_transport_errors():
            raise KeyError("x")
