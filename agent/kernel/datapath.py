"""The bcc boundary: compile bpf/, load the programs, attach them to a cgroup, write maps, read ring buffers.

Nothing else in aimesh imports bcc. The datapath attaches with BPF_F_ALLOW_MULTI and remembers each attachment, so
detach() removes exactly what it attached and nothing another tool put there.
"""
from __future__ import annotations

import ctypes as ct
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from bcc import BPF
from bcc.libbcc import lib

from agent.errors import AgentError
from agent.kernel import abi
from agent.kernel.maps import MapHandle
from agent.kernel.source import assemble
from agent.policy.compile import MapImage

log = logging.getLogger("aimesh.kernel")

BPF_F_ALLOW_MULTI = 2


@dataclass(frozen=True)
class ProgramSpec:
    name: str
    prog_type: int
    attach_type: int


PROGRAMS = (
    ProgramSpec("aimesh_connect4", BPF.CGROUP_SOCK_ADDR, 10),
    ProgramSpec("aimesh_connect6", BPF.CGROUP_SOCK_ADDR, 11),
    ProgramSpec("aimesh_sendmsg4", BPF.CGROUP_SOCK_ADDR, 14),
    ProgramSpec("aimesh_sendmsg6", BPF.CGROUP_SOCK_ADDR, 15),
    ProgramSpec("aimesh_recvmsg4", BPF.CGROUP_SOCK_ADDR, 19),
    ProgramSpec("aimesh_recvmsg6", BPF.CGROUP_SOCK_ADDR, 20),
    ProgramSpec("aimesh_getpeername4", BPF.CGROUP_SOCK_ADDR, 29),
    ProgramSpec("aimesh_getpeername6", BPF.CGROUP_SOCK_ADDR, 30),
    ProgramSpec("aimesh_post_bind4", BPF.CGROUP_SOCK, 12),
    ProgramSpec("aimesh_post_bind6", BPF.CGROUP_SOCK, 13),
    ProgramSpec("aimesh_ingress", BPF.CGROUP_SKB, 0),
    ProgramSpec("aimesh_egress", BPF.CGROUP_SKB, 1),
    ProgramSpec("aimesh_sock_ops", BPF.SOCK_OPS, 3),
)
# The fast path's verdict program attaches to the fastpath_sockets map, not to a cgroup.
SK_MSG = ProgramSpec("aimesh_sk_msg", BPF.SK_MSG, 7)   # BPF_SK_MSG_VERDICT


def _map_specs(limits: abi.Limits) -> dict[str, tuple[type, type, int, bool]]:
    """map name -> (key type, value type, capacity, batch-capable)."""
    return {
        "runtime_config": (ct.c_uint32, abi.RuntimeConfig, 1, False),
        "cgroup_identity": (ct.c_uint64, ct.c_uint32, limits.max_cgroups, True),
        "process_identity": (ct.c_uint32, ct.c_uint32, limits.max_processes, True),
        "endpoint_identity": (abi.EndpointKey, ct.c_uint32, limits.max_endpoints, False),
        "local_endpoint_identity": (abi.LocalEndpointKey, ct.c_uint32, limits.max_local_endpoints, True),
        "local_address": (abi.LocalEndpointKey, ct.c_uint8, 1024, True),
        "identity_info": (abi.IdentityKey, abi.IdentityInfo, limits.max_identities, True),
        "policy_verdict": (abi.PolicyKey, abi.PolicyValue, limits.max_policies, True),
        "redirect_service": (abi.RedirectKey, abi.RedirectValue, limits.max_redirects, True),
        "redirect_backend": (abi.BackendKey, abi.Backend, limits.max_backends, True),
        "udp_reverse_nat": (abi.SocketPeerKey, abi.Dialed, limits.max_reverse_nat, False),
        "udp_flows": (abi.SocketPeerKey, abi.UdpFlow, limits.max_udp_flows, False),
        "local_peer": (abi.LocalEndpointKey, abi.PeerOrigin, limits.max_local_peers, False),
    }


def release_free_memory() -> None:
    """Give freed heap back to the system (glibc keeps it otherwise: the compile and a big policy leave ~100 MB)."""
    try:
        ct.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


