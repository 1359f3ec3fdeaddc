"""`aimesh demo`: the agent plus a few real workloads in their own cgroups, and a live view of its decisions.

Modules:
  plan       the `demo:` section of the demo config (which workloads, where) and the agent config without it
  workloads  the workload processes (`python -m agent.demo.workloads <role> ...`): model/dataset servers, clients
             (the chat clients are the official openai SDK)
  llm_server the OpenAI/Anthropic/Ollama wire-format server the model servers run (and tests/llm_server.py)
  tls        the demo CA and the https model server's certificate, made at start in the private work directory
  cgroups    the demo's cgroup v2 subtree: find the mount, create, empty and remove it
  procs      start, watch and stop child processes; follow their log files
  view       pure: flow-log line / `aimesh calls -o json` line -> record, counts, frame -> text
  runner     wiring: `add_arguments(parser)` and `run(args) -> int`
"""
