"""The kubectl plugin (``kubectl fabmesh status|doctor|graph``): read-only views of the mesh from the API.

``checks`` and ``graph`` decide and render from plain dicts (pure); ``command``
only fetches the objects and prints. Nothing here writes to the cluster.
"""
