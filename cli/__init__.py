"""cachectl: the command-line tool for zk-cache-sidecar."""
