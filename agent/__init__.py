"""aimesh: an eBPF, sidecar-free governance mesh for AI workloads."""
__version__ = "0.2.0"
