"""Dataplane managers: each owns one concern, diffs desired vs programmed, applies the delta."""
