"""Identity numbering: stable u32 ids by name for the life of the agent, and what each id stands for."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from agent.kernel.abi import ID_FIRST_USER, ID_UNMANAGED, ID_WORLD


@dataclass(frozen=True)
class IdentityMeta:
    id: int
    name: str
    kind: str            # model | dataset | service | external | reserved
    version: Optional[str] = None


UNMANAGED = IdentityMeta(ID_UNMANAGED, "unmanaged", "reserved")
WORLD = IdentityMeta(ID_WORLD, "world", "reserved")


class IdentityNumbering:
    """Gives each identity name a u32 that never changes, across config reloads and agent restarts.

    The kernel's cgroup, process and local endpoint maps hold these numbers and outlive the agent, so the numbering
    is saved in the datapath's manifest (to_state) and a restarted agent continues it (from_state): a number is never
    given to another name.
    """

    def __init__(self) -> None:
        self._ids: dict[str, int] = {UNMANAGED.name: UNMANAGED.id, WORLD.name: WORLD.id}
        self._next = ID_FIRST_USER

    def to_state(self) -> dict:
        return {"ids": dict(self._ids), "next": self._next}

    @classmethod
    def from_state(cls, state: Optional[dict]) -> "IdentityNumbering":
        n = cls()
        if not state:
            return n
        ids = state.get("ids")
        nxt = state.get("next")
        if not isinstance(ids, dict) or not isinstance(nxt, int):
            raise ValueError("identity numbering in the manifest is malformed")
        for name, iid in ids.items():
            if not isinstance(name, str) or not isinstance(iid, int) or iid < 0:
                raise ValueError(f"identity numbering in the manifest is malformed at {name!r}")
        n._ids.update(ids)
        n._next = max(nxt, ID_FIRST_USER, *(i + 1 for i in ids.values()))
        return n

    def id_of(self, name: str) -> int:
        if name not in self._ids:
            self._ids[name] = self._next
            self._next += 1
        return self._ids[name]
