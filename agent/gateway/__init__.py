"""The node-local L7 gateway for model APIs (issue 10): policy (pure), budgets (pure), the aiohttp server, the node
CA, the records it sends the agent, and the supervisor that keeps its process running. agent/gateway/origin.py is
the kernel-backed origin table (the kernel's record of redirected connections)."""
