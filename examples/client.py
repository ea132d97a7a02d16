"""A zk-cache-sidecar client in Python, standard library only (see examples/README.md)."""

import json
import os
import sys
import urllib.error
import urllib.request
from urllib.parse import quote

BASE = os.environ.get("ZKCACHE_URL", "http://127.0.0.1:7070").rstrip("/")
TOKEN = os.environ.get("ZKCACHE_AUTH_TOKEN")
KEY = "examples/python/counter"
PATH = "/v1/keys/" + quote(KEY)  # keys may hold '?', '#' or '%': percent-encode them ('/' may stay)


def call(method, path, body=None, headers=None, want=None):
    """One request: (status, headers, body). Exits non-zero on an unexpected status."""
    headers = dict(headers or {})
    if body is not None:
        headers["Content-Type"] = "application/json"  # served back with the value
    if TOKEN:
        headers["Authorization"] = f"Bearer {TOKEN}"
    request = urllib.request.Request(BASE + path, body and body.encode(), headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=15) as resp:
            status, headers, body = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:  # urllib raises on 304 and on 4xx/5xx: answers all the same
        with err:
            status, headers, body = err.code, err.headers, err.read()
    except urllib.error.URLError as err:
        sys.exit(f"cannot reach the sidecar at {BASE}: {err.reason}")
    if want is not None and status != want:
        sys.exit(f"{method} {path}: expected {want}, got " + (problem(status, body) if status >= 400 else str(status)))
    return status, headers, body


def problem(status, body):
    """Errors are application/problem+json: the title names the kind, the detail says what happened."""
    doc = json.loads(body)
    return f"{status} {doc['title']}: {doc['detail']}"


# 1. Write, then read: the ETag is the key's version; X-Cache says whether this sidecar had the value.
call("PUT", PATH, json.dumps({"count": 0}), want=200)
_, headers, body = call("GET", PATH, want=200)
etag = headers["ETag"]  # an opaque strong tag like "42": send it back exactly as received
print(f"GET {KEY} -> 200, X-Cache: {headers['X-Cache']}, ETag: {etag}, body {body.decode()}")

# 2. Revalidate the copy we hold: 304 and no body while the version is unchanged.
call("GET", PATH, headers={"If-None-Match": etag}, want=304)
print(f"GET {KEY} If-None-Match: {etag} -> 304 Not Modified")

# 3. A key the origin has no value for is a 404, as problem+json like every error.
status, _, body = call("GET", "/v1/keys/examples/python/never-written", want=404)
print(f"GET examples/python/never-written -> {problem(status, body)}")

# 4. Optimistic concurrency: increment with If-Match, so that a write made since our read is never lost.
#    Another client writes first here: our first attempt gets 412, so we re-read and retry.
call("PUT", PATH, json.dumps({"count": 10}), want=200)
print('(another client wrote {"count": 10})')
count = 0
for _attempt in range(5):  # bounded: under heavy contention, fail rather than spin
    status, headers, body = call("PUT", PATH, json.dumps({"count": count + 1}), {"If-Match": etag})
    if status != 412:
        break
    print(f"PUT {KEY} If-Match: {etag} -> {problem(status, body)}; re-reading")
    _, headers, body = call("GET", PATH, want=200)
    etag, count = headers["ETag"], json.loads(body)["count"]
if status != 200:
    sys.exit(f"PUT {KEY}: " + (problem(status, body) if status >= 400 else str(status)))
print(f"PUT {KEY} If-Match: {etag} -> 200, count {count + 1}, ETag: {headers['ETag']}")

# 5. Invalidate fleet-wide (the origin keeps the value); wait=true answers once every sidecar dropped it.
_, _, body = call("POST", "/v1/invalidate?wait=true&timeout=5", json.dumps({"keys": [KEY]}), want=200)
print(f"POST /v1/invalidate -> 200, applied by {', '.join(json.loads(body)['acknowledged_by'])}")
_, headers, body = call("GET", PATH, want=200)  # read through from the origin again: a miss
print(f"GET {KEY} -> 200, X-Cache: {headers['X-Cache']}, ETag: {headers['ETag']}, body {body.decode()}")
