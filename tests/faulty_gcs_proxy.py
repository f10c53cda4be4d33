"""A fault-injecting HTTP proxy in front of the GCS emulator (tests only): storage that fails on purpose.

    proxy = FaultyProxy(emulator.url)            # 127.0.0.1, a thread per connection
    proxy.fail("GET", r"/meta/metadata", times=8, status=503)   # the next 8 matching requests fail
    env = emulator_env(proxy.url)                # point gcsfs and tensorstore at the proxy
    proxy.failed[rule]                           # how many were failed
    proxy.stop()

A rule matches the request method and a regex searched in the request's URL-decoded path and query
(object names appear there, e.g. run/checkpoints/2/meta/metadata). Every other request is forwarded
unchanged and its answer passed back.
"""
from __future__ import annotations

import http.client
import http.server
import re
import threading
import urllib.parse
from typing import Dict, List, Optional

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

            def _handle(self):
                body = self._body()
                rule = proxy._take(self.command, urllib.parse.unquote(self.path))
                if rule is not None:
                    msg = b'{"error": {"code": %d, "message": "injected by tests/faulty_gcs_proxy.py"}}' % rule.status
                    self.send_response(rule.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    headers["Host"] = f"{proxy.upstream[0]}:{proxy.upstream[1]}"
                    conn.request(self.command, self.path, body=body if body or self.command in ("POST", "PUT", "PATCH")
                                 else None, headers=headers)
                    r = conn.getresponse()
                    data = r.read()
                    self.send_response(r.status, r.reason)
                    for k, v in r.getheaders():
                        if k.lower() not in _HOP:
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

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
