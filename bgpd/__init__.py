"""bgpd: the Calyx BGP daemon (drives ExaBGP, keeps the RIB, programs the FIB)."""
