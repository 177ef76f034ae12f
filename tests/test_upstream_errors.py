"""One mapping from httpx transport failures to the project's errors, shared by the LLM and WAHA clients."""

from __future__ import annotations

import httpx
import pytest

from whatsapp_webhook.upstream import LLMError, WahaError, metric_status, transport_error

# httpx's transport failures, what each client calls them, and whether the request may have left.
# Before anything is written (no connection, none free in the pool) WAHA surely sent nothing and
# the text may be sent again; after connecting, a timeout or a dropped connection may come after
# WAHA sent it, so the caller looks in the chat first. The LLM client retries every one of them.
TABLE = [
    # exception, LLM message, WAHA message, maybe delivered, metric label (LLM, WAHA)
    (httpx.ConnectError, "connection failed: ConnectError", "/api/sendText could not connect: ConnectError",
     False, ("connection", "connection")),
    (httpx.ConnectTimeout, "request timed out", "/api/sendText could not connect: ConnectTimeout",
     False, ("timeout", "connection")),
    (httpx.PoolTimeout, "request timed out", "/api/sendText could not connect: PoolTimeout",
     False, ("timeout", "connection")),
    (httpx.ReadTimeout, "request timed out", "/api/sendText timed out (ReadTimeout)",
     True, ("timeout", "timeout")),
    (httpx.WriteTimeout, "request timed out", "/api/sendText timed out (WriteTimeout)",
     True, ("timeout", "timeout")),
    (httpx.ReadError, "connection failed: ReadError", "/api/sendText connection failed: ReadError",
     True, ("connection", "connection")),
    (httpx.WriteError, "connection failed: WriteError", "/api/sendText connection failed: WriteError",
     True, ("connection", "connection")),
    (httpx.CloseError, "connection failed: CloseError", "/api/sendText connection failed: CloseError",
     True, ("connection", "connection")),
    (httpx.RemoteProtocolError, "connection failed: RemoteProtocolError",
     "/api/sendText connection failed: RemoteProtocolError", True, ("connection", "connection")),
    (httpx.LocalProtocolError, "connection failed: LocalProtocolError",
     "/api/sendText connection failed: LocalProtocolError", True, ("connection", "connection")),
    (httpx.ProxyError, "connection failed: ProxyError", "/api/sendText connection failed: ProxyError",
     True, ("connection", "connection")),
    (httpx.UnsupportedProtocol, "connection failed: UnsupportedProtocol",
     "/api/sendText connection failed: UnsupportedProtocol", True, ("connection", "connection")),
]


@pytest.mark.parametrize("failure, llm_message, waha_message, maybe_delivered, labels", TABLE,
                         ids=[row[0].__name__ for row in TABLE])
def test_each_transport_failure_maps_to_one_error_per_client(failure: type[httpx.TransportError], llm_message: str,
                                                             waha_message: str, maybe_delivered: bool,
                                                             labels: tuple[str, str]) -> None:
    llm = transport_error(failure("boom"), LLMError)
    assert type(llm) is LLMError and llm.args == (llm_message,) and str(llm) == f"llm: {llm_message}"
    assert llm.transient and llm.status is None and llm.retry_after is None
    waha = transport_error(failure("boom"), WahaError, "/api/sendText")
    assert isinstance(waha, WahaError) and type(waha) is WahaError
    assert waha.args == (waha_message,) and str(waha) == f"waha: {waha_message}"
    assert waha.transient and waha.status is None and waha.maybe_delivered is maybe_delivered
    assert (metric_status(llm), metric_status(waha)) == labels


def test_the_table_covers_every_transport_failure_httpx_raises() -> None:
    def leaves(cls: type) -> set[type]:
        subclasses = cls.__subclasses__()
        return {cls} if not subclasses else set().union(*(leaves(sub) for sub in subclasses))

    httpx_failures = {cls for cls in leaves(httpx.TransportError) if cls.__module__.startswith("httpx")}
    assert httpx_failures == {row[0] for row in TABLE}
