"""cgroup path -> (pod UID, container id): one path of every shape kubelet and the runtimes make, written as they are."""
from __future__ import annotations

import pytest

from agent.identity.k8s.cgroup_path import PodCgroup, in_kubepods, parse

UID = "5f6d6a7e-1b2c-4d3e-9f8a-0123456789ab"
U_ = UID.replace("-", "_")                            # systemd escapes '-' in unit names as '_'
CID = "3f1c9e7a2b4d6f8091a3c5e7f9b1d3f5a7c9e1b3d5f7a9c1e3b5d7f9a1c3e5f7"
STATIC = "0f9a3c1e2b4d5e6f7a8b9c0d1e2f3a4b"                # kubelet's config hash: a static pod's UID

CASES = [
    # systemd driver, containerd, each QoS class (Guaranteed has no QoS level)
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{U_}.slice/cri-containerd-{CID}.scope",
     PodCgroup(UID, CID, "burstable", "systemd", "containerd")),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{U_}.slice/cri-containerd-{CID}.scope",
     PodCgroup(UID, CID, "besteffort", "systemd", "containerd")),
    (f"/kubepods.slice/kubepods-pod{U_}.slice/cri-containerd-{CID}.scope",
     PodCgroup(UID, CID, "guaranteed", "systemd", "containerd")),
    # the pod level itself
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{U_}.slice",
     PodCgroup(UID, None, "burstable", "systemd")),
    # CRI-O (systemd), its conmon monitor, and crun's child cgroup below the scope
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{U_}.slice/crio-{CID}.scope",
     PodCgroup(UID, CID, "burstable", "systemd", "crio")),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{U_}.slice/crio-conmon-{CID}.scope",
     PodCgroup(UID, None, "burstable", "systemd", "crio", monitor=True)),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{U_}.slice/crio-{CID}.scope/container",
     PodCgroup(UID, CID, "burstable", "systemd", "crio")),
    # docker (cri-dockerd), systemd
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{U_}.slice/docker-{CID}.scope",
     PodCgroup(UID, CID, "besteffort", "systemd", "docker")),
    # cgroupfs driver: containerd/docker name the cgroup by the bare id, CRI-O with crio-
    (f"/kubepods/burstable/pod{UID}/{CID}", PodCgroup(UID, CID, "burstable", "cgroupfs", "cgroupfs")),
    (f"/kubepods/besteffort/pod{UID}/{CID}", PodCgroup(UID, CID, "besteffort", "cgroupfs", "cgroupfs")),
    (f"/kubepods/pod{UID}/{CID}", PodCgroup(UID, CID, "guaranteed", "cgroupfs", "cgroupfs")),
    (f"/kubepods/besteffort/pod{UID}/crio-{CID}", PodCgroup(UID, CID, "besteffort", "cgroupfs", "crio")),
    (f"/kubepods/besteffort/pod{UID}/crio-conmon-{CID}",
     PodCgroup(UID, None, "besteffort", "cgroupfs", "crio", monitor=True)),
    (f"/kubepods/pod{UID}", PodCgroup(UID, None, "guaranteed", "cgroupfs")),
    # static pods: the config hash
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC}.slice/cri-containerd-{CID}.scope",
     PodCgroup(STATIC, CID, "burstable", "systemd", "containerd")),
    (f"/kubepods/burstable/pod{STATIC}/{CID}", PodCgroup(STATIC, CID, "burstable", "cgroupfs", "cgroupfs")),
    # nested roots: kind (node in a docker container, --cgroup-root=/kubelet, systemd), minikube (cgroupfs)
    (f"/system.slice/docker-{CID}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
     f"kubelet-kubepods-besteffort-pod{U_}.slice/cri-containerd-{CID}.scope",
     PodCgroup(UID, CID, "besteffort", "systemd", "containerd")),
    (f"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{U_}.slice/cri-containerd-{CID}.scope",
     PodCgroup(UID, CID, "guaranteed", "systemd", "containerd")),
    (f"/docker/{CID}/kubepods/burstable/pod{UID}/{CID}", PodCgroup(UID, CID, "burstable", "cgroupfs", "cgroupfs")),
    # an unknown container shape still belongs to the pod
    (f"/kubepods/burstable/pod{UID}/something-else", PodCgroup(UID, None, "burstable", "cgroupfs")),
]


@pytest.mark.parametrize("path,want", CASES, ids=[c[0][-60:] for c in CASES])
def test_every_kubelet_shape(path, want):
    assert parse(path) == want
    assert in_kubepods(path)


@pytest.mark.parametrize("path", [
    "/", "/kubepods.slice", "/kubepods.slice/kubepods-burstable.slice", "/kubepods/burstable", "/kubepods",
    "/system.slice/containerd.service", "/user.slice/user-1000.slice",
    f"/demo/pod{UID}/{CID}",                                   # a pod-looking name outside kubepods
    f"/kubepods/burstable/pod{U_}/{CID}",                       # cgroupfs never escapes the UID
    f"/kubepods/burstable/podnot-a-uid/{CID}",
    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice",
])
def test_not_a_pod(path):
    assert parse(path) is None


def test_in_kubepods_only_under_the_hierarchy():
    assert in_kubepods("/kubepods.slice/kubepods-burstable.slice")
    assert not in_kubepods("/system.slice/kubelet.service")
    assert not in_kubepods("/demo/kubepods-ish")
