"""Kubernetes as an identity source: pods on this node, namespaces, Services and EndpointSlices (issue 11)."""
