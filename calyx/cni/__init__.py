"""The CNI plugins: ``calyx`` (:mod:`.plugin`, wires a container) and ``calyx-ipam``
(:mod:`.ipam_plugin`, Calyx IPAM for any CNI plugin). The protocol is in :mod:`.spec`, the
configuration fields in :mod:`.netconf`, the kernel work in :mod:`.dataplane` over
:mod:`.netlink`. docs/cni.md is the operator's guide."""
