"""The ingest endpoint under a large upload and under stalled uploads (issue 18, part 3).

The endpoint (``IngestServer`` over a SQLite store) runs in its own process so its memory is measured alone:

1. ``/healthz`` latency while one large episode (``--upload-mb``, default ~65 MB: one camera of 240×320 frames)
   is uploaded and stored: p50 and max over every health check answered during the upload, next to idle;
2. ``--stalled`` authenticated uploads (default 200) that declare an 8 MB body, send 1 MB and stall: the
   server's RSS before and with them, how many the server closed (408 after ``--stall-timeout-s``, or 503 at
   once beyond ``max_concurrent_uploads`` and closed after aiohttp's lingering drain) within ``--wait-s``, its
   RSS afterwards and ``/healthz`` latency.

    python benchmarks/ingest_abuse.py                       # defaults: 65 MB, 200 stalled, 5 s stall timeout
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.spool import encode_episode
from tests.test_spool import make_record

KEY = "bench"
_SERVER = """
import sys, time
from experiments.ingest import IngestConfig, IngestServer
from storage.store import ExperienceStore
store = ExperienceStore(f"sqlite:///{sys.argv[1]}")
store.upgrade()
store.register_policy_version("robot-test-v1", kind="scripted")
config = IngestConfig(api_key=sys.argv[2], port=0, max_episode_bytes=128 << 20, stall_timeout_s=float(sys.argv[3]))
print(IngestServer(store, config).start().port, flush=True)
time.sleep(3600)
"""


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _health_ms(url: str) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(f"{url}/healthz", timeout=60) as response:
        response.read()
    return (time.perf_counter() - start) * 1000


def _large_episode(megabytes: int) -> bytes:
    steps = max(2, megabytes * 1024 * 1024 // (240 * 320 * 3))
    record = make_record(steps=steps)
    frames = np.zeros((steps, 240, 320, 3), np.uint8)
    frames[:, :8, :8] = (np.arange(steps) % 256).astype(np.uint8)[:, None, None, None]
    record.images = {"corner2": frames}
    return encode_episode(record)


def health_during_upload(url: str, body: bytes) -> str:
    idle = [_health_ms(url) for _ in range(20)]
    result: dict[str, float] = {}

    def upload() -> None:
        request = urllib.request.Request(
            f"{url}/episodes", data=body, method="POST", headers={"Authorization": f"Api-Key {KEY}"}
        )
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=300) as response:
            result["status"] = response.status
        result["seconds"] = time.perf_counter() - start

    worker = threading.Thread(target=upload)
    worker.start()
    during = []
    while worker.is_alive():
        during.append(_health_ms(url))
    worker.join()
    return (
        f"upload {len(body) / 1e6:.0f} MB: HTTP {result['status']} in {result['seconds']:.1f} s; /healthz idle "
        f"p50 {np.median(idle):.1f} ms; during the upload {len(during)} answered, p50 {np.median(during):.1f} "
        f"ms, max {max(during):.1f} ms"
    )


def stalled_uploads(url: str, port: int, pid: int, count: int, wait_s: float) -> str:
    before = _rss_mb(pid)
    head = f"POST /episodes HTTP/1.1\r\nHost: x\r\nAuthorization: Api-Key {KEY}\r\nContent-Length: {8 << 20}\r\n\r\n"
    clients = []
    for _ in range(count):
        client = socket.create_connection(("127.0.0.1", port), timeout=wait_s)
        client.sendall(head.encode() + b"\0" * (1 << 20))
        clients.append(client)
    time.sleep(2)
    held = _rss_mb(pid)
    start, closed = time.monotonic(), 0
    for client in clients:
        client.settimeout(max(0.1, wait_s - (time.monotonic() - start)))
        try:
            while client.recv(65536):
                pass
            closed += 1
        except (TimeoutError, ConnectionResetError):
            pass
    elapsed = time.monotonic() - start
    after = _rss_mb(pid)
    for client in clients:
        client.close()
    return (
        f"{count} stalled uploads (1 MB of 8 MB sent): server RSS {before:.0f} -> {held:.0f} MB; {closed}/{count} "
        f"closed by the server within {elapsed:.1f} s; RSS then {after:.0f} MB; /healthz {_health_ms(url):.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--upload-mb", type=int, default=65)
    parser.add_argument("--stalled", type=int, default=200)
    parser.add_argument("--stall-timeout-s", type=float, default=5.0)
    parser.add_argument("--wait-s", type=float, default=60.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-c", _SERVER, f"{folder}/fw.db", KEY, str(args.stall_timeout_s)]
        server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            url = f"http://127.0.0.1:{port}"
            print(health_during_upload(url, _large_episode(args.upload_mb)), flush=True)
            print(stalled_uploads(url, port, server.pid, args.stalled, args.wait_s), flush=True)
        finally:
            server.kill()
            server.wait()


if __name__ == "__main__":
    main()
