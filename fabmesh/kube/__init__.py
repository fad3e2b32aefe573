"""Thin Kubernetes access shared by the operator and the kubectl plugin."""
