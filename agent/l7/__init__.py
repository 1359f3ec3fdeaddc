"""Capture decoders per protocol: bytes seen on a connection -> neutral records. Pure: no kernel, no exporter.

http1.py   HTTP/1.1 per connection, both directions (llhttp via httptools), HTTP/2 and gRPC recognised, never decoded
llm.py     LLM API calls recognised by method, path and body shape; request scan and response parse, streaming
record.py  ModelCallRecord and ConnectionDecoder, the one entry point: (direction, ts_ns, bytes) -> records
"""
