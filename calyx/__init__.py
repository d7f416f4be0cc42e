"""Calyx: a routed container network for Linux hosts.

The ``calyx`` package is the shared library (datastore, model, selectors, IPAM, kernel drivers)
and the operator's tools (calyxctl, the CNI plugins). ``felix`` and ``bgpd`` import it; it imports
neither of them.
"""

__version__ = "0.1.0"
