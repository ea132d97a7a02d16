"""What every benchmark scenario shares besides :mod:`bench.lib` (statistics, HTTP, ZooKeeper's wire).

Owned processes (pinned with ``taskset``, stopped in reverse order), the
machine line every report carries, a scenario's command line, progress and
result files, the SQLite origin written straight in, ``wrk`` runs with exact
percentiles, an open-loop fixed-rate HTTP client, ``/proc`` and JVM readers.

The open-loop client also runs as its own process, pinned to the load core::

    python -m bench.common open-loop --port 7070 --path /v1/keys/bench/hit --rate 1000 --duration 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from harness import SidecarProcess
from harness.process import die_with_parent
from sidecar.origins.sqlite import SqliteOrigin

from .lib.http import read_response
from .lib.stats import pct

T = TypeVar("T")

__all__ = [
    "LOAD_CPU",
    "REPO",
    "SERVER_CPU",
    "WRK_GRID",
    "CpuMeter",
    "OwnedProcess",
    "PinnedSidecar",
    "command_line",
    "cpu_note",
    "create_origin_schema",
    "graceful_sigterm",
    "jvm_live_heap",
    "machine",
    "machine_line",
    "merge_wrk",
    "open_loop",
    "open_loop_client",
    "pinned",
    "proc_status_bytes",
    "progress",
    "python_module",
    "run_async",
    "run_scenario",
    "run_wrk",
    "scenario_parser",
    "seed_origin",
    "start_sidecars",
    "summarize_open_loop",
    "uses_uvloop",
    "wait_port",
    "write_results",
]

# The server under test gets core 0, the load generator core 1: on a 2-core
# machine they would otherwise steal each other's time slices mid-measurement.
SERVER_CPU = 0
LOAD_CPU = 1


# -- machine ------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """What the numbers were measured on: cores, CPU model, Python, uvloop."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "commit": _commit(),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "uvloop_installed": importlib.util.find_spec("uvloop") is not None,
        "kernel": platform.release(),
        "date": time.strftime("%Y-%m-%d"),
    }


def _commit() -> str:
    # Which sidecar code was measured: the checkout's commit, "+dirty" if sidecar/ has local changes.
    repo = REPO
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "sidecar"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine_line(command: str, info: dict[str, Any], uvloop_on: bool | None = None) -> str:
    """One Markdown line: the exact command and the machine it ran on."""
    if uvloop_on is None:
        uvloop_on = bool(info["uvloop_installed"])
    return (
        f"Command: `{command}` at {info['commit']}; {info['date']}; nproc {info['nproc']}, CPU {info['cpu']}, "
        f"Python {info['python']} ({info['implementation']}), uvloop {'on' if uvloop_on else 'off'}."
    )


def uses_uvloop(pid: int) -> bool:
    """True if process ``pid`` has uvloop's extension mapped: it really runs on uvloop."""
    try:
        return "uvloop" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def proc_status_bytes(pid: int, fields: Sequence[str] = ("VmRSS", "RssAnon", "RssFile", "VmHWM")) -> dict[str, int]:
    """Memory lines of ``/proc/<pid>/status`` (reported in kB) in bytes."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in fields:
            out[name] = int(rest.split()[0]) * 1024
    return out


class CpuMeter:
    """How much CPU the rest of the machine used while this benchmark ran.

    Everything on this host shares two cores; another process busy during a
    run skews every figure.  ``foreign_s`` = all CPU time the kernel counted
    (``/proc/stat``) minus this process, its waited-for children (wrk,
    clients) and the long-running children passed to :meth:`read` (servers,
    ZooKeeper), whose time is taken from ``/proc/<pid>/stat`` before they stop.
    Approximate: the kernel's tick-based totals and per-task times differ by a
    few percent, so small amounts of foreign load go unnoticed.
    """

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK")
        self.wall0 = time.monotonic()
        self.busy0 = self._busy()
        t = os.times()
        self.own0 = t.user + t.system + t.children_user + t.children_system

    def _busy(self) -> float:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / self.tick  # user..steal; guest time is already inside user

    def _pid_cpu(self, pid: int) -> float:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return 0.0
        fields = stat.rsplit(")", 1)[1].split()
        return sum(int(v) for v in fields[11:15]) / self.tick  # utime stime cutime cstime

    def read(self, pids: Sequence[int]) -> dict[str, float]:
        """CPU seconds since construction: in all, ours, everyone else's; call before ``pids`` are stopped."""
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system - self.own0
        own += sum(self._pid_cpu(pid) for pid in pids)  # started after construction: all of it is ours
        busy = self._busy() - self.busy0
        wall = time.monotonic() - self.wall0
        return {
            "wall_s": round(wall, 2),
            "busy_s": round(busy, 2),
            "ours_s": round(own, 2),
            "foreign_s": round(max(0.0, busy - own), 2),
            "foreign_share": round(max(0.0, busy - own) / (wall * (os.cpu_count() or 1)), 4) if wall > 0 else 0.0,
        }