class Datapath:
    """Compiled and loaded programs plus their maps. Call attach() to put them in force, detach() to remove."""

    def __init__(self, limits: abi.Limits = abi.Limits(), bpf_root: Optional[Path] = None) -> None:
        self.limits = limits
        t0 = time.monotonic()
        try:
            self.bpf = BPF(text=assemble(bpf_root), cflags=limits.cflags() + ["-Wno-unused-function"])
        except Exception as e:  # bcc raises bare Exception for compile and load errors
            raise AgentError(f"compiling the BPF programs failed: {e}") from None
        try:
            self.functions = {p.name: self.bpf.load_func(p.name.encode(), p.prog_type, attach_type=p.attach_type)
                              if p.prog_type in (BPF.CGROUP_SOCK_ADDR, BPF.CGROUP_SOCK)
                              else self.bpf.load_func(p.name.encode(), p.prog_type)
                              for p in PROGRAMS}
            self.functions[SK_MSG.name] = self.bpf.load_func(SK_MSG.name.encode(), SK_MSG.prog_type)
        except Exception as e:
            raise AgentError(f"loading the BPF programs failed: {e}") from None
        log.info("compiled and loaded %d programs in %.1fs", len(PROGRAMS) + 1, time.monotonic() - t0)
        self.bpf.free_bcc_memory()
        release_free_memory()   # the compiler's heap: ~80 MB of RSS back
        self.maps: dict[str, MapHandle] = {}
        for name, (kt, vt, cap, batch) in _map_specs(limits).items():
            fd = lib.bpf_table_fd(self.bpf.module, name.encode())
            self.maps[name] = MapHandle(fd, name, kt, vt, cap, batch)
        self._attached: list[tuple[ProgramSpec, int]] = []
        self._sockhash_fd = lib.bpf_table_fd(self.bpf.module, b"fastpath_sockets")
        self._cgroup_fd: Optional[int] = None
        self._live: Optional[dict[str, list[bytes]]] = None   # the live generation's keys, per map, compact
        self.active_gen = 0
        self.config_flags = 0
        self.interim_ns = 0

    # ---- attach / detach ----
    def attach(self, cgroup_dir: Path) -> None:
        try:
            fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise AgentError(f"cannot open cgroup {cgroup_dir}: {e.strerror}") from None
        self._cgroup_fd = fd
        # the sk_msg verdict goes on the sockhash before sock_ops can put a socket in it
        res = lib.bpf_prog_attach(self.functions[SK_MSG.name].fd, self._sockhash_fd, SK_MSG.attach_type, 0)
        if res < 0:
            raise AgentError(f"attaching {SK_MSG.name} to fastpath_sockets failed: {os.strerror(-res)}")
        self._attached.append((SK_MSG, self._sockhash_fd))
        for spec in PROGRAMS:
            res = lib.bpf_prog_attach(self.functions[spec.name].fd, fd, spec.attach_type, BPF_F_ALLOW_MULTI)
            if res < 0:
                err = os.strerror(-res)
                self.detach()
                raise AgentError(f"attaching {spec.name} to {cgroup_dir} failed: {err}"
                                 + (" (another program is attached there without BPF_F_ALLOW_MULTI)"
                                    if -res == 1 else ""))
            self._attached.append((spec, fd))
        log.info("attached %d programs to %s", len(self._attached), cgroup_dir)

    def detach(self) -> None:
        for spec, fd in reversed(self._attached):
            res = lib.bpf_prog_detach2(self.functions[spec.name].fd, fd, spec.attach_type)
            if res < 0:
                log.warning("detaching %s failed: %s", spec.name, os.strerror(-res))
        if self._attached:
            log.info("detached %d programs", len(self._attached))
        self._attached.clear()
        if self._cgroup_fd is not None:
            os.close(self._cgroup_fd)
            self._cgroup_fd = None

    @property
    def attached_count(self) -> int:
        """Programs attached to the cgroup (the sk_msg program on the sockhash is not counted)."""
        return sum(1 for spec, _ in self._attached if spec is not SK_MSG)

    def close(self) -> None:
        self.detach()
        self.bpf.cleanup()

    # ---- policy generations ----
    def next_gen(self) -> int:
        return 0 if self._live is None else 1 - self.active_gen

    def apply(self, image: MapImage, settle_s: float = 0.01) -> None:
        """Write image into its generation, flip runtime_config to it, then drop the previous generation."""
        if self._live is not None and image.gen == self.active_gen:
            raise ValueError(f"generation {image.gen} is live; compile into {self.next_gen()}")
        written = {name: [bytes(k) for k, _ in items] for name, items in self._image_items(image)}
        try:
            for name, items in self._image_items(image):
                self.maps[name].update_many(items)
        except Exception:
            self._delete_keys(written)  # the live generation was never touched
            raise
        self.set_runtime(image.gen, image.config_flags)
        old, self._live = self._live, written
        if old is not None:
            time.sleep(settle_s)  # a program that read the old generation finishes within microseconds
            self._delete_keys(old)
        release_free_memory()

    @staticmethod
    def _image_items(image: MapImage):
        yield "identity_info", image.identity_info
        yield "endpoint_identity", [(k, ct.c_uint32(v)) for k, v in image.endpoints]
        yield "policy_verdict", image.policies
        yield "redirect_backend", image.backends
        yield "redirect_service", image.redirects

    def _delete_keys(self, keys: dict[str, list[bytes]]) -> None:
        for name, raw in keys.items():
            kt = self.maps[name].key_type
            self.maps[name].delete_many(kt.from_buffer_copy(b) for b in raw)

    def map_usage(self) -> dict[str, tuple[int, int]]:
        """(entries the live generation uses, capacity) for the agent-written maps; no kernel walk."""
        return {name: (len(raw), self.maps[name].capacity) for name, raw in (self._live or {}).items()}

    def set_runtime(self, gen: int, flags: int, interim_ns: Optional[int] = None) -> None:
        if interim_ns is not None:
            self.interim_ns = interim_ns
        self.maps["runtime_config"].update(ct.c_uint32(0), abi.RuntimeConfig(gen, flags, self.interim_ns))
        self.active_gen, self.config_flags = gen, flags

    # ---- identities of local workloads ----
    def set_cgroup_identity(self, cgroup_id: int, identity: int) -> None:
        self.maps["cgroup_identity"].update(ct.c_uint64(cgroup_id), ct.c_uint32(identity))

    def clear_cgroup_identity(self, cgroup_id: int) -> None:
        self.maps["cgroup_identity"].delete(ct.c_uint64(cgroup_id))

    def set_process_identity(self, pid: int, identity: int) -> None:
        self.maps["process_identity"].update(ct.c_uint32(pid), ct.c_uint32(identity))

    def clear_process_identity(self, pid: int) -> None:
        self.maps["process_identity"].delete(ct.c_uint32(pid))

    def set_local_endpoint(self, key: abi.LocalEndpointKey, identity: int) -> None:
        self.maps["local_endpoint_identity"].update(key, ct.c_uint32(identity))

    def set_local_addresses(self, keys: list[abi.LocalEndpointKey]) -> None:
        m = self.maps["local_address"]
        m.delete_many(list(m.keys()))
        m.update_many([(k, ct.c_uint8(1)) for k in keys])

    # ---- events and counters ----
    def open_ring_buffers(self, on_decision: Callable[[bytes], None], on_agent: Callable[[bytes], None],
                          on_flow: Callable[[bytes], None]) -> None:
        def wrap(fn):
            def cb(_ctx, data, size):
                try:
                    fn(ct.string_at(data, size))
                except Exception:  # never let a decode bug unwind through libbpf's callback
                    log.exception("event callback failed")
                return 0
            return cb
        self._cbs = (wrap(on_decision), wrap(on_agent), wrap(on_flow))
        self.bpf[b"decision_events"].open_ring_buffer(self._cbs[0])
        self.bpf[b"agent_events"].open_ring_buffer(self._cbs[1])
        self.bpf[b"flow_events"].open_ring_buffer(self._cbs[2])

    def poll(self, timeout_ms: int) -> None:
        """Wait up to timeout_ms for an agent event (they wake us), then drain every ring: decision and flow events
        are queued without a wakeup (see maps.h)."""
        self.bpf.ring_buffer_poll(timeout_ms)
        self.bpf.ring_buffer_consume()

    def counters(self) -> list[int]:
        """verdict_counters summed over CPUs, one int per slot (see abi.h)."""
        table = self.bpf[b"verdict_counters"]
        return [int(sum(table[ct.c_int(i)])) for i in range(abi.COUNTER_SLOTS)]
