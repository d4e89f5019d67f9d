"""Controllers that play kube-controller-manager for the lab."""
