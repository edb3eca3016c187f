"""Model artifacts staged before a load: download, resume, verify, rename, disk budget (issue 15).

A catalog model may list `files` (`uri`, `sha256`, `size`, `path`); before `LoadModel` the agent makes sure
each one is under `--models-path` at `path` and verified:

- it downloads to `.<name>.partial` next to the final path, resuming with an HTTP `Range` from the bytes
  already there (after a crash or a broken connection), hashes while writing, checks size and sha256, and
  renames atomically (`os.replace`); a file that fails its checksum is deleted;
- one download per file per node, however many replicas or requests want it (they share its task);
- 404, 5xx and connection failures are retried with backoff (0.5 s doubling to 10 s) until the download
  timeout;
- with a budget (`--models-cache-size`, 0 = unlimited), a file that does not fit is refused before anything is
  downloaded, after evicting least recently used files the agent itself downloaded and no running replica
  uses; a file the agent did not download is never deleted;
- with a rate limit (`--download-rate-limit`, 0 = unlimited), every download of the node together stays under
  that many bytes per second (`RateLimiter`, one token bucket shared by the download threads).

What the agent downloaded is remembered in `<models-path>/.localai-artifacts.json`. Used from the agent's event
loop only; file I/O and hashing run in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import http.client
import json
import logging
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import httpx

log = logging.getLogger(__name__)

MANIFEST_NAME = ".localai-artifacts.json"
CHUNK = 1024 * 1024
FIRST_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 10.0
READ_TIMEOUT = 30.0
RATE_WINDOW = 3.0
CP_SCHEME = "cp://"


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover


@dataclass(frozen=True)
class ArtifactFile:
    uri: str
    sha256: str
    size: int
    path: str


class StagingError(Exception):
    """A file could not be staged; `kind` is `checksum`, `budget`, `source`, `timeout` or `invalid`."""

    kind = "source"


class ChecksumMismatch(StagingError):
    kind = "checksum"


class BudgetExceeded(StagingError):
    kind = "budget"


class SourceFailed(StagingError):
    kind = "source"


class DownloadTimeout(StagingError):
    kind = "timeout"


class InvalidArtifact(StagingError):
    kind = "invalid"


class _Retryable(Exception):
    """A failure worth trying again (404, 5xx, a broken connection)."""


@dataclass
class Download:
    """One file being fetched; shared by every load that needs it."""

    file: ArtifactFile
    done: int = 0
    total: int = 0
    task: asyncio.Task[None] | None = None
    samples: list[tuple[float, int]] = field(default_factory=list)

    def note(self, done: int) -> None:
        now = time.monotonic()
        self.done = done
        self.samples.append((now, done))
        while len(self.samples) > 2 and self.samples[0][0] < now - RATE_WINDOW:
            self.samples.pop(0)

    @property
    def rate(self) -> float:
        """Bytes per second over the last few seconds."""
        if len(self.samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


def check_relative_path(path: str) -> str:
    """`path` if it is relative, without `..`, empty or absolute parts; else `InvalidArtifact`."""
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or any(part in ("..", "") for part in path.split("/")) or "\\" in path:
        raise InvalidArtifact(f"file path {path!r} must be relative, without '..'")
    return path


class RateLimiter:
    """A token bucket shared by every download of the node: at most `rate` bytes per second on average, with a
    burst of at most `burst` bytes (default: a tenth of a second's worth, at least 64 KiB). `spend(n)` takes `n`
    bytes already received and answers how long the caller must sleep before reading more: the bucket goes into
    debt, and the debt is paid back at `rate`. Thread-safe; `clock` is injectable for tests."""

    def __init__(self, rate: int, *, burst: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError("rate must be more than 0")
        self.rate = rate
        self.burst = burst or max(rate // 10, 64 * 1024)
        self._clock = clock
        self._tokens = float(self.burst)
        self._last = clock()
        self._lock = threading.Lock()

    @property
    def chunk(self) -> int:
        """How many bytes to read at a time under this limit: small enough that progress moves smoothly."""
        return max(min(CHUNK, self.burst), 16 * 1024)

    def spend(self, size: int) -> float:
        """Takes `size` bytes from the bucket; answers the seconds to wait (0 when within the budget)."""
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= size
            return -self._tokens / self.rate if self._tokens < 0 else 0.0

    def throttle(self, size: int) -> None:
        """`spend(size)` and sleep the wait it answers (blocking: called from the download threads)."""
        wait = self.spend(size)
        if wait > 0:
            time.sleep(wait)


class ArtifactStore:
    """The files staged under `models_path`, their downloads and the disk budget (`cache_size`, 0 = none)."""

    def __init__(
        self,
        models_path: Path,
        *,
        cache_size: int = 0,
        rate_limit: int = 0,
        control_plane_url: str = "",
        node_token: Callable[[], str] = lambda: "",
        node_id: Callable[[], str] = lambda: "",
        note: Callable[[str, str], None] | None = None,
    ) -> None:
        self.models_path = models_path
        self.cache_size = cache_size
        self.limiter = RateLimiter(rate_limit) if rate_limit > 0 else None
        self._cp_url = control_plane_url.rstrip("/")
        self._node_token = node_token
        self._node_id = node_id
        self._note = note or (lambda key, text: None)
        self._manifest_path = models_path / MANIFEST_NAME
        self._entries: dict[str, dict[str, Any]] = self._read_manifest()
        self.downloads: dict[str, Download] = {}
        self._pins: dict[str, set[str]] = {}  # process key → paths its replica uses
        self.waiting: dict[str, list[ArtifactFile]] = {}  # process key → files it waits for

    # --- manifest ---

    def _read_manifest(self) -> dict[str, dict[str, Any]]:
        try:
            raw = json.loads(self._manifest_path.read_text())
        except (OSError, ValueError):
            return {}
        entries = raw.get("files", {}) if isinstance(raw, dict) else {}
        return {
            path: entry
            for path, entry in entries.items()
            if isinstance(entry, dict) and (self.models_path / path).is_file()
        }

    def _write_manifest(self) -> None:
        self.models_path.mkdir(parents=True, exist_ok=True)
        temporary = self._manifest_path.with_name(MANIFEST_NAME + ".tmp")
        temporary.write_text(json.dumps({"files": self._entries}, indent=1, sort_keys=True))
        os.replace(temporary, self._manifest_path)

    def held(self) -> list[str]:
        """sha256 of every verified file present (the heartbeat's `artifacts`)."""
        return sorted(
            {
                str(entry.get("sha256"))
                for path, entry in self._entries.items()
                if entry.get("sha256") and (self.models_path / path).is_file()
            }
        )

    def used_bytes(self) -> int:
        """Bytes the budget counts: files the agent downloaded, and partial downloads."""
        owned = sum(int(e.get("size") or 0) for e in self._entries.values() if e.get("owned"))
        return owned + sum(d.done for d in self.downloads.values())

    # --- pins (files of live replicas are never evicted) ---

    def unpin(self, key: str) -> None:
        self._pins.pop(key, None)

    def _pinned(self) -> set[str]:
        return set().union(*self._pins.values()) if self._pins else set()

    # --- progress ---

    def progress(self, key: str) -> tuple[int, int, float]:
        """(bytes done, bytes total, rate) over the files `key` waits for."""
        done = total = 0
        rate = 0.0
        for file in self.waiting.get(key, []):
            total += file.size
            download = self.downloads.get(file.path)
            if download is not None:
                done += download.done
                rate += download.rate
            elif file.path in self._entries:
                done += file.size
        return done, total, rate

    # --- staging ---

    async def ensure(self, files: Iterable[ArtifactFile], *, key: str = "", timeout: float) -> None:
        """Every file present and verified, downloading what is missing; raises `StagingError`."""
        files = list(files)
        for file in files:
            check_relative_path(file.path)
        deadline = time.monotonic() + timeout
        if key:
            self.waiting[key] = files
            self._pins[key] = {file.path for file in files}
        try:
            for file in files:
                await self._ensure_one(file, deadline, timeout, key)
        except BaseException:
            if key:
                self.unpin(key)
            raise
        finally:
            if key:
                self.waiting.pop(key, None)

    async def _ensure_one(self, file: ArtifactFile, deadline: float, timeout: float, key: str) -> None:
        while True:
            if self.is_staged(file):
                self._entries[file.path]["last_used"] = time.time()
                self._write_manifest()
                return
            running = self.downloads.get(file.path)
            if running is None:
                if await self._adopt_existing(file):
                    continue
                running = Download(file, total=file.size)
                running.task = asyncio.create_task(self._download(running, deadline, timeout, key))
                self.downloads[file.path] = running
                running.task.add_done_callback(self._forget_download(file.path))
            else:
                self._note(key, f"[agent] {file.path}: already being downloaded for another replica; waiting")
            assert running.task is not None
            remaining = deadline - time.monotonic()
            try:
                await asyncio.wait_for(asyncio.shield(running.task), max(remaining, 0.01))
            except TimeoutError:
                raise DownloadTimeout(
                    f"{file.path}: not downloaded within the download timeout of {timeout:g} s"
                ) from None
            if running.file.sha256 != file.sha256:
                continue  # another version of the path was fetched: look again

    def _forget_download(self, path: str) -> Callable[[asyncio.Task[None]], None]:
        def forget(task: asyncio.Task[None]) -> None:
            self.downloads.pop(path, None)
            if not task.cancelled():
                task.exception()  # retrieved: every waiter gets it raised

        return forget

    def is_staged(self, file: ArtifactFile) -> bool:
        entry = self._entries.get(file.path)
        return (
            entry is not None
            and entry.get("sha256") == file.sha256
            and (self.models_path / file.path).is_file()
            and (file.size <= 0 or (self.models_path / file.path).stat().st_size == file.size)
        )

    async def _adopt_existing(self, file: ArtifactFile) -> bool:
        """A file already at `path` that the agent did not download: kept (never deleted) when its checksum
        matches, refused otherwise."""
        final = self.models_path / file.path
        if not final.is_file():
            return False
        entry = self._entries.get(file.path)
        if entry is not None and entry.get("owned") and entry.get("sha256") != file.sha256:
            final.unlink()  # an older version this agent downloaded: replaced
            del self._entries[file.path]
            self._write_manifest()
            return False
        digest = await asyncio.to_thread(_sha256_of, final)
        if digest != file.sha256:
            raise ChecksumMismatch(
                f"{file.path} already exists with sha256 {digest}, not {file.sha256}; it was not downloaded "
                "by this agent, so it is left alone: remove or fix it"
            )
        entry = self._entries.get(file.path, {})
        self._entries[file.path] = {
            "sha256": file.sha256,
            "size": final.stat().st_size,
            "owned": bool(entry.get("owned") and entry.get("sha256") == file.sha256),
            "last_used": time.time(),
        }
        self._write_manifest()
        return True

    def _url(self, file: ArtifactFile) -> tuple[str, dict[str, str]]:
        if file.uri.startswith(CP_SCHEME):
            name = file.uri[len(CP_SCHEME) :]
            url = f"{self._cp_url}/api/node/{self._node_id()}/artifacts/{name}"
            return url, {"Authorization": f"Bearer {self._node_token()}"}
        return file.uri, {}

    def _make_room(self, needed: int, file: ArtifactFile) -> None:
        """Evicts least recently used unpinned files the agent downloaded until `needed` bytes fit the budget;
        raises `BudgetExceeded` (before any byte is fetched) when they cannot."""
        target = self.models_path / file.path
        target.parent.mkdir(parents=True, exist_ok=True)
        if self.cache_size:
            pinned = self._pinned()
            while self.used_bytes() + needed > self.cache_size:
                victims = sorted(
                    (
                        (float(entry.get("last_used") or 0), path)
                        for path, entry in self._entries.items()
                        if entry.get("owned") and path not in pinned and path != file.path
                    )
                )
                if not victims:
                    free = max(self.cache_size - self.used_bytes(), 0)
                    raise BudgetExceeded(
                        f"{file.path} needs {human_bytes(needed)}, {human_bytes(free)} free of the "
                        f"--models-cache-size budget of {human_bytes(self.cache_size)} (the other files are "
                        "in use or were not downloaded by this agent)"
                    )
                _, path = victims[0]
                with contextlib.suppress(FileNotFoundError):
                    (self.models_path / path).unlink()
                del self._entries[path]
                self._write_manifest()
                log.info("evicted %s (least recently used, no running replica uses it)", path)
        disk_free = shutil.disk_usage(target.parent).free
        if needed > disk_free:
            raise BudgetExceeded(
                f"{file.path} needs {human_bytes(needed)}, {human_bytes(disk_free)} free on the disk"
            )

    async def _download(self, download: Download, deadline: float, timeout: float, key: str) -> None:
        file = download.file
        if not file.sha256:
            raise InvalidArtifact(
                f"{file.path}: the catalog gives no sha256; fill it (POST /api/models/{{name}}/files/scan for "
                "cp:// files)"
            )
        if file.size <= 0:
            file = download.file = dataclasses.replace(file, size=await self._probe_size(file, deadline))
            download.total = file.size
        final = self.models_path / file.path
        partial = final.with_name(f".{final.name}.partial")
        offset = partial.stat().st_size if partial.exists() else 0
        if offset > file.size:
            partial.unlink()
            offset = 0
        self._make_room(file.size - offset, file)
        self._note(
            key,
            f"[agent] downloading {file.path} ({human_bytes(file.size)}) from {file.uri}"
            + (f", resuming at byte {offset}" if offset else ""),
        )
        delay = FIRST_RETRY_DELAY
        hasher = hashlib.sha256()
        while True:
            try:
                hasher = await self._fetch(download, partial)
                break
            except _Retryable as error:
                if time.monotonic() + delay >= deadline:
                    raise SourceFailed(
                        f"{file.path}: download from {file.uri} failed for {timeout:g} s (the download "
                        f"timeout): {error}"
                    ) from None
                self._note(key, f"[agent] {file.path}: {error}; retrying in {delay:g} s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY)
        size = partial.stat().st_size
        digest = hasher.hexdigest()
        if size != file.size or digest != file.sha256:
            partial.unlink(missing_ok=True)
            what = f"size {size}, expected {file.size}" if size != file.size else f"sha256 {digest}"
            raise ChecksumMismatch(
                f"checksum mismatch for {file.path} from {file.uri}: {what}, expected sha256 {file.sha256}; "
                "the file was removed"
            )
        await asyncio.to_thread(_fsync, partial)
        os.replace(partial, final)
        self._entries[file.path] = {
            "sha256": file.sha256,
            "size": file.size,
            "owned": True,
            "last_used": time.time(),
        }
        self._write_manifest()
        self._note(key, f"[agent] {file.path}: verified (sha256 {file.sha256[:12]}…) and in place")

    async def _probe_size(self, file: ArtifactFile, deadline: float) -> int:
        """The size the server announces (`HEAD`'s Content-Length), for a catalog entry without one."""
        url, headers = self._url(file)
        try:
            async with httpx.AsyncClient(timeout=READ_TIMEOUT) as http:
                response = await http.head(url, headers=headers, follow_redirects=True)
            size = int(response.headers.get("Content-Length") or 0)
        except (httpx.HTTPError, ValueError) as error:
            raise SourceFailed(f"{file.path}: cannot read the size of {file.uri}: {error}") from None
        if response.status_code != 200 or size <= 0:
            raise SourceFailed(
                f"{file.path}: {file.uri} answered HEAD with {response.status_code} and no size; give the "
                "file's size in the catalog"
            )
        return size

    async def _fetch(self, download: Download, partial: Path) -> Any:
        """One attempt: appends to `partial` from its current size; answers the hasher of the whole file. The
        transfer runs in a daemon thread on `http.client` (several times faster than an async HTTP client in
        Python on large bodies, see bench/staging.py), which never holds the agent's exit."""
        file = download.file
        offset = partial.stat().st_size if partial.exists() else 0
        hasher = hashlib.sha256()
        if offset:
            hasher = await asyncio.to_thread(_sha256_state, partial)
        download.note(offset)
        if offset == file.size:
            return hasher
        url, headers = self._url(file)
        if offset:
            headers["Range"] = f"bytes={offset}-"
        return await _in_daemon_thread(
            _transfer, url, headers, file, partial, offset, hasher, download, self.limiter
        )


def _transfer(
    url: str,
    headers: dict[str, str],
    file: ArtifactFile,
    partial: Path,
    offset: int,
    hasher: Any,
    download: Download,
    limiter: RateLimiter | None = None,
) -> Any:
    """Blocking GET of `url` appended to `partial` (hashing as it writes, paced by `limiter` when there is
    one); raises `_Retryable`."""
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=READ_TIMEOUT)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code == 416 and offset:
            return hasher  # nothing past what is there: the check decides
        raise _Retryable(f"HTTP {error.code} from {file.uri}") from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise _Retryable(f"{type(error).__name__} from {file.uri}: {error}") from None
    with response:
        mode = "ab"
        if offset and response.status == 200:  # the server ignored the range: start over
            offset, mode, hasher = 0, "wb", hashlib.sha256()
            download.note(0)
        done = offset
        size = limiter.chunk if limiter else CHUNK
        try:
            with partial.open(mode) as out:
                while chunk := response.read(size):
                    if limiter:
                        limiter.throttle(len(chunk))
                    out.write(chunk)
                    hasher.update(chunk)
                    done += len(chunk)
                    download.note(done)
                    if done > file.size:
                        break  # longer than the catalog says: the check fails it
        except (OSError, http.client.HTTPException) as error:
            raise _Retryable(f"{type(error).__name__} from {file.uri} at byte {done}: {error}") from None
    if partial.stat().st_size < file.size:
        raise _Retryable(f"connection to {file.uri} ended at byte {partial.stat().st_size}")
    return hasher


async def _in_daemon_thread(function: Callable[..., Any], *args: Any) -> Any:
    """`function(*args)` in a daemon thread; its result or exception comes back to the event loop."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result = function(*args)
        except BaseException as error:
            outcome: tuple[Any, BaseException | None] = (None, error)
        else:
            outcome = (result, None)
        with contextlib.suppress(RuntimeError):  # the agent's loop has closed: nobody waits any more
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name="artifact-download", daemon=True).start()
    return await future


def _sha256_state(path: Path) -> Any:
    hasher = hashlib.sha256()
    with path.open("rb") as source:
        while block := source.read(CHUNK):
            hasher.update(block)
    return hasher


def _sha256_of(path: Path) -> str:
    return str(_sha256_state(path).hexdigest())


def _fsync(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())
