"""The lab: a virtual multi-node cluster built from network namespaces on one host."""
