"""tabby-cni: wires a pod into its node (CNI spec 1.0) with IPAM from per-node IPPool blocks."""