def cpu_note(meter: dict[str, float]) -> str:
    """One sentence on other processes' CPU use during the run, a warning when it was not negligible."""
    share = meter["foreign_share"]
    text = (
        f"Other processes used {meter['foreign_s']:.1f} CPU-s during the {meter['wall_s']:.0f} s run "
        f"({share:.1%} of the machine)"
    )
    if share > 0.03:
        return text + ": **the machine was not idle, figures are skewed; rerun on an idle machine.**"
    return text + "."


async def create_origin_schema(path: Path) -> None:
    """Create the sidecar's own SQLite schema at ``path`` (rows are then written straight in)."""
    origin = SqliteOrigin(f"sqlite:///{path}", 5)
    await origin.open()
    await origin.close()


async def seed_origin(
    path: Path, rows: Iterable[tuple[str, bytes] | tuple[str, bytes, str]], content_type: str = "text/plain"
) -> int:
    """A SQLite origin at ``path`` holding ``rows``, written straight into the file; returns the count.

    A row is (key, value) with ``content_type``, or (key, value, its own content type).
    """
    await create_origin_schema(path)
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("PRAGMA synchronous=OFF")  # this connection only: a fixture, written before any sidecar reads it
        cur = conn.executemany(
            "INSERT OR REPLACE INTO kv (key, value, content_type, updated_at) VALUES (?, ?, ?, 0)",
            ((row[0], row[1], row[2] if len(row) > 2 else content_type) for row in rows),
        )
        return cur.rowcount


def write_results(out_dir: Path, name: str, data: dict[str, Any], markdown: str) -> None:
    """Write ``<name>.json`` (for plots) and ``<name>.md`` (the report section) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (out_dir / f"{name}.md").write_text(markdown + "\n")


def graceful_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit`` so that every ``finally`` stops what it started."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def scenario_parser(doc: str | None, name: str, quick_help: str) -> argparse.ArgumentParser:
    """The command line every scenario module shares: ``--quick`` and ``--out``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help=f"where {name}.json and .md go")
    return parser


def run_scenario(run: Callable[[bool, Path], str], args: argparse.Namespace) -> None:
    """Run a scenario from its command line, stopping what it started on SIGTERM too."""
    graceful_sigterm()
    print(run(args.quick, args.out))


def command_line(module: str, quick: bool) -> str:
    """The command that reproduces a scenario module's run."""
    return f".venv/bin/python -m bench.{module}" + (" --quick" if quick else "")


