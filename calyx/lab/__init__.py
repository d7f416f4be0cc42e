"""Labs: containerlab topologies built from network namespaces, with etcd, routers and Calyx in them.

:mod:`calyx.lab.topology` reads a ``*.clab.yml`` and its ``calyx-lab.yml`` sidecar,
:mod:`calyx.lab.fabric` builds namespaces and links, :mod:`calyx.lab.procs` starts and stops the
processes, :mod:`calyx.lab.runner` ties them together (``calyxctl lab up|down|status|exec``), and
:mod:`calyx.lab.forward` makes the lab's etcd reachable from the machine. See docs/labs.md.
"""
