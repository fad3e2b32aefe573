"""Thin drivers that keep fabmesh's own iptables chains and ipsets equal to a desired state."""
