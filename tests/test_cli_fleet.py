"""cachectl watch, stats, get --json and invalidate --from-file against a real ZooKeeper and a real sidecar.

One sidecar serves the module (its start is the expensive part); each test
keeps to keys of its own.
"""

from __future__ import annotations

import json
import os
import pty
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from kazoo.client import KazooClient

from cli.main import cli
from harness import SidecarProcess, free_port
from sidecar.coordination.layout import Layout
from tests.conftest import SidecarFactory

# The issue asks for 100,000 keys; CI's time budget takes 1,200 (more than one batch of 1,000). Each
# key is a few ZooKeeper round trips, writes among them: 100,000 took 524 s on a loaded 2-core machine.
# ZKCACHE_TEST_BULK_KEYS=100000 runs the full size and prints the time it took.
BULK_KEYS = int(os.environ.get("ZKCACHE_TEST_BULK_KEYS", "1200"))


@pytest.fixture(scope="module")
def fleet(module_sidecars: SidecarFactory) -> SidecarProcess:
    """One real sidecar in a namespace of this module's own."""
    return module_sidecars("fleet-a", log_level="info")


def ctl(fleet: SidecarProcess, *args: str, input: bytes | None = None) -> Result:
    common = ["--zk", fleet.settings["zk"], "--namespace", fleet.settings["namespace"], "--sidecar", fleet.url]
    return CliRunner().invoke(cli, [*args, *common], input=input, prog_name="cachectl")


def http(url: str, method: str = "GET", body: bytes | None = None, **headers: str) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            resp.read()
            return resp.status, dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers)


def cached(fleet: SidecarProcess, key: str) -> bool:
    status, _ = http(f"{fleet.url}/v1/keys/{key}", **{"Cache-Control": "only-if-cached"})
    return status == 200


