"""`python -m bench.decode_micro`: what one model call costs the agent's decode path, without a kernel.

The capture records of one call exactly as bench.calls makes them (`aimesh-lg llmcalls` / `llmserver`, bench/loadgen.c):
a 4 KB streamed chat request (openai-python's headers, `model` after `messages`) written at once, and its chunked
SSE response — 20 content chunks, finish, usage, `[DONE]` — read either in one read (what the C client does) or one
read per SSE chunk (`--response-reads events`, what a slow stream looks like). Each read or write becomes capture
records of `--chunk` data bytes (the kernel's Limits.capture_chunk, 4 KiB) followed by zeroes to the full record
size, as capture_events holds them. These records are fed N times over `--conns` keep-alive connections (round
robin, one call at a time per connection, like the C client) and each stage is timed per call:

  header    decode_capture_event alone (bytes -> CaptureChunk)
  tracker   decode_capture_event + CaptureTracker.on_chunk (HTTP/1 with h11, the request scan, the SSE parse)
  sinks     the daemon's per-call dispatch (agent/export/call_sinks.CallDispatch: identities, comm, every sink:
            ModelCallTally, GenAiTally, a ModelCallExporter's queue) for one finished record
  agent     everything the daemon does per record: decode, tracker, TLS visibility, dispatch

Times are CPU time of this process (time.process_time: other tenants of the host count less). Every run checks that N records came out with the fields the server sent (model, tokens, 22 chunks, finish, usage).
`--profile` prints the cProfile top entries of the agent stage. Nothing is asserted; the figures are printed.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from dataclasses import dataclass
from typing import Optional

from agent.export.call_sinks import CallDispatch
from agent.export.collector_client import ExporterConfig, ModelCallExporter
from agent.export.genai_metrics import GenAiTally, ModelLabel
from agent.export.model_metrics import ModelCallTally
from agent.kernel import abi
from agent.l7.capture import CaptureTracker, decode_capture_event
from agent.policy.identities import IdentityMeta
from agent.l7.tls_visibility import ProcessInfo, TlsVisibility

MODEL = "llama-3.1-8b"      # LLM_MODEL in bench/loadgen.c
SRC_ID, DST_ID = 16, 17


def llm_request(body: int) -> bytes:
    """bench/loadgen.c llm_request: openai-python's headers and a chat body of `body` bytes, `model` last."""
    pre = b'{"messages": [{"role": "user", "content": "'
    post = (b'"}], "model": "' + MODEL.encode() + b'", "stream": true, "stream_options": {"include_usage": true}}')
    fill = body - len(pre) - len(post)
    if fill < 0:
        raise ValueError(f"--request-bytes: at least {len(pre) + len(post)}, got {body}")
    text = bytes(b" "[0] if i % 6 == 5 else b"w"[0] for i in range(fill))
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json\r\n"
            b"Content-Type: application/json\r\nUser-Agent: aimesh-lg\r\nAuthorization: Bearer sk-bench\r\n"
            b"Content-Length: %d\r\n\r\n" % body)
    return head + pre + text + post


def llm_response(chunks: int) -> list[bytes]:
    """bench/loadgen.c llm_response, as its pieces: the head with the first chunk, then one piece per SSE chunk
    (the last one carries the chunked body's end)."""
    base = (f'"id": "chatcmpl-b", "object": "chat.completion.chunk", "created": 1, "model": "{MODEL}-served"')
    events = [f'{{{base}, "choices": [{{"index": 0, "delta": {{"content": " tok{i}"}}, "logprobs": null, '
              f'"finish_reason": null}}]}}' for i in range(chunks)]
    events.append(f'{{{base}, "choices": [{{"index": 0, "delta": {{}}, "logprobs": null, "finish_reason": "stop"}}]}}')
    events.append(f'{{{base}, "choices": [], "usage": {{"prompt_tokens": 700, "completion_tokens": {chunks}, '
                  f'"total_tokens": {700 + chunks}}}}}')
    events.append("[DONE]")
    pieces = []
    for e in events:
        ev = f"data: {e}\n\n".encode()
        pieces.append(b"%x\r\n" % len(ev) + ev + b"\r\n")
    pieces[0] = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                 b"Cache-Control: no-cache\r\n\r\n") + pieces[0]
    pieces[-1] += b"0\r\n\r\n"
    return pieces


