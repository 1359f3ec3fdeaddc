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
    """Gives each identity name a u32 that never changes while the agent runs, across config reloads."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {UNMANAGED.name: UNMANAGED.id, WORLD.name: WORLD.id}
        self._next = ID_FIRST_USER

    def id_of(self, name: str) -> int:
        if name not in self._ids:
            self._ids[name] = self._next
            self._next += 1
        return self._ids[name]
