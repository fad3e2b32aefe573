"""A thin, typed netlink driver (links, addresses, routes, rules) over pyroute2."""
