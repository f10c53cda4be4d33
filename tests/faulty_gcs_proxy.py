"""A fault-injecting HTTP proxy in front of the GCS emulator (tests only): storage that fails on purpose.

    proxy = FaultyProxy(upstream_url)            # 127.0.0.1, a thread per connection
    rule = proxy.fail("GET", r"/meta/metadata", times=8, status=503)   # the next 8 matching requests fail
    proxy.failed[rule]                           # how many were failed
    proxy.clear(); proxy.stop()

tests/gcs_emulator.py starts one in front of every emulator (GcsEmulator.proxy, GcsEmulator.url); a test
that needs one process's storage to fail alone starts another in front of that one and gives that process
its URL. A rule matches the request method and a regex searched in the request's URL-decoded path and
query (object names appear there, e.g. run/checkpoints/2/meta/metadata). Every other request is forwarded
and its answer passed back with HTTP/1.1 framing.

What the proxy adds to the emulator (gcp-storage-emulator): media downloads carry the object's generation
(x-goog-generation, from the object's metadata), and `ifGenerationNotMatch` is answered 304 when it
matches. tensorstore needs both when it reads back an OCDBT manifest it is updating; straight against the
emulator, orbax saves fail intermittently with "Malformed StorageGeneration" (4 of 4 runs of a 2-step,
8-device run saving every step; 0 of 4 through the proxy). Requests reach the single-threaded emulator one
at a time, so that a generation and the content read with it belong together.
"""
from __future__ import annotations

import http.client
import http.server
import json
import re
import sys
import threading
import urllib.parse
from typing import Callable, Dict, List, Optional

_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "host",
        "content-length"}


class Rule:
    def __init__(self, method: str, pattern: str, times: int, status: int):
        self.method, self.regex, self.left, self.status = method.upper(), re.compile(pattern), times, status

    def __repr__(self):
        return f"Rule({self.method} {self.regex.pattern!r} -> {self.status}, {self.left} left)"


class FaultyProxy:
    def __init__(self, upstream_url: str):
        up = urllib.parse.urlparse(upstream_url)
        self.upstream = (up.hostname, up.port)
        self.rules: List[Rule] = []
        self.failed: Dict[Rule, int] = {}
        self.lock = threading.Lock()
        self.upstream_lock = threading.Lock()  # the emulator serves one request at a time anyway
        self.log: Optional[Callable[[str], None]] = None  # takes one line per forwarded request (debugging)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _reply(self, status: int, reason: Optional[str], headers, data: bytes) -> None:
                self.send_response(status, reason)
                for k, v in headers:
                    if k.lower() not in _HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _handle(self):
                body = self._body()
                rule = proxy._take(self.command, urllib.parse.unquote(self.path))
                if rule is not None:
                    msg = b'{"error": {"code": %d, "message": "injected by tests/faulty_gcs_proxy.py"}}' % rule.status
                    self._reply(rule.status, None, [("Content-Type", "application/json")], msg)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                headers["Host"] = f"{proxy.upstream[0]}:{proxy.upstream[1]}"
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query)
                media = self.command == "GET" and query.get("alt") == ["media"]
                with proxy.upstream_lock:
                    if media:  # the object's generation, which the emulator leaves out of media downloads
                        meta_path = url.path[len("/download"):] if url.path.startswith("/download/") else url.path
                        status, _, _, info = proxy._forward("GET", meta_path, {"Host": headers["Host"]}, None)
                        generation = json.loads(info).get("generation") if status == 200 else None
                        wanted = query.get("ifGenerationNotMatch", [None])[0]
                        if generation is not None and wanted == generation:
                            self._reply(304, None, [("x-goog-generation", generation)], b"")
                            return
                    status, reason, answer, data = proxy._forward(
                        self.command, self.path, headers,
                        body if body or self.command in ("POST", "PUT", "PATCH") else None)
                if media and status in (200, 206) and generation is not None and not any(
                        k.lower() == "x-goog-generation" for k, _ in answer):  # (another proxy's answer has it)
                    answer = answer + [("x-goog-generation", generation), ("x-goog-metageneration", "1")]
                if proxy.log is not None:
                    proxy.log(f"{self.command} {urllib.parse.unquote(self.path)} -> {status} {data[:200]!r}")
                self._reply(status, reason, answer, data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a client that hung up (it retries): no noise
                if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                    super().handle_error(request, client_address)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _forward(self, method: str, path: str, headers, body):
        """One request to the emulator -> (status, reason, headers, body)."""
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            conn.request(method, path, headers=headers, body=body)
            r = conn.getresponse()
            return r.status, r.reason, r.getheaders(), r.read()
        finally:
            conn.close()

    def fail(self, method: str, pattern: str, times: int, status: int = 503) -> Rule:
        """The next `times` requests `method` whose decoded path matches `pattern` get `status`."""
        rule = Rule(method, pattern, times, status)
        with self.lock:
            self.rules.append(rule)
            self.failed[rule] = 0
        return rule

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()

    def _take(self, method: str, path: str) -> Optional[Rule]:
        with self.lock:
            for rule in self.rules:
                if rule.left > 0 and rule.method == method and rule.regex.search(path):
                    rule.left -= 1
                    self.failed[rule] += 1
                    return rule
        return None

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