def progress(message: str) -> None:
    """One progress line on stderr (stdout carries the report)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop when installed: the client's own overhead is part of every sample."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# -- processes ----------------------------------------------------------------
# The checkout these modules belong to: child Pythons import sidecar/ and bench/ from here.
REPO = Path(__file__).resolve().parent.parent


def python_module(module: str, *args: str) -> list[str]:
    """argv running ``python -m module`` from :data:`REPO`, whatever the current directory.

    ``-P`` keeps the current directory off ``sys.path`` and ``PYTHONPATH``
    puts this checkout first, so the code measured is the code whose commit
    the report names (not an installed copy, nor a ``sidecar/`` under the cwd).
    ``env`` execs Python: the pid stays the same.
    """
    return ["env", f"PYTHONPATH={REPO}", sys.executable, "-P", "-m", module, *args]


def pinned(argv: Sequence[str], cpu: int | None) -> list[str]:
    """``argv`` run on one core (``taskset -c``), or unchanged if ``cpu`` is None or taskset is missing."""
    if cpu is None or shutil.which("taskset") is None or (os.cpu_count() or 1) <= cpu:
        return list(argv)
    return ["taskset", "-c", str(cpu), *argv]


class PinnedSidecar(SidecarProcess):
    """A sidecar process started under ``taskset -c <cpu>``.

    taskset execs the sidecar, so the pid (signals, ``/proc``) is the sidecar's,
    and the parent-death signal set before exec still applies.
    """

    def __init__(self, log_dir: str | Path, name: str, settings: dict[str, Any], cpu: int | None = SERVER_CPU):
        super().__init__(log_dir, name, settings)
        self.cpu = cpu

    def argv(self) -> list[str]:
        """The sidecar's command line (from :data:`REPO`) behind ``taskset``."""
        base = super().argv()
        if base[1:3] != ["-m", "sidecar"]:
            raise RuntimeError(f"unexpected sidecar command line {base}")
        return pinned(python_module("sidecar", *base[3:]), self.cpu)

    @property
    def pid(self) -> int:
        """The running sidecar's pid."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} is not running")
        return self.proc.pid


def start_sidecars(sidecars: Sequence[SidecarProcess], timeout: float = 60.0) -> None:
    """Start several sidecars at once (they boot in parallel), then wait until each is ready."""
    for sc in sidecars:
        sc.start(wait_ready=False)
    for sc in sidecars:
        sc.wait_ready(timeout)


def jvm_live_heap(pid: int) -> int | None:
    """Bytes of live objects in a JVM (ZooKeeper), after the full GC ``jcmd GC.class_histogram`` runs first.

    None without ``jcmd`` or if it fails.  It attaches to the JVM, which then
    leaves an ``.attach_pid`` file in its working directory (LocalZooKeeper's data dir).
    """
    jcmd = shutil.which("jcmd")
    if jcmd is None:
        return None
    try:
        out = subprocess.run([jcmd, str(pid), "GC.class_histogram"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    last = out.stdout.strip().splitlines()[-1].split() if out.returncode == 0 and out.stdout.strip() else []
    return int(last[-1]) if last and last[0] == "Total" else None


class OwnedProcess:
    """A child process this benchmark started; :meth:`stop` is safe to call twice."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path, cpu: int | None = None) -> None:
        self.name = name
        self.argv = pinned(argv, cpu)
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OwnedProcess:
        """Start it (stdout and stderr to its log); it gets SIGTERM if this process dies."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent()
            )
        return self

    @property
    def pid(self) -> int:
        """The child's pid."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} is not running")
        return self.proc.pid

    def check_alive(self) -> None:
        """Raise with the log tail if the process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def log_tail(self, lines: int = 30) -> str:
        """The end of the process's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def wait_port(port: int, timeout: float = 10.0, owner: OwnedProcess | None = None, host: str = "127.0.0.1") -> None:
    """Wait until something accepts TCP connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if owner is not None:
            owner.check_alive()
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:g}s")


# -- wrk -----------------------------------------------------------------------
# Percentile ranks wrk reports for each run, with the share of requests each
# stands for: every 0.1 % up to 99 %, every 0.01 % above.  Debian's wrk 4.1
# does not expose its histogram to Lua (``latency[i]`` returns ``i``), so runs
# (rounds) are merged as weighted mixtures of these quantiles: exact enough
# for p50 and p99 (a rank error of at most 0.05 / 0.005 percentage points).
WRK_GRID: list[tuple[float, float]] = [((k + 0.5) / 10, 0.1) for k in range(990)] + [
    (99 + (k + 0.5) / 100, 0.01) for k in range(100)
]

_WRK_LUA = """
local grid = {@GRID@}
done = function(summary, latency, requests)
  local e = summary.errors
  local q = {}
  for i, p in ipairs(grid) do q[i] = string.format("%d", latency:percentile(p)) end
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"mean_us":%.2f,"min_us":%d,"max_us":%d,' ..
    '"p50_us":%d,"p99_us":%d,"grid_us":[%s],' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}}\\n',
    summary.requests, summary.duration, summary.bytes, latency.mean, latency.min, latency.max,
    latency:percentile(50), latency:percentile(99), table.concat(q, ","),
    e.connect, e.read, e.write, e.status, e.timeout))
