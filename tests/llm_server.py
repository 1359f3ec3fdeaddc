"""The local model server of the tests lives in agent/demo/llm_server.py (the demo's model servers run it too)."""
from agent.demo.llm_server import LOGPROBS, WORDS, ByteLog, LLMServer, SentCall, count_words

__all__ = ["LOGPROBS", "WORDS", "ByteLog", "LLMServer", "SentCall", "count_words"]
