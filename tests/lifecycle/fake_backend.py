"""A stand-in backend for lifecycle tests (no model, no llama.cpp).

    python fake_backend.py --port P [--mode ok|stall|crash|silent-slow] [--ready-after S] [--ignore-term]

ok: serves GET /v1/models, GET /health, GET /env (its CUDA_VISIBLE_DEVICES), POST /v1/chat/completions
(its answer's ``received`` is the request body as it arrived).
stall: prints a line, then sleeps without ever listening. crash: prints and exits 3.
--ready-after: prints a line every 50 ms and starts listening only after S seconds.
--ignore-term: ignores SIGTERM (to test the SIGKILL after the grace period).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path in ("/v1/models", "/health"):
            self._send(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
        elif self.path == "/env":
            self._send(200, {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid()})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        raw = self.rfile.read(length)
        req = json.loads(raw or b"{}")
        self._send(
            200,
            {
                "object": "chat.completion",
                "model": req.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "fake"}, "finish_reason": "stop"}],
                "received": raw.decode(),  # the body as it reached the backend
            },
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", default="ok")
    ap.add_argument("--ready-after", type=float, default=0.0)
    ap.add_argument("--ignore-term", action="store_true")
    args = ap.parse_args()
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(f"fake backend starting on {args.port} ({args.mode})", flush=True)
    if args.mode == "stall":
        while True:
            time.sleep(3600)
    if args.mode == "crash":
        print("fatal: cannot load model", flush=True)
        sys.exit(3)
    deadline = time.monotonic() + args.ready_after
    while time.monotonic() < deadline:
        print("loading...", flush=True)
        time.sleep(0.05)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print("listening", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
