"""deploy/nginx/shardon.conf, run by a real nginx in front of Shardon and a mock node.

Only the listen address and the upstream address of the file are changed. Through nginx: a stream
arrives chunk by chunk, the client's address reaches the request log only when nginx's address is
in ``server.trusted_proxies``, a body over the limit is refused (one of exactly the limit is not),
an upload takes its larger limit, and the TLS example block serves HTTPS with a certificate.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import free_port, node_entry, wait_until

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "deploy" / "nginx" / "shardon.conf"
CLIENT_IP = "127.0.0.9"  # the test's own source address: not nginx's (127.0.0.1)
MAX_BODY = 1048576  # server.max_body_bytes, and the file's client_max_body_size 1m


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    assert found, "nginx is not installed: run .ci/system-packages (README 'Test it')"
    return found


def render(text: str, listen: str, upstream: str) -> str:
    """The file with its listen and upstream addresses replaced (each must be found exactly once)."""
    text, listens = re.subn(r"^(\s*)listen 80;", rf"\g<1>listen {listen};", text, flags=re.M)
    text, upstreams = re.subn(r"^(\s*)server 127\.0\.0\.1:8080;", rf"\g<1>server {upstream};", text, flags=re.M)
    assert (listens, upstreams) == (1, 1), "deploy/nginx/shardon.conf: 'listen 80;' or the upstream server moved"
    return text


def tls_block(text: str, listen: str, cert: Path, key: Path) -> str:
    """The commented TLS example, uncommented, on ``listen`` with a test certificate."""
    lines = text.splitlines()
    start = lines.index("# server {")
    end = lines.index("# }", start)
    block = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in lines[start : end + 1])
    block, listens = re.subn(r"listen 443 ssl http2;", f"listen {listen} ssl http2;", block)
    block = block.replace("/etc/ssl/shardon/fullchain.pem", str(cert)).replace("/etc/ssl/shardon/privkey.pem", str(key))
    assert listens == 1
    return block


class Nginx:
    def __init__(self, workdir: Path, site: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "site.conf").write_text(site)
        user = "user root;" if os.geteuid() == 0 else ""
        temps = "\n".join(
            f"    {name}_temp_path {workdir}/{name};" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (workdir / "nginx.conf").write_text(
            f"""{user}
