"""A local hybrid cluster in network namespaces: the demo and the end-to-end test bed."""
