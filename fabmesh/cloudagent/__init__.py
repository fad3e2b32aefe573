"""The cloud-side route agent: edge addresses routed via the active connector from every other cloud node."""
