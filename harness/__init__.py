"""Local development and test harness: a real ZooKeeper and real sidecar processes.

Used by ``scripts/dev.sh``, the test fixtures and ``bench/``.  Every process
listens on loopback only and is owned (started and stopped) by its caller.
"""

from .process import SidecarProcess, free_port
from .proxy import TcpProxy
from .zookeeper import LocalEnsemble, LocalZooKeeper, find_zkserver

__all__ = ["LocalEnsemble", "LocalZooKeeper", "SidecarProcess", "TcpProxy", "find_zkserver", "free_port"]
