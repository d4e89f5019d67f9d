"""A fake kube-apiserver for tests (hand-written from the Kubernetes API reference)."""

from fakeapi.server import FakeApiServer, Resource, status

__all__ = ["FakeApiServer", "Resource", "status"]
