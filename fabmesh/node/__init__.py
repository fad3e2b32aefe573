"""Programming one node from its NodeMesh: shared by the edge agent and the cloud connector."""
