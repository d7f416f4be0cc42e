"""IP address management: blocks per host, handles per workload, fixed addresses by reservation.

- :mod:`.logic`: pure decisions (pools usable by a node, block to claim, address to take, errors);
- :mod:`.allocator`: :class:`~.allocator.IPAM`, which reads the datastore, plans with :mod:`.logic`
  and commits block and handle together with compare-and-swap;
- :mod:`.check`: consistency check and repair;
- :mod:`.store`: the datastore slice IPAM needs, over the gRPC client or :mod:`.etcdhttp` (the
  lightweight client the CNI plugins use).

The operator's guide is docs/ipam.md.
"""
