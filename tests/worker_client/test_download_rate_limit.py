"""The agent's download rate limit (`--download-rate-limit`): the token bucket's arithmetic on a fake clock, and
a bounded rate over a real transfer measured in bytes and the waits the limiter asked for (no timing)."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from worker_client.agent import artifacts
from worker_client.agent.artifacts import ArtifactFile, ArtifactStore, Download, RateLimiter

KiB = 1024
MiB = 1024 * KiB


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_full_bucket_lets_the_burst_through_then_each_byte_costs_one_over_the_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(MiB, burst=256 * KiB, clock=clock)
    assert limiter.spend(256 * KiB) == 0  # the burst
    assert limiter.spend(256 * KiB) == pytest.approx(0.25)  # in debt by a quarter of a second's worth
    clock.now += 0.25  # the caller slept what it was told
    assert limiter.spend(512 * KiB) == pytest.approx(0.5)
    clock.now += 0.5
    assert limiter.spend(0) == 0


def test_an_idle_bucket_refills_only_up_to_the_burst() -> None:
    clock = FakeClock()
    limiter = RateLimiter(MiB, burst=128 * KiB, clock=clock)
    limiter.spend(128 * KiB)
    clock.now += 3600  # an hour idle buys no more than one burst
    assert limiter.spend(128 * KiB) == 0
    assert limiter.spend(MiB) == pytest.approx(1.0)


def test_downloads_sharing_the_limiter_share_the_rate() -> None:
    """Two downloads of the node draw on one bucket: after the burst, each byte of either one costs 1/rate."""
    clock = FakeClock()
    limiter = RateLimiter(2 * MiB, burst=64 * KiB, clock=clock)
    waits = [limiter.spend(64 * KiB)]
    for _ in range(16):  # two downloads interleaving 64 KiB reads, never sleeping: the debt adds up
        waits.append(limiter.spend(64 * KiB))
    assert waits[0] == 0
    assert waits[-1] == pytest.approx(16 * 64 * KiB / (2 * MiB))  # = 0.5 s: 1 MiB beyond the burst at 2 MiB/s


def test_over_any_stretch_the_bytes_let_through_stay_within_burst_plus_rate_times_time() -> None:
    clock = FakeClock()
    rate, burst = 3 * MiB, 100 * KiB
    limiter = RateLimiter(rate, burst=burst, clock=clock)
    start, sent = clock.now, 0
    for size in [40 * KiB, 300 * KiB, 1, 700 * KiB, 64 * KiB] * 20:
        clock.now += limiter.spend(size)  # the caller sleeps what it is told, then reads again
        sent += size
        assert sent <= burst + rate * (clock.now - start) + 1e-6


def test_the_default_burst_and_read_size_follow_the_rate() -> None:
    assert RateLimiter(50 * MiB).burst == 5 * MiB and RateLimiter(50 * MiB).chunk == artifacts.CHUNK
    assert RateLimiter(100 * KiB).burst == 64 * KiB and RateLimiter(100 * KiB).chunk == 64 * KiB
    assert ArtifactStore(Path("/nonexistent")).limiter is None
    assert ArtifactStore(Path("/nonexistent"), rate_limit=MiB).limiter.rate == MiB
    with pytest.raises(ValueError):
        RateLimiter(0)


class RecordingLimiter(RateLimiter):
    """Counts what the transfer spends and the waits it was told, without sleeping them."""

    def __init__(self, rate: int) -> None:
        super().__init__(rate, burst=64 * KiB, clock=self._clock_now)
        self.now = 0.0
        self.spent: list[int] = []

    def _clock_now(self) -> float:
        return getattr(self, "now", 0.0)

    def throttle(self, size: int) -> None:
        self.spent.append(size)
        self.now += self.spend(size)  # "sleeps" on its own clock


def test_a_transfer_spends_every_byte_it_writes_in_reads_no_bigger_than_the_limiter_chunk(
    tmp_path: Path,
) -> None:
    body = bytes(range(256)) * (3 * MiB // 256)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        file = ArtifactFile(
            uri="http://x", sha256=hashlib.sha256(body).hexdigest(), size=len(body), path="f.bin"
        )
        partial = tmp_path / ".f.bin.partial"
        limiter = RecordingLimiter(MiB)
        url = f"http://127.0.0.1:{server.server_address[1]}/f.bin"
        hasher = artifacts._transfer(
            url, {}, file, partial, 0, hashlib.sha256(), Download(file, total=len(body)), limiter
        )
    finally:
        server.shutdown()
        server.server_close()
    assert hasher.hexdigest() == file.sha256 and partial.read_bytes() == body
    assert sum(limiter.spent) == len(body)
    assert max(limiter.spent) <= limiter.chunk
    # 3 MiB at 1 MiB/s with a 64 KiB burst: the limiter's own clock says the transfer took 3 s less the burst.
    assert limiter.now == pytest.approx((len(body) - 64 * KiB) / MiB)
