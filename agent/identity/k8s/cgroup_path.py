"""A cgroup path under kubelet's hierarchy -> the pod UID and container id it belongs to. Pure: no file is read.

Paths are relative to the host's cgroup2 mount (what the agent walks and what cgroup_mkdir reports), never a
cgroup-namespaced view. The shapes kubelet and the runtimes make:

  systemd driver   /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid, '-' as '_'>.slice/<container>
                   /kubepods.slice/kubepods-pod<uid>.slice/<container>                        (Guaranteed: no QoS level)
  cgroupfs driver  /kubepods/besteffort/pod<uid>/<container>      /kubepods/pod<uid>/<container>   (Guaranteed)
  container        cri-containerd-<id>.scope | crio-<id>.scope | docker-<id>.scope   (systemd)
                   <id> | crio-<id>                                                   (cgroupfs)
                   crio-conmon-<id>[.scope] is CRI-O's monitor, not the container: no container id
                   crun puts the container's processes in a child of the scope (…/crio-<id>.scope/container): the
                   container is the scope's, whatever lies below
  nested roots     anything before the kubepods level: kind (/system.slice/docker-<node>.scope/kubelet.slice/
                   kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod<uid>.slice),
                   minikube (/docker/<node>/kubepods/...), --cgroup-root=/kubelet
  static pods      the UID is kubelet's config hash (32 hex digits, no dashes); the mirror pod in the API carries it in
                   the kubernetes.io/config.mirror annotation (Pod.mirror_of)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

# systemd: "<prefix->kubepods[-<qos>]-pod<uid>.slice"; the prefix is the cgroup root's name (kind: "kubelet-")
_SYSTEMD_POD = re.compile(r"(?:[A-Za-z0-9_.]+-)*kubepods(?:-(besteffort|burstable))?-pod([0-9a-fA-F_-]+)\.slice")
_SYSTEMD_ROOT = re.compile(r"(?:[A-Za-z0-9_.]+-)*kubepods\.slice")
_SYSTEMD_QOS = re.compile(r"(?:[A-Za-z0-9_.]+-)*kubepods-(besteffort|burstable)\.slice")
_CGROUPFS_POD = re.compile(r"pod([0-9a-fA-F-]+)")
_UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}")
_ID = r"([0-9a-f]{64})"
_CONTAINERS = (
    ("containerd", re.compile(rf"cri-containerd-{_ID}\.scope")),
    ("crio", re.compile(rf"crio-{_ID}(?:\.scope)?")),
    ("docker", re.compile(rf"docker-{_ID}\.scope")),
    ("cgroupfs", re.compile(_ID)),                       # containerd, docker (cri-dockerd) with the cgroupfs driver
)
_CONMON = re.compile(rf"crio-conmon-{_ID}(?:\.scope)?")


@dataclass(frozen=True, slots=True)
class PodCgroup:
    pod_uid: str                    # as the API spells it: dashes (or the static pod's 32-digit hash)
    container_id: Optional[str]     # 64 hex digits; None for the pod level, CRI-O's conmon, an unknown shape
    qos: str                        # guaranteed | burstable | besteffort
    driver: str                     # systemd | cgroupfs
    runtime: Optional[str] = None   # containerd | crio | docker | cgroupfs (bare id) | None
    monitor: bool = False           # CRI-O's conmon: part of the pod, not of a container


def _norm_uid(raw: str) -> Optional[str]:
    uid = raw.replace("_", "-").lower()
    return uid if _UID.fullmatch(uid) else None


def _container(seg: str) -> tuple[Optional[str], Optional[str], bool]:
    if _CONMON.fullmatch(seg):
        return None, "crio", True
    for runtime, rx in _CONTAINERS:
        m = rx.fullmatch(seg)
        if m:
            return m.group(1), runtime, False
    return None, None, False


def parse(rel_path: str) -> Optional[PodCgroup]:
    """The pod (and container) a cgroup belongs to, or None when it is not inside a pod's cgroup."""
    segs = [s for s in rel_path.split("/") if s]
    for i, seg in enumerate(segs):
        m = _SYSTEMD_POD.fullmatch(seg)
        if m and i > 0 and (_SYSTEMD_ROOT.fullmatch(segs[i - 1]) or _SYSTEMD_QOS.fullmatch(segs[i - 1])):
            uid, qos, driver = _norm_uid(m.group(2)), m.group(1) or "guaranteed", "systemd"
        else:
            m = _CGROUPFS_POD.fullmatch(seg)
            if not m or "_" in seg:
                continue
            if i > 0 and segs[i - 1] == "kubepods":
                qos = "guaranteed"
            elif i > 1 and segs[i - 2] == "kubepods" and segs[i - 1] in ("besteffort", "burstable"):
                qos = segs[i - 1]
            else:
                continue
            uid, driver = _norm_uid(m.group(1)), "cgroupfs"
        if uid is None:
            return None
        if i + 1 == len(segs):
            return PodCgroup(uid, None, qos, driver)
        cid, runtime, monitor = _container(segs[i + 1])
        return PodCgroup(uid, cid, qos, driver, runtime, monitor)
    return None


def in_kubepods(rel_path: str) -> bool:
    """Whether the path is at or below a kubepods level (pods, QoS levels, the root itself)."""
    for seg in rel_path.split("/"):
        if seg == "kubepods" or _SYSTEMD_ROOT.fullmatch(seg):
            return True
    return False
