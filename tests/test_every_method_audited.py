"""Fail closed: every dataops.v1 method the server registers is wrapped and audited.

The test walks every service descriptor of the contract, calls every method over the
real server (unary and server-streaming alike) and finds its audit record; a handler
shape the interceptor cannot wrap is refused, at startup and per call.
"""

from __future__ import annotations

from types import SimpleNamespace

import grpc
import pytest

from conftest import audit_records
from dataops.errors import InternalError
from dataops.server import app
from dataops.server.interceptors import AuditInterceptor, check_wrappable


def _channel(server, pki, consumer="city-bank") -> grpc.Channel:
    d = pki.consumer_dir(consumer)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(d / "ca.crt").read_bytes(),
        private_key=(d / f"{consumer}.key").read_bytes(),
        certificate_chain=(d / f"{consumer}.crt").read_bytes(),
    )
    return grpc.secure_channel(f"localhost:{server.port}", credentials)


def _methods():
    return [(service, method) for service in app.SERVICES for method in service.methods]


def test_the_server_registers_every_service_of_the_contract():
    assert {s.full_name for s in app.SERVICES} == set(app.SERVICE_NAMES)
    assert any(m.server_streaming for _, m in _methods()), "the contract has a server stream (Watch)"


@pytest.mark.parametrize("control", ["on", "off"])
def test_every_method_leaves_an_audit_record(server, pki, config, monkeypatch, control):
    if control == "off":
        # The old behaviour: a non-unary handler is passed through unwrapped.
        original = AuditInterceptor.intercept_service

        def fail_open(self, continuation, details):
            handler = continuation(details)
            return (
                handler
                if handler is not None and handler.unary_unary is None
                else original(self, continuation, details)
            )

        monkeypatch.setattr(AuditInterceptor, "intercept_service", fail_open)
    # The running server looks the method up on its interceptor per call, so the patch applies.
    channel = _channel(server, pki)
    try:
        for service, method in _methods():
            path = f"/{service.full_name}/{method.name}"
            if method.server_streaming:
                call = channel.unary_stream(path)(b"", timeout=10)
                with pytest.raises(grpc.RpcError):
                    list(call)  # an empty request is refused (no items), or answered and closed
            else:
                try:
                    channel.unary_unary(path)(b"", timeout=10)
                except grpc.RpcError:
                    pass  # refused or answered: either way there must be a record
    finally:
        channel.close()
    audited = {r["method"] for r in audit_records(config)}
    expected = {m.name for _, m in _methods()}
    streams = {m.name for _, m in _methods() if m.server_streaming}
    if control == "on":
        assert expected <= audited
    else:
        assert streams.isdisjoint(audited)  # unwrapped: the stream ran with no identity and no record


def test_a_stream_is_audited_at_open_and_close(server, pki, config):
    channel = _channel(server, pki, "river-bank")
    try:
        with pytest.raises(grpc.RpcError) as refused:
            list(channel.unary_stream("/dataops.v1.SubjectService/Watch")(b"", timeout=10))
    finally:
        channel.close()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    events = [(r["stream_event"], r["decision"]) for r in audit_records(config) if r["method"] == "Watch"]
    assert events == [("open", "allowed"), ("close", "invalid")]


def _descriptor(name, client_streaming, server_streaming):
    method = SimpleNamespace(
        full_name=f"dataops.v1.Fake.{name}",
        client_streaming=client_streaming,
        server_streaming=server_streaming,
    )
    return SimpleNamespace(full_name="dataops.v1.Fake", methods=[method])


def test_a_client_streaming_method_stops_the_server_at_startup():
    check_wrappable([_descriptor("Read", False, True)])  # a server stream is wrapped
    with pytest.raises(InternalError, match="client-streaming"):
        check_wrappable([_descriptor("Upload", True, False)])
    with pytest.raises(InternalError, match="client-streaming"):
        check_wrappable([_descriptor("Chat", True, True)])


@pytest.mark.parametrize("shape", ["stream_unary", "stream_stream"])
def test_a_handler_shape_it_cannot_wrap_is_never_returned_unwrapped(shape):
    def servicer(requests, context):
        raise AssertionError("the servicer must never run unaudited")

    handler = getattr(grpc, f"{shape}_rpc_method_handler")(servicer)
    interceptor = AuditInterceptor(audit=None, policies=None)
    wrapped = interceptor.intercept_service(
        lambda details: handler, SimpleNamespace(method="/dataops.v1.Fake/Upload")
    )
    assert wrapped is not handler and getattr(wrapped, shape) is not servicer
