"""Everything fabmesh knows about strongSwan: its configuration file and the VICI driver."""
