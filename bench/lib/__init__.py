"""What the benchmark scenarios share, one definition each.

- :mod:`bench.lib.stats`: percentiles, summaries and table cells;
- :mod:`bench.lib.http`: a raw keep-alive HTTP/1.1 client and one-off requests;
- :mod:`bench.lib.zkwire`: ZooKeeper's wire protocol, decoded enough to name
  every request and watch notification a sidecar exchanges (over
  ``harness.TcpProxy``).

Processes, machines, ``wrk`` and result files are in :mod:`bench.common`.
"""
