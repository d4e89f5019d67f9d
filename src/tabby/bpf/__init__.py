"""BPF side of the control plane: libbpf binding, object loading and pinning, typed map mirrors."""
