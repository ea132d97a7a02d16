// A zk-cache-sidecar client in JavaScript: Node 20's built-in fetch, no packages (see examples/README.md).

const BASE = (process.env.ZKCACHE_URL || "http://127.0.0.1:7070").replace(/\/+$/, "");
const TOKEN = process.env.ZKCACHE_AUTH_TOKEN;
const KEY = "examples/node/counter";
const PATH = "/v1/keys/" + encodeURIComponent(KEY); // 'a/b' and 'a%2Fb' name the same key

// One request. Unlike urllib, fetch resolves on every status: 304 and 4xx are answers, not exceptions.
async function call(method, path, { body, headers = {}, want } = {}) {
  if (body !== undefined) headers["Content-Type"] = "application/json"; // served back with the value
  if (TOKEN) headers["Authorization"] = `Bearer ${TOKEN}`;
  const res = await fetch(BASE + path, { method, body, headers, signal: AbortSignal.timeout(15_000) });
  const text = await res.text();
  if (want !== undefined && res.status !== want) {
    throw new Error(`${method} ${path}: expected ${want}, got ${res.status >= 400 ? problem(res, text) : res.status}`);
  }
  return { status: res.status, etag: res.headers.get("ETag"), xCache: res.headers.get("X-Cache"), res, text };
}

// Errors are application/problem+json: the title names the kind, the detail says what happened.
function problem(res, text) {
  const { title, detail } = JSON.parse(text);
  return `${res.status} ${title}: ${detail}`;
}

try {
  // 1. Write, then read: the ETag is the key's version; X-Cache says whether this sidecar had the value.
  await call("PUT", PATH, { body: JSON.stringify({ count: 0 }), want: 200 });
  let r = await call("GET", PATH, { want: 200 });
  let etag = r.etag; // an opaque strong tag like "42": send it back exactly as received
  console.log(`GET ${KEY} -> 200, X-Cache: ${r.xCache}, ETag: ${etag}, body ${r.text}`);

  // 2. Revalidate the copy we hold: 304 and no body while the version is unchanged.
  await call("GET", PATH, { headers: { "If-None-Match": etag }, want: 304 });
  console.log(`GET ${KEY} If-None-Match: ${etag} -> 304 Not Modified`);

  // 3. A key the origin has no value for is a 404, as problem+json like every error.
  r = await call("GET", "/v1/keys/examples/node/never-written", { want: 404 });
  console.log(`GET examples/node/never-written -> ${problem(r.res, r.text)}`);

  // 4. Optimistic concurrency: increment with If-Match, so that a write made since our read is never lost.
  //    Another client writes first here: our first attempt gets 412, so we re-read and retry.
  await call("PUT", PATH, { body: JSON.stringify({ count: 10 }), want: 200 });
  console.log('(another client wrote {"count": 10})');
  let count = 0;
  for (let attempt = 0; attempt < 5; attempt++) { // bounded: under heavy contention, fail rather than spin
    r = await call("PUT", PATH, { body: JSON.stringify({ count: count + 1 }), headers: { "If-Match": etag } });
    if (r.status !== 412) break;
    console.log(`PUT ${KEY} If-Match: ${etag} -> ${problem(r.res, r.text)}; re-reading`);
    const current = await call("GET", PATH, { want: 200 });
    [etag, count] = [current.etag, JSON.parse(current.text).count];
  }
  if (r.status !== 200) throw new Error(`PUT ${KEY}: ${r.status >= 400 ? problem(r.res, r.text) : r.status}`);
  console.log(`PUT ${KEY} If-Match: ${etag} -> 200, count ${count + 1}, ETag: ${r.etag}`);

  // 5. Invalidate fleet-wide (the origin keeps the value); wait=true answers once every sidecar dropped it.
  r = await call("POST", "/v1/invalidate?wait=true&timeout=5", { body: JSON.stringify({ keys: [KEY] }), want: 200 });
  console.log(`POST /v1/invalidate -> 200, applied by ${JSON.parse(r.text).acknowledged_by.join(", ")}`);
  r = await call("GET", PATH, { want: 200 }); // read through from the origin again: a miss
  console.log(`GET ${KEY} -> 200, X-Cache: ${r.xCache}, ETag: ${r.etag}, body ${r.text}`);
} catch (err) {
  // fetch reports an unreachable sidecar as "fetch failed", with the reason in err.cause.
  console.error(err.cause ? `cannot reach the sidecar at ${BASE}: ${err.cause.message ?? err.cause}` : err.message);
  process.exitCode = 1;
}
