"""The edge agent: programs one edge node from its mounted mesh.yaml."""
