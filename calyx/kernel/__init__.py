"""Kernel drivers shared by felix and bgpd: network namespaces, raw rtnetlink, the route table, commands.

``netns``      move a thread into a network namespace; sockets created inside one
``rtnl``       raw NETLINK_ROUTE socket: batched route writes, filtered dumps, link lookups
``routetable`` desired routes → minimal kernel writes, owned by route protocol number
``cmd``        subprocess runner for iptables-restore, ipset and ``ip -batch``
``autodetect`` which IPv4 address is this host's (default route, interface regex, can-reach); read only

docs/kernel.md has the route ownership matrix and the kernel quirks these modules handle.
"""
