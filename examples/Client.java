// A zk-cache-sidecar client in Java 17: java.net.http only, no dependencies (see examples/README.md).
// A single-file program: java examples/Client.java

import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpRequest.BodyPublishers;
import java.net.http.HttpResponse;
import java.time.Duration;
import java.util.regex.Pattern;

public class Client {
    static final String BASE = System.getenv().getOrDefault("ZKCACHE_URL", "http://127.0.0.1:7070").replaceAll("/+$", "");
    static final String TOKEN = System.getenv("ZKCACHE_AUTH_TOKEN");
    static final String KEY = "examples/java/counter";
    static final String PATH = "/v1/keys/" + KEY; // plain ASCII here; percent-encode '?', '#', '%' (not with URLEncoder: it is for forms)
    // HTTP/1.1: the default, HTTP/2, would offer an h2c upgrade on every cleartext request.
    static final HttpClient HTTP = HttpClient.newBuilder().version(HttpClient.Version.HTTP_1_1).build();

    // One request, with extra headers as name, value pairs; throws unless the status is `want` (-1: any).
    static HttpResponse<String> call(String method, String path, String body, int want, String... headers) throws Exception {
        var request = HttpRequest.newBuilder(URI.create(BASE + path)).timeout(Duration.ofSeconds(15))
            .method(method, body == null ? BodyPublishers.noBody() : BodyPublishers.ofString(body));
        if (body != null) request.header("Content-Type", "application/json"); // served back with the value
        if (TOKEN != null && !TOKEN.isEmpty()) request.header("Authorization", "Bearer " + TOKEN);
        if (headers.length > 0) request.headers(headers);
        var res = HTTP.send(request.build(), HttpResponse.BodyHandlers.ofString());
        if (want >= 0 && res.statusCode() != want)
            throw new IllegalStateException(method + " " + path + ": expected " + want + ", got " + problem(res));
        return res;
    }

    // Errors are application/problem+json: the title names the kind, the detail says what happened.
    static String problem(HttpResponse<String> res) {
        if (res.statusCode() < 400) return String.valueOf(res.statusCode());
        return res.statusCode() + " " + field(res.body(), "title") + ": " + field(res.body(), "detail");
    }

    // The JDK has no JSON parser; a regex does for the sidecar's flat objects (use Jackson in real code).
    static String field(String json, String name) { // a string's content, or a number or array as written
        var m = Pattern.compile("\"" + name + "\":(?:\"((?:[^\"\\\\]|\\\\.)*)\"|(\\[[^\\]]*]|[^,}]*))").matcher(json);
        return !m.find() ? "?" : m.group(1) != null ? m.group(1).replace("\\\"", "\"") : m.group(2);
    }

    static String header(HttpResponse<?> res, String name) { return res.headers().firstValue(name).orElse("?"); }

    static void run() throws Exception {
        // 1. Write, then read: the ETag is the key's version; X-Cache says whether this sidecar had the value.
        call("PUT", PATH, "{\"count\":0}", 200);
        var res = call("GET", PATH, null, 200);
        String etag = header(res, "ETag"); // an opaque strong tag like "42": send it back exactly as received
        System.out.printf("GET %s -> 200, X-Cache: %s, ETag: %s, body %s%n", KEY, header(res, "X-Cache"), etag, res.body());

        // 2. Revalidate the copy we hold: 304 and no body while the version is unchanged.
        call("GET", PATH, null, 304, "If-None-Match", etag);
        System.out.printf("GET %s If-None-Match: %s -> 304 Not Modified%n", KEY, etag);

        // 3. A key the origin has no value for is a 404, as problem+json like every error.
        res = call("GET", "/v1/keys/examples/java/never-written", null, 404);
        System.out.println("GET examples/java/never-written -> " + problem(res));

        // 4. Optimistic concurrency: increment with If-Match, so that a write made since our read is never lost.
        //    Another client writes first here: our first attempt gets 412, so we re-read and retry.
        call("PUT", PATH, "{\"count\":10}", 200);
        System.out.println("(another client wrote {\"count\": 10})");
        int count = 0;
        for (int attempt = 0; attempt < 5; attempt++) { // bounded: under heavy contention, fail rather than spin
            res = call("PUT", PATH, "{\"count\":" + (count + 1) + "}", -1, "If-Match", etag);
            if (res.statusCode() != 412) break;
            System.out.printf("PUT %s If-Match: %s -> %s; re-reading%n", KEY, etag, problem(res));
            var current = call("GET", PATH, null, 200);
            etag = header(current, "ETag");
            count = Integer.parseInt(field(current.body(), "count").trim());
        }
        if (res.statusCode() != 200) throw new IllegalStateException("PUT " + KEY + ": " + problem(res));
        System.out.printf("PUT %s If-Match: %s -> 200, count %d, ETag: %s%n", KEY, etag, count + 1, header(res, "ETag"));

        // 5. Invalidate fleet-wide (the origin keeps the value); wait=true answers once every sidecar dropped it.
        res = call("POST", "/v1/invalidate?wait=true&timeout=5", "{\"keys\":[\"" + KEY + "\"]}", 200);
        var members = field(res.body(), "acknowledged_by"); // a JSON array of member ids
        System.out.println("POST /v1/invalidate -> 200, applied by " + members.replaceAll("[\\[\\]\"]", "").replace(",", ", "));
        res = call("GET", PATH, null, 200); // read through from the origin again: a miss
        System.out.printf("GET %s -> 200, X-Cache: %s, ETag: %s, body %s%n", KEY, header(res, "X-Cache"), header(res, "ETag"), res.body());
    }

    public static void main(String[] args) {
        try {
            run();
        } catch (java.net.ConnectException e) {
            System.err.println("cannot reach the sidecar at " + BASE + ": connection refused");
            System.exit(1);
        } catch (Exception e) {
            System.err.println(e.getMessage());
            System.exit(1);
        }
    }
}