daemon off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log info;
events {{ worker_connections 512; }}
http {{
    access_log {workdir}/access.log;
    default_type application/octet-stream;
{temps}
    include {workdir}/site.conf;
}}
"""
        )
        self.workdir = workdir
        check = subprocess.run(
            [
                nginx_binary(),
                "-t",
                "-p",
                str(workdir),
                "-e",
                str(workdir / "error.log"),
                "-c",
                str(workdir / "nginx.conf"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen(
            [nginx_binary(), "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(workdir / "nginx.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait_listening(self, port: int) -> None:
        def up() -> bool:
            assert self.proc.poll() is None, (self.workdir / "error.log").read_text()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return True
            except OSError:
                return False

        wait_until(up, timeout=10)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def make_nginx(tmp_path: Path) -> Iterator[Callable[[Any], int]]:
    """``make_nginx(gateway)``: nginx with deploy/nginx/shardon.conf in front of it; its port."""
    started: list[Nginx] = []

    def make(gateway: Any) -> int:
        port = free_port()
        site = render(CONF.read_text(), f"127.0.0.1:{port}", f"127.0.0.1:{gateway.port}")
        nginx = Nginx(tmp_path / f"nginx-{len(started)}", site)
        started.append(nginx)
        nginx.wait_listening(port)
        return port

    yield make
    for nginx in started:
        nginx.stop()


def connect(port: int) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=15, source_address=(CLIENT_IP, 0))


def post(port: int, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = connect(port)
    try:
        conn.request(
            "POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json", **(headers or {})}
        )
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def logged_client(gw: Any, request_id: str) -> str:
    def fetch() -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
        try:
            conn.request("GET", f"/admin/requests/{request_id}")
            resp = conn.getresponse()
            body = resp.read()
            return json.loads(body) if resp.status == 200 else None
        finally:
            conn.close()

    return str(wait_until(fetch, timeout=5)["client_addr"])


def chat(content: str = "hi", **fields: Any) -> bytes:
    return json.dumps({"model": "m1", "messages": [{"role": "user", "content": content}], **fields}).encode()


def test_stream_passes_chunk_by_chunk_and_the_client_reaches_the_log(
    make_mock: Any, make_gateway: Any, make_nginx: Any
) -> None:
    node = make_mock(models=["m1"], chunks=8, delay_ms=150, name="n")
    nodes = [node_entry(node, "n", ["m1"], max_concurrent=8)]
    trusting = make_gateway(nodes=nodes, server={"trusted_proxies": ["127.0.0.1"]})
    port = make_nginx(trusting)

    conn = connect(port)
    started = time.monotonic()
    conn.request("POST", "/v1/chat/completions", body=chat(stream=True), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("content-type", "").startswith("text/event-stream")
    arrivals: list[float] = []
    buffered = b""
    while chunk := resp.read1(65536):
        buffered += chunk
        arrivals.extend(time.monotonic() - started for _ in range(chunk.count(b"data: {")))
    assert buffered.rstrip().endswith(b"data: [DONE]")
    assert len(arrivals) >= 8, buffered
    # 8 tokens 150 ms apart: the first must come long before the last (nothing held back by nginx).
    assert arrivals[-1] - arrivals[0] >= 0.6, arrivals
    assert arrivals[0] < arrivals[-1] / 2, arrivals
    request_id = str(resp.getheader("x-request-id"))
    conn.close()
    assert logged_client(trusting, request_id) == CLIENT_IP

    # A client's own X-Forwarded-For is not believed: nginx appends the address it saw.
    status, headers, _ = post(port, chat(max_tokens=2), {"X-Forwarded-For": "203.0.113.7"})
    assert status == 200
    assert logged_client(trusting, headers["x-request-id"]) == CLIENT_IP

    # Shardon without trusted_proxies logs nginx itself, whatever the headers.
    plain = make_gateway(nodes=nodes)
    status, headers, _ = post(make_nginx(plain), chat(max_tokens=2))
    assert status == 200
    assert logged_client(plain, headers["x-request-id"]).startswith("127.0.0.1:")


def test_body_limit_matches_shardons(make_mock: Any, make_gateway: Any, make_nginx: Any) -> None:
    node = make_mock(models=["m1"], chunks=2, name="n")
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])], server={"max_body_bytes": MAX_BODY})
    port = make_nginx(gw)
    padding = MAX_BODY - len(chat(""))
    at_limit = chat("x" * padding)
    assert len(at_limit) == MAX_BODY
    status, _, answer = post(port, at_limit)
    assert status == 200, answer
    before = node.stats.total_requests
    status, _, answer = post(port, chat("x" * (padding + 1)))
    body = json.loads(answer)
    assert status == 413
    assert body["error"]["code"] == "request_too_large"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert node.stats.total_requests == before


def test_uploads_take_larger_bodies(make_mock: Any, make_gateway: Any, make_nginx: Any) -> None:
    node = make_mock(models=["whisper"], name="n")
    gw = make_gateway(nodes=[node_entry(node, "n", ["whisper"])])
    port = make_nginx(gw)
    audio = b"\x00" * (3 * MAX_BODY)
    form = (
        b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n'
        b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n' + audio + b"\r\n--B--\r\n"
    )
    conn = connect(port)
    try:
        conn.request(
            "POST", "/v1/audio/transcriptions", body=form, headers={"Content-Type": "multipart/form-data; boundary=B"}
        )
        resp = conn.getresponse()
        answer = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 200, answer
    assert answer["text"].startswith(f"transcribed {len(audio)} bytes")
    assert post(port, chat("x" * (3 * MAX_BODY)))[0] == 413  # chat keeps its 1 MiB


@pytest.mark.parametrize("engine", ["native"])
def test_tls_example_block_serves_https(make_mock: Any, make_gateway: Any, tmp_path: Path) -> None:
    node = make_mock(models=["m1"], chunks=2, name="n")
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])])
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    openssl = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
    subprocess.run([*openssl, "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    plain_port, tls_port = free_port(), free_port()
    text = CONF.read_text()
    site = render(text, f"127.0.0.1:{plain_port}", f"127.0.0.1:{gw.port}")
    site += "\n" + tls_block(text, f"127.0.0.1:{tls_port}", cert, key) + "\n"
    nginx = Nginx(tmp_path / "nginx-tls", site)
    try:
        nginx.wait_listening(tls_port)
        context = ssl.create_default_context(cafile=str(cert))
        context.check_hostname = False
        conn = http.client.HTTPSConnection("127.0.0.1", tls_port, timeout=15, context=context)
        conn.request(
            "POST", "/v1/chat/completions", body=chat(max_tokens=2), headers={"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        answer = json.loads(resp.read())
        assert resp.status == 200, answer
        assert answer["choices"][0]["message"]["content"]
        conn.close()
    finally:
        nginx.stop()
