"""calyxctl, the operator's command line (``calyx.cli.main``)."""
