"""The local model server of the tests lives in agent/demo/llm_server.py (the demo's model servers run it too).

`python -m tests.llm_server` serves in a process of its own (the kernel tests run it in a governed cgroup): it prints
its URL, then answers each `calls` line on stdin with one JSON line, the list of SentCall it answered so far (what it
sent, so a test compares records with the server's word, not with expectations of its own); EOF stops it.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import threading

from agent.demo.llm_server import LOGPROBS, WORDS, ByteLog, LLMServer, SentCall, count_words


def main() -> None:
    lock = threading.Lock()
    sent: list[SentCall] = []

    def on_call(c: SentCall) -> None:
        with lock:
            sent.append(c)
    with LLMServer(record=False, on_call=on_call) as srv:
        print(srv.url, flush=True)
        for line in sys.stdin:
            if line.strip() == "calls":
                with lock:
                    calls = [dataclasses.asdict(c) for c in sent]
                print(json.dumps(calls), flush=True)


if __name__ == "__main__":
    main()

__all__ = ["LOGPROBS", "WORDS", "ByteLog", "LLMServer", "SentCall", "count_words"]