def records(kind: abi.CaptureKind, direction: int, data: bytes, cookie: int, ts: int, chunk: int) -> list[bytes]:
    """The capture_events records one syscall of `data` makes: chunk-sized pieces (at most CAPTURE_CHUNKS_PER_CALL),
    each padded to the record's full size like the ring holds it."""
    out = []
    for i, off in enumerate(range(0, max(len(data), 1), chunk)):
        if i >= abi.CAPTURE_CHUNKS_PER_CALL:
            break
        piece = data[off:off + chunk]
        h = abi.CaptureEvent(ts_ns=ts, cookie=cookie, tgid=4242, fd=5, src_id=SRC_ID, dst_id=DST_ID,
                             actual_dst_id=DST_ID, total=len(data), offset=off, len=len(piece), kind=kind,
                             direction=direction)
        out.append(bytes(h) + piece + b"\0" * (chunk - len(piece)))
    return out


@dataclass(frozen=True)
class Workload:
    calls: list[list[bytes]]    # per call, its records in ring order (cookie = the connection)


def workload(n: int, conns: int, request_bytes: int, chunks: int, chunk: int, per_event: bool) -> Workload:
    req = llm_request(request_bytes)
    pieces = llm_response(chunks)
    reads = pieces if per_event else [b"".join(pieces)]
    out: list[list[bytes]] = []
    ts = 1_000_000
    for i in range(n):
        cookie = 1000 + i % conns
        recs = records(abi.CaptureKind.DATA, abi.CaptureDirection.SEND, req, cookie, ts, chunk)
        for r in reads:
            ts += 20_000
            recs += records(abi.CaptureKind.DATA, abi.CaptureDirection.RECV, r, cookie, ts, chunk)
        ts += 50_000
        out.append(recs)
    return Workload(out)


def closes(conns: int, ts: int) -> list[bytes]:
    return [bytes(abi.CaptureEvent(ts_ns=ts, cookie=1000 + c, tgid=4242, fd=5, src_id=SRC_ID, dst_id=DST_ID,
                                   actual_dst_id=DST_ID, kind=abi.CaptureKind.CLOSE)) for c in range(conns)]


def identities() -> dict[int, IdentityMeta]:
    return {SRC_ID: IdentityMeta(SRC_ID, "load", "service"), DST_ID: IdentityMeta(DST_ID, "fast", "model")}


def dispatch() -> tuple[CallDispatch, ModelCallTally, ModelCallExporter]:
    tally = ModelCallTally()
    genai = GenAiTally(ModelLabel(["llama-*"]))
    exp = ModelCallExporter(ExporterConfig(target="127.0.0.1:1", agent_id="micro", max_queue_records=10**7),
                            "node", lambda: 0)
    sinks = [tally, genai, exp]
    ids = identities()
    return CallDispatch(lambda: ids, lambda _pid: "aimesh-lg", lambda: sinks), tally, exp


def check(recs: list, n: int, chunks: int) -> Optional[str]:
    if len(recs) != n:
        return f"{len(recs)} records for {n} calls"
    r = recs[-1]
    want = dict(request_model=MODEL, response_model=MODEL + "-served", stream=True, status=200, input_tokens=700,
                output_tokens=chunks, output_chunks=chunks + 2, finish_reasons=("stop",), incomplete=False,
                truncated=False, include_usage=True)
    for k, v in want.items():
        if getattr(r, k) != v:
            return f"record field {k} is {getattr(r, k)!r}, expected {v!r}"
    return None


def stage_header(w: Workload) -> int:
    dec = decode_capture_event
    for call in w.calls:
        for raw in call:
            dec(raw)
    return len(w.calls)