end
""".replace("@GRID@", ",".join(repr(p) for p, _ in WRK_GRID))


def run_wrk(
    url: str,
    connections: int,
    seconds: int,
    work_dir: Path,
    cpu: int | None = LOAD_CPU,
    requests_lua: str = "",
) -> dict[str, Any]:
    """``wrk -t1 -c<connections> -d<seconds>s`` on ``cpu``: requests/s, latency quantiles in ms.

    ``requests_lua``: Lua that shapes the requests (``wrk.method``, ``wrk.body``,
    a ``request()`` function), run before the reporting script.
    ``grid_ms`` holds the latency at each rank of :data:`WRK_GRID`, for :func:`merge_wrk`.
    """
    name = f"wrk_{abs(hash(requests_lua)):x}.lua" if requests_lua else "wrk_done.lua"
    script = work_dir / name
    if not script.exists():
        script.write_text(requests_lua + "\n" + _WRK_LUA)
    # wrk takes whole seconds only (s/m/h suffixes).
    argv = pinned(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, seconds)}s", "--timeout", "5s", "-s", str(script), url], cpu
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    raw = json.loads(line[len("WRKJSON ") :])
    duration = raw["duration_us"] / 1e6
    return {
        "connections": connections,
        "duration_s": duration,
        "requests": raw["requests"],
        "rps": raw["requests"] / duration if duration > 0 else 0.0,
        "bytes": raw["bytes"],
        "errors": raw["errors"],
        "mean_ms": raw["mean_us"] / 1000,
        "min_ms": raw["min_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "grid_ms": [v / 1000 for v in raw["grid_us"]],
    }


def merge_wrk(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several :func:`run_wrk` results of one cell as one: summed counts, mixture percentiles."""
    requests = sum(r["requests"] for r in runs)
    duration = sum(r["duration_s"] for r in runs)
    samples = sorted(
        (value, r["requests"] * share / 100)
        for r in runs
        for value, (_, share) in zip(r["grid_ms"], WRK_GRID, strict=True)
    )

    total = sum(w for _, w in samples)

    def quantile(p: float) -> float:
        target = p / 100 * total
        acc = 0.0
        for value, weight in samples:
            acc += weight
            if acc >= target:
                return float(value)
        return float(samples[-1][0]) if samples else math.nan

    errors: dict[str, int] = {}
    for r in runs:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return {
        "connections": runs[0]["connections"],
        "rounds": len(runs),
        "requests": requests,
        "duration_s": duration,
        "rps": requests / duration if duration > 0 else 0.0,
        "rps_per_round": [r["rps"] for r in runs],
        "p50_ms": quantile(50),
        "p90_ms": quantile(90),
        "p99_ms": quantile(99),
        "p999_ms": quantile(99.9),
        "max_ms": max(r["max_ms"] for r in runs),
        "mean_ms": sum(r["mean_ms"] * r["requests"] for r in runs) / requests if requests else math.nan,
        "errors": errors,
        "cdf_ms": {f"{p:g}": quantile(p) for p in (1, 5, 10, 25, 50, 75, 90, 95, 99, 99.5, 99.9)},
    }


