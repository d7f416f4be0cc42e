"""felix: the Calyx node agent (workload routes, policy in iptables and ipsets, status)."""
