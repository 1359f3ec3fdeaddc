"""OtlpCallSink with the SDK's own OTLP/HTTP exporter into a real HTTP server that decodes each request as an
opentelemetry.proto ExportTraceServiceRequest (tests/otlp_receiver.py): what goes over the wire, not an in-memory
exporter."""
from __future__ import annotations

from agent.export.otlp import OtlpCallSink, OtlpConfig
from agent.flows.model import IdentityData
from tests.otlp_receiver import OtlpReceiver
from tests.unit.test_otlp import LLAMA, OFFSET, WEB, make_call


def test_spans_over_otlp_http() -> None:
    with OtlpReceiver() as rx:
        sink = OtlpCallSink(OtlpConfig(endpoint=rx.url, service_name="aimesh-wire", schedule_delay_ms=50,
                                       headers={"x-tenant": "t1"}), OFFSET)
        sink.emit_call(make_call(), WEB, LLAMA, 4242, "python3", dialed=IdentityData("llama-vip", "model"))
        sink.emit_call(make_call(status=429, error_type="rate_limit_exceeded"), WEB, LLAMA, 4242, "python3")
        assert sink.flush(10)
        spans = rx.wait_spans(2)
        sink.shutdown()
        st = sink.stats()
    assert rx.bad_requests == 0 and st.exported == 2 and st.failed == 0
    ok, err = spans
    assert ok["name"] == "chat gpt-4o-mini" and ok["kind"] == 3   # SPAN_KIND_CLIENT
    assert ok["resource"]["service.name"] == "aimesh-wire" and ok["scope"] == "aimesh.l7"
    assert ok["start"] == OFFSET + 5_000_000_000 and ok["end"] == OFFSET + 6_500_000_000
    a = ok["attributes"]
    assert (a["gen_ai.request.model"], a["gen_ai.response.model"]) == ("gpt-4o-mini", "gpt-4o-mini-2024-07-18")
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (12, 300)
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert (a["aimesh.source.identity"], a["aimesh.destination.identity"]) == ("chat-frontend", "llama")
    assert a["aimesh.destination.dialed_identity"] == "llama-vip"
    assert err["status"] == 2 and err["attributes"]["error.type"] == "rate_limit_exceeded"   # STATUS_CODE_ERROR
