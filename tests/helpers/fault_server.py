"""A local HTTP server whose paths name a fault (429, 5xx, resets, slow bodies, redirect loops, ...):
the fetcher tests script the remote with it. JPEG is the picture its good paths answer with."""

from __future__ import annotations

import socket
import threading
import time

from pipeline.synthetic import encode, generate_scene
from tests.helpers.http_server import QuietHandler, serve

JPEG = encode(generate_scene(1, 320, 240, n_objects=1)[0])


class FaultServer:
    """Paths name their behaviour; every request's path and arrival time is recorded."""

    def __init__(self):
        self.healed = False  # /flaky.jpg answers 503 until a test sets this
        self.hits: list[tuple[str, float]] = []
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        outer = self

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"

            def send(self, status, body=b"", ctype="image/jpeg", headers=None):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                with outer.lock:
                    outer.hits.append((self.path, time.monotonic()))
                    n = outer.counts[self.path] = outer.counts.get(self.path, 0) + 1
                p = self.path
                if p == "/ok.jpg":
                    self.send(200, JPEG)
                elif p == "/429.jpg":
                    self.send(429, b"slow down", "text/plain", {"Retry-After": "1"}) if n == 1 else self.send(200, JPEG)
                elif p == "/500-then-200.jpg":
                    self.send(500, b"oops", "text/plain") if n == 1 else self.send(200, JPEG)
                elif p == "/flaky.jpg":
                    self.send(200, JPEG) if outer.healed else self.send(503, b"down", "text/plain")
                elif p == "/always-503.jpg":
                    self.send(503, b"down", "text/plain")
                elif p == "/404.jpg":
                    self.send(404, b"missing", "text/plain")
                elif p == "/slow.jpg":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(JPEG)))
                    self.end_headers()
                    self.wfile.write(JPEG[:100])
                    self.wfile.flush()
                    time.sleep(3)
                elif p == "/reset.jpg":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.connection.shutdown(socket.SHUT_RDWR)  # RST: linger on, timeout 0
                    self.close_connection = True
                elif p == "/loop-a":
                    self.send(302, headers={"Location": "/loop-b"})
                elif p == "/loop-b":
                    self.send(302, headers={"Location": "/loop-a"})
                elif p == "/redirect-ok":
                    self.send(301, headers={"Location": "/ok.jpg"})
                elif p == "/big.jpg":
                    self.send(200, JPEG + b"\0" * 300_000)
                elif p == "/html.jpg":
                    self.send(200, b"<html><body>not a picture</body></html>", "image/jpeg")
                elif p == "/noai.jpg":
                    self.send(200, JPEG, headers={"X-Robots-Tag": "noai"})
                elif p.startswith("/rate/"):
                    self.send(200, JPEG)
                else:
                    self.send(404)

        self.httpd, self.base = serve(Handler)

    def close(self):
        self.httpd.shutdown()