# -- open-loop client ----------------------------------------------------------
def open_loop_client(port: int, path: str, rate: float, duration: float, warmup: float = 0.0) -> dict[str, Any]:
    """Requests on one keep-alive connection at a fixed schedule, latency from the *scheduled* send time.

    Request i is due at ``start + i / rate``.  When a response arrives late,
    the next request goes out at once and its latency still counts from its
    due time, so a stall shows up in every request it delayed instead of in
    one (no coordinated omission; the correction wrk2 applies).  Requests due
    during the first ``warmup`` seconds are sent but not recorded.  Bounded by
    ``(warmup + duration) * rate`` requests and a 5 s socket timeout.
    """
    interval = 1.0 / rate
    total = int((warmup + duration) * rate)
    skip = int(warmup * rate)
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    latencies: list[float] = []
    late_sends = 0
    statuses: dict[str, int] = {}
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray()
        start = time.perf_counter() + 0.01
        for i in range(total):
            due = start + i * interval
            now = time.perf_counter()
            if due - now > 0.0003:
                time.sleep(due - now - 0.0002)  # sleep overshoots ~60 us: spin the rest
            while time.perf_counter() < due:
                pass
            if time.perf_counter() - due > interval:
                late_sends += 1
            sock.sendall(request)
            response, buf = read_response(sock, buf)
            done = time.perf_counter()
            status = response[9:12].decode()
            statuses[status] = statuses.get(status, 0) + 1
            if i >= skip:
                latencies.append((done - due) * 1000)
        elapsed = time.perf_counter() - (start + skip * interval)
    return {
        "rate": rate,
        "duration_s": duration,
        "requests": len(latencies),
        "sent_total": total,
        "elapsed_s": elapsed,
        "late_sends": late_sends,
        "statuses": statuses,
        "latencies_ms": latencies,
    }


def summarize_open_loop(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several :func:`open_loop_client` results of one server as one: exact percentiles over all requests."""
    latencies = [v for r in runs for v in r["latencies_ms"]]
    elapsed = sum(r["elapsed_s"] for r in runs)
    statuses: dict[str, int] = {}
    for r in runs:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    return {
        "rate": runs[0]["rate"],
        "rounds": len(runs),
        "requests": len(latencies),
        "sent_total": sum(r["sent_total"] for r in runs),
        "achieved_rps": len(latencies) / elapsed if elapsed > 0 else 0.0,
        "late_sends": sum(r["late_sends"] for r in runs),
        "statuses": statuses,
        "p50_ms": pct(latencies, 50),
        "p90_ms": pct(latencies, 90),
        "p99_ms": pct(latencies, 99),
        "p999_ms": pct(latencies, 99.9),
        "max_ms": max(latencies, default=math.nan),
        "mean_ms": sum(latencies) / len(latencies) if latencies else math.nan,
        "p99_per_round": [pct(r["latencies_ms"], 99) for r in runs],
        "cdf_ms": {f"{p:g}": pct(latencies, p) for p in (1, 5, 10, 25, 50, 75, 90, 95, 99, 99.5, 99.9)},
    }


def open_loop(
    port: int, path: str, rate: float, duration: float, warmup: float = 0.0, cpu: int | None = LOAD_CPU
) -> dict[str, Any]:
    """:func:`open_loop_client` in its own process pinned to ``cpu`` (the load core)."""
    argv = pinned(
        python_module(
            "bench.common",
            "open-loop",
            f"--port={port}",
            f"--path={path}",
            f"--rate={rate}",
            f"--duration={duration}",
            f"--warmup={warmup}",
        ),
        cpu,
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=warmup + duration + 30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"open-loop client failed ({done.returncode}): {done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def main() -> None:
    """``python -m bench.common open-loop ...``: run the open-loop client, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ol = sub.add_parser("open-loop", help="fixed-rate requests on one keep-alive connection")
    ol.add_argument("--port", type=int, required=True)
    ol.add_argument("--path", required=True)
    ol.add_argument("--rate", type=float, default=1000.0)
    ol.add_argument("--duration", type=float, default=2.0)
    ol.add_argument("--warmup", type=float, default=0.0)
    args = parser.parse_args()
    graceful_sigterm()
    print(json.dumps(open_loop_client(args.port, args.path, args.rate, args.duration, args.warmup)))


if __name__ == "__main__":
    main()
