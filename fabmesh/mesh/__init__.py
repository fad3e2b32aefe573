"""Shared model of the mesh: the schema operator, agents and connector agree on."""
