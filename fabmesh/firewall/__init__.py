"""fabmesh's firewall: which chains and ipsets a node gets (``rules``, pure), and the thin drivers
that keep the kernel's equal to them (``iptables``, ``ipset``)."""
