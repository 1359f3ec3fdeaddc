"""Errors the CLI turns into one readable line (no traceback)."""


class AgentError(Exception):
    """A condition the operator must fix: not root, no BPF, no headers, no cgroup v2, a bad config."""
