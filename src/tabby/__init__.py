"""tabby: an eBPF dataplane for Kubernetes."""

__version__ = "0.1.0"
