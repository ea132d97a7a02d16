"""zk-cache-sidecar: a coherent local cache coordinated through ZooKeeper."""

__version__ = "0.1.0"
__all__ = ["__version__"]
