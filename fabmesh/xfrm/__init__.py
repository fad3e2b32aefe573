"""A thin driver for the kernel's IPsec policy database: fabmesh's own bypass xfrm policies."""
