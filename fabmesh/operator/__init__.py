"""The fabmesh operator: watches Nodes and writes every edge node's configuration."""