# -- 5. watch -------------------------------------------------------------------------
def test_watch_streams_a_key_a_prefix_and_all_in_order(fleet: SidecarProcess) -> None:
    argv = [sys.executable, "-m", "cli.main", "watch", "--zk", fleet.settings["zk"], "--seconds", "60"]
    argv += ["--namespace", fleet.settings["namespace"], "--count", "3"]
    watchers = [subprocess.Popen([*argv, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for extra in (["--json"], [])]  # fmt: skip
    for proc in watchers:  # armed once it says so
        assert proc.stderr is not None
        assert proc.stderr.readline().startswith("cachectl: watching /zkcache/"), proc
    published = [ctl(fleet, "invalidate", *args) for args in (["w/1"], ["--prefix", "w/"], ["--all"])]
    assert all(r.exit_code == 0 for r in published), [r.output for r in published]
    key, prefix, everything = (json.loads(r.stdout) for r in published)
    outputs = [proc.communicate(timeout=30) for proc in watchers]
    assert [proc.returncode for proc in watchers] == [0, 0], outputs
    events = [json.loads(line) for line in outputs[0][0].splitlines()]
    assert [(e["kind"], e.get("key", e.get("prefix"))) for e in events] == [
        ("key", "w/1"),
        ("prefix", "w/"),
        ("all", None),
    ]
    assert events[0]["version"] == key["keys"]["w/1"] and events[0]["op"] == "invalidate", events
    assert events[1]["seq"] == prefix["prefixes"]["w/"] and events[1]["version"] <= prefix["zxid"], events
    assert events[2]["version"] == everything["epoch"] and events[2]["by"] == "cachectl", events
    assert all(e["time"].endswith("Z") for e in events)
    text = outputs[1][0].splitlines()
    assert len(text) == 3 and text[0].endswith(f" key    w/1 version {key['keys']['w/1']} (op invalidate, by cachectl)")
    assert " prefix w/ version " in text[1] and f" all    version {everything['epoch']} (by cachectl)" in text[2], text
    assert outputs[0][1] == "" and outputs[1][1] == "", outputs  # nothing more on stderr


# -- 6. stats -------------------------------------------------------------------------
def test_stats_lists_every_member_and_one_it_cannot_reach_as_a_row(fleet: SidecarProcess) -> None:
    assert http(f"{fleet.url}/v1/keys/s/1", "PUT", b"v")[0] == 200
    assert http(f"{fleet.url}/v1/keys/s/1")[0] == 200  # a miss or a hit: then cached
    assert http(f"{fleet.url}/v1/keys/s/1")[1]["X-Cache"] == "hit"
    table = ctl(fleet, "stats")
    assert table.exit_code == 0, table.output
    header, row = table.stdout.splitlines()
    assert header.split()[:4] == ["MEMBER", "ENTRIES", "BYTES", "HITS"] and row.startswith("fleet-a "), table.stdout
    assert row.split()[-1] == "connected"
    # A member whose address answers nothing: its row says why; the command fails, after printing everything.
    dead = f"127.0.0.1:{free_port()}"
    kz = KazooClient(hosts=fleet.settings["zk"])
    kz.start(10)
    try:
        info = {"member_id": "ghost", "address": dead, "layout": "zkcache-layout-2 buckets=blake2b16/2x256"}
        kz.create(Layout(f"/zkcache/{fleet.settings['namespace']}").member_path("ghost"), json.dumps(info).encode(),
                  ephemeral=True)  # fmt: skip
        table, raw = ctl(fleet, "stats"), ctl(fleet, "stats", "--json")
    finally:
        kz.stop()
        kz.close()
    assert table.exit_code == 1 and table.stderr == "", table.output
    rows = {line.split()[0]: line for line in table.stdout.splitlines()[1:]}
    assert rows["ghost"].split(None, 1)[1].startswith(f"error: cannot reach {dead}: "), rows
    assert "Connection refused" in rows["ghost"] and rows["fleet-a"].split()[-1] == "connected", rows
    docs = {d["member_id"]: d for d in json.loads(raw.stdout)}
    assert raw.exit_code == 1 and set(docs) == {"fleet-a", "ghost"}, raw.output
    assert docs["fleet-a"]["stats"]["member_id"] == "fleet-a" and docs["fleet-a"]["stats"]["hits"] >= 1, docs
    assert "housekeeping" in docs["fleet-a"]["stats"] and "error" in docs["ghost"], docs


def test_get_and_put_print_json(fleet: SidecarProcess, tmp_path: Path) -> None:
    value = tmp_path / "v"
    value.write_bytes(b"\xff\x00")
    put = ctl(fleet, "put", "j/1", "--file", str(value), "--json")
    assert put.exit_code == 0, put.output
    version = json.loads(put.stdout)["version"]
    got = ctl(fleet, "get", "j/1", "--json")
    assert got.exit_code == 0, got.output
    doc = json.loads(got.stdout)
    assert doc["version"] == version and doc["etag"] == f'"{version}"' and doc["value_base64"] == "/wA=", doc
    missing = ctl(fleet, "get", "j/none", "--json")
    assert missing.exit_code == 1 and missing.stdout == "" and missing.stderr.count("\n") == 1, missing.output
    assert "404" in missing.stderr


# -- 7. invalidate --from-file ----------------------------------------------------------
@pytest.mark.timeout(max(120, BULK_KEYS // 50))
def test_invalidate_from_file_publishes_every_key_in_batches_and_the_sidecar_drops_those_it_holds(
    fleet: SidecarProcess, tmp_path: Path
) -> None:
    keys = [f"bulk/{i}" for i in range(BULK_KEYS)]
    held, kept = keys[:: max(1, BULK_KEYS // 5)][:5], "bulk-kept/1"
    for key in [*held, kept]:
        assert http(f"{fleet.url}/v1/keys/{key}", "PUT", b"v")[0] == 200
        assert http(f"{fleet.url}/v1/keys/{key}")[0] == 200  # a miss or a hit: then cached
        assert cached(fleet, key), key
    listing = tmp_path / "keys.txt"
    listing.write_text("# keys to drop\n\n" + "\n".join(keys) + "\n" + keys[0] + "\n")  # a repeat, published once
    # stdin ('-'), and stderr a terminal: click's progress bar is drawn there.
    parent, child = pty.openpty()
    drawn: list[bytes] = []
    reader = threading.Thread(target=_drain, args=(parent, drawn), daemon=True)
    reader.start()
    argv = [sys.executable, "-m", "cli.main", "--zk", fleet.settings["zk"], "--namespace", fleet.settings["namespace"]]
    started = time.monotonic()
    with listing.open("rb") as stdin:
        run = subprocess.run([*argv, "invalidate", "--from-file", "-", "--wait"], stdin=stdin, stdout=subprocess.PIPE,
                             stderr=child, timeout=900)  # fmt: skip
    took = time.monotonic() - started
    os.close(child)
    reader.join(10)
    os.close(parent)
    progress = b"".join(drawn).decode(errors="replace")
    print(f"\ninvalidate --from-file: {BULK_KEYS} keys in {took:.1f}s ({BULK_KEYS / took:.0f} keys/s)")
    assert run.returncode == 0, progress
    receipt = json.loads(run.stdout)
    assert len(receipt["keys"]) == BULK_KEYS and set(receipt["keys"]) == set(keys)
    assert receipt["acknowledged_by"] == ["fleet-a"] and receipt["not_confirmed"] == [], receipt
    assert "invalidating" in progress and f"{BULK_KEYS}/{BULK_KEYS}" in progress, progress
    # --wait: the sidecar confirmed it applied all of it, so no polling here.
    assert [key for key in held if cached(fleet, key)] == []
    assert cached(fleet, kept)
    # Without a terminal, no progress bar: stderr stays empty.
    quiet = subprocess.run(
        [*argv, "invalidate", "--from-file", "-"], input=b"bulk/0\n", capture_output=True, timeout=60
    )
    assert quiet.returncode == 0 and quiet.stderr == b"", quiet


def _drain(fd: int, into: list[bytes]) -> None:
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child's side closed
            return
        if not chunk:
            return
        into.append(chunk)


def test_a_silent_member_address_times_out_as_a_row(fleet: SidecarProcess) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        kz = KazooClient(hosts=fleet.settings["zk"])
        kz.start(10)
        try:
            info = {"member_id": "mute", "address": address}
            kz.create(Layout(f"/zkcache/{fleet.settings['namespace']}").member_path("mute"), json.dumps(info).encode(),
                      ephemeral=True)  # fmt: skip
            table = ctl(fleet, "stats", "--timeout", "0.5")
        finally:
            kz.stop()
            kz.close()
    assert table.exit_code == 1, table.output
    assert any(line.startswith("mute ") and "timed out" in line for line in table.stdout.splitlines()), table.stdout