def run_stage(name: str, w: Workload, conns: int, chunks: int) -> tuple[float, Optional[str]]:
    """µs per call of one stage over the workload, and what the check said (None: fine)."""
    n = len(w.calls)
    t_end = 10**15
    if name == "header":
        t0 = time.process_time()
        stage_header(w)
        return (time.process_time() - t0) / n * 1e6, None
    tracker = CaptureTracker()
    got: list = []
    if name == "tracker":
        dec, on = decode_capture_event, tracker.on_chunk
        t0 = time.process_time()
        for call in w.calls:
            for raw in call:
                got.extend(on(dec(raw)))
        dt = time.process_time() - t0
        for raw in closes(conns, t_end):
            got.extend(on(dec(raw)))
        return dt / n * 1e6, check([c.record for c in got], n, chunks)
    d, tally, _exp = dispatch()
    if name == "sinks":
        for call in w.calls[:conns * 2]:
            for raw in call:
                got.extend(tracker.on_chunk(decode_capture_event(raw)))
        one = got[-1]
        t0 = time.process_time()
        for _ in range(n):
            d([one])
        dt = time.process_time() - t0
        return dt / n * 1e6, None if d.calls == n else f"dispatched {d.calls} of {n}"
    tls = TlsVisibility(describe=lambda pid: ProcessInfo(pid, "aimesh-lg", "/bin/aimesh-lg"))
    dec, on, vis = decode_capture_event, tracker.on_chunk, tls.on_chunk
    t0 = time.process_time()
    for call in w.calls:
        for raw in call:
            chunk = dec(raw)
            out = on(chunk)
            if out:
                got.extend(out)
                d(out)
            vis(chunk)
    dt = time.process_time() - t0
    return dt / n * 1e6, check([c.record for c in got], n, chunks) or (
        None if d.calls == n else f"dispatched {d.calls} of {n}")


STAGES = ("header", "tracker", "sinks", "agent")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.decode_micro", description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--conns", type=int, default=8, help="keep-alive connections the calls are spread over")
    ap.add_argument("--request-bytes", type=int, default=4096)
    ap.add_argument("--chunks", type=int, default=20, help="SSE content chunks per response")
    ap.add_argument("--chunk", type=int, default=abi.Limits().capture_chunk, help="data bytes per capture record")
    ap.add_argument("--response-reads", choices=("one", "events"), default="events",
                    help="the response in one read (bench.calls' C client) or one read per SSE chunk")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"some of {','.join(STAGES)}")
    ap.add_argument("--repeat", type=int, default=3, help="runs per stage; the best is reported")
    ap.add_argument("--profile", action="store_true", help="cProfile the agent stage once, print the top entries")
    a = ap.parse_args(argv)
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        print(f"decode_micro: --stages: unknown stage {bad[0]!r}", file=sys.stderr)
        return 2
    try:
        w = workload(a.calls, a.conns, a.request_bytes, a.chunks, a.chunk, a.response_reads == "events")
    except ValueError as e:
        print(f"decode_micro: {e}", file=sys.stderr)
        return 2
    per_call = len(w.calls[0])
    print(f"{a.calls} calls over {a.conns} connections, {per_call} capture records per call "
          f"({a.request_bytes} B request, {a.chunks} SSE chunks, response in {a.response_reads} read(s))")
    status = 0
    for s in stages:
        best, err = min((run_stage(s, w, a.conns, a.chunks) for _ in range(max(1, a.repeat))), key=lambda r: r[0])
        print(f"  {s:<8} {best:8.1f} µs/call   ({1e6 / best:,.0f} calls/s)" + (f"   CHECK FAILED: {err}" if err else ""))
        status = status or (1 if err else 0)
    if a.profile:
        prof = cProfile.Profile()
        prof.enable()
        run_stage("agent", w, a.conns, a.chunks)
        prof.disable()
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    return status


if __name__ == "__main__":
    sys.exit(main())
