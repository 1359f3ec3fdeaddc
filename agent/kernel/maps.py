"""Raw map access by fd with our own ctypes layouts (abi.py), batched where the map type allows it. No bcc."""
from __future__ import annotations

import ctypes as ct
import errno
import os
from typing import Iterable, Iterator, Sequence, TypeVar

from agent.kernel import bpfsys

K = TypeVar("K", bound=ct.Structure)

BPF_ANY = bpfsys.BPF_ANY


class MapError(Exception):
    pass


class MapHandle:
    """One BPF map: fd, name, capacity and the ctypes types of its key and value."""

    def __init__(self, fd: int, name: str, key_type, value_type, capacity: int, batch: bool = True) -> None:
        if fd < 0:
            raise MapError(f"map {name}: no such map in the loaded program")
        self.fd, self.name, self.key_type, self.value_type = fd, name, key_type, value_type
        self.capacity = capacity
        self.batch = batch

    def update(self, key, value) -> None:
        res = bpfsys.map_update(self.fd, key, value, BPF_ANY)
        if res < 0:
            raise MapError(f"map {self.name}: update failed: {os.strerror(-res)}")

    def insert(self, key, value) -> bool:
        """Create the entry; False (and nothing written) when the key is there already."""
        res = bpfsys.map_update(self.fd, key, value, bpfsys.BPF_NOEXIST)
        if res == -errno.EEXIST:
            return False
        if res < 0:
            raise MapError(f"map {self.name}: insert failed: {os.strerror(-res)}")
        return True

    def delete(self, key) -> bool:
        return bpfsys.map_delete(self.fd, key)

    def lookup(self, key):
        v = self.value_type()
        if not bpfsys.map_lookup(self.fd, key, v):
            return None
        return v

    def update_many(self, items: Sequence[tuple[object, object]]) -> None:
        if not items:
            return
        if self.batch:
            n = len(items)
            keys = (self.key_type * n)(*[k for k, _ in items])
            values = (self.value_type * n)(*[v for _, v in items])
            if bpfsys.map_update_batch(self.fd, keys, values, n) == 0:
                return
            # fall back to one by one (older kernels, or a partial batch), which names the failing entry
        for k, v in items:
            self.update(k, v)

    def delete_many(self, keys: Iterable[object]) -> None:
        for k in keys:
            self.delete(k)

    def keys(self) -> Iterator:
        key = self.key_type()
        nxt = self.key_type()
        if not bpfsys.map_next_key(self.fd, None, nxt):
            return
        while True:
            yield type(nxt).from_buffer_copy(nxt)
            ct.memmove(ct.byref(key), ct.byref(nxt), ct.sizeof(key))
            if not bpfsys.map_next_key(self.fd, key, nxt):
                return

    def items(self) -> Iterator[tuple[object, object]]:
        for k in self.keys():
            v = self.lookup(k)
            if v is not None:
                yield k, v

    def count(self) -> int:
        return sum(1 for _ in self.keys())
