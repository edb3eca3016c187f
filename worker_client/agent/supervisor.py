"""Backend processes keyed `<model>#<index>`: start, readiness, load, stop, and their output (BEHAVIOUR §7)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from worker_client._generated import backend_pb2
from worker_client.agent.artifacts import ArtifactFile, ArtifactStore, StagingError
from worker_client.agent.config import BackendCommand
from worker_client.agent.keys import process_key, resolve
from worker_client.agent.logstore import LogStore
from worker_client.agent.ports import PortAllocator
from worker_client.client import BackendClient

log = logging.getLogger(__name__)

AUTH_TOKEN_ENV = "LOCALAI_GRPC_AUTH_TOKEN"
LOADING, RUNNING = "loading", "running"
STDERR_LINES_IN_ERRORS = 20
STDERR_LINE_CHARS = 200  # keeps a failure's status message well under gRPC's metadata limit
LINE_LIMIT = 1024 * 1024
HEALTH_POLL_SECONDS = 0.1
HEALTH_CALL_TIMEOUT = 1.0
OUTPUT_DRAIN_SECONDS = 2.0
ALIVE_CHECK_TIMEOUT = 2.0
DYING_GRACE_SECONDS = 1.0

# Runs in the backend's process before it execs the backend (same pid): has the kernel SIGKILL the backend
# when the agent dies, even by SIGKILL. A wrapper rather than `preexec_fn`, because running Python code in a
# forked child of a process with gRPC threads can crash in gRPC's fork handling.
_DIE_WITH_AGENT = """
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):  # the agent died before prctl took effect
    sys.exit(1)
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as error:
    sys.exit(f"cannot start {sys.argv[2]}: {error}")
"""


def _launch_argv(argv: Sequence[str]) -> list[str]:
    """`argv` behind the wrapper that ties the backend's life to the agent's (Linux)."""
    return [sys.executable, "-I", "-S", "-c", _DIE_WITH_AGENT, str(os.getpid()), *argv]


# What a backend inherits from the agent's environment: the basics of a process, locale, TLS trust, and the GPU
# stacks' variables (but no name that looks like a credential, e.g. NVIDIA_API_KEY). Everything else (the
# registration token, DJANGO_SECRET_KEY, DATABASE_URL, cloud credentials, proxies...) stays with the agent; a
# backend that needs more gets it from its `env` in --backends-config.
INHERITED_ENV_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "LD_LIBRARY_PATH",
        "GPU_DEVICE_ORDINAL",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
    }
)
INHERITED_ENV_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "ROCR_", "ROCM_", "HIP_", "HSA_")
_CREDENTIAL_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")


def inherits(name: str) -> bool:
    """Whether a backend gets the agent's variable `name`."""
    if any(word in name.upper() for word in _CREDENTIAL_WORDS):
        return False
    return name in INHERITED_ENV_NAMES or name.startswith(INHERITED_ENV_PREFIXES)


def backend_environment(
    agent_env: Mapping[str, str], configured: Mapping[str, str], token: str
) -> dict[str, str]:
    """A backend's whole environment: the allowlisted part of the agent's, then the backend's configured `env`,
    then its `LOCALAI_GRPC_AUTH_TOKEN`."""
    inherited = {name: value for name, value in agent_env.items() if inherits(name)}
    return {**inherited, **configured, AUTH_TOKEN_ENV: token}


def _pid_has_exited(pid: int) -> bool:
    """Whether `pid` is gone or a zombie: true at once after a SIGKILL, before the agent reaps it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


class LoadFailed(Exception):
    """A backend did not come up; the message ends with its last stderr lines."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class ModelPathRefused(Exception):
    """A path in the load's `ModelOptions` lies outside the allowed model roots."""


class UnknownBackend(Exception):
    """The backend name is neither built in nor in `--backends-config`."""


@dataclass
class Replica:
    """One backend process and what the agent knows of it."""

    key: str
    model_name: str
    replica_index: int
    backend: str
    port: int
    address: str  # advertised host:port
    dial_address: str  # host:port the agent itself dials
    token: str  # the LOCALAI_GRPC_AUTH_TOKEN it was started with
    vram_bytes: int
    process: asyncio.subprocess.Process
    started_at: float = field(default_factory=time.time)
    state: str = LOADING
    load_seconds: float = 0.0
    exited: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    @property
    def has_exited(self) -> bool:
        """Exited, or killed and not reaped yet."""
        assert self.exited is not None
        return self.exited.done() or _pid_has_exited(self.pid)

    def backend_client(self) -> BackendClient:
        return BackendClient(self.dial_address, self.token)


@dataclass(frozen=True)
class LoadRequest:
    """What `LoadReplica` asks for."""

    model_name: str
    replica_index: int
    backend: str
    model_options: backend_pb2.ModelOptions
    vram_bytes: int
    load_timeout: float
    files: tuple[ArtifactFile, ...] = ()
    download_timeout: float = 3600.0


def _dial_host(bind_host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(bind_host, bind_host)


def _is_uri(model: str) -> bool:
    """`huggingface://org/m`, `https://...`: passed to the backend as they are, never taken for a path."""
    return "://" in model


def _check_contained(field_name: str, value: str, path: Path, roots: Sequence[Path]) -> None:
    """Raises `ModelPathRefused`, naming the path and the roots, unless `path` (symlinks resolved) lies in one
    of `roots`."""
    try:
        real = Path(os.path.realpath(path))
    except (OSError, ValueError) as error:
        raise ModelPathRefused(f"{field_name} {value!r} is not a usable path: {error}") from None
    if any(real == root or root in real.parents for root in roots):
        return
    allowed = ", ".join(str(root) for root in roots)
    raise ModelPathRefused(
        f"{field_name} {value!r} resolves to {real}, outside the allowed model roots ({allowed}); "
        "see --allowed-model-roots"
    )


def with_model_paths(
    options: backend_pb2.ModelOptions, models_path: Path, allowed_roots: Sequence[Path] = ()
) -> backend_pb2.ModelOptions:
    """`options` with `ModelPath` defaulting to the models directory and `ModelFile` to `Model` in it.

    `ModelPath` and `ModelFile` are paths; so is `Model` unless it is a URI (`scheme://...`). Relative ones are
    taken in `ModelPath`. Each must resolve (symlinks followed) inside `models_path` or one of
    `allowed_roots`, else `ModelPathRefused`. A `Model` such as `org/name` (a Hugging Face id) resolves inside
    the models path, so it passes, and a backend may still take it for an id.
    """
    roots = [Path(os.path.realpath(root)) for root in (models_path, *allowed_roots)]
    resolved = backend_pb2.ModelOptions()
    resolved.CopyFrom(options)
    base = models_path / resolved.ModelPath if resolved.ModelPath else models_path
    _check_contained("ModelPath", resolved.ModelPath or str(models_path), base, roots)
    resolved.ModelPath = str(base)
    if resolved.Model and not _is_uri(resolved.Model):
        _check_contained("Model", resolved.Model, base / resolved.Model, roots)
        if not resolved.ModelFile:
            resolved.ModelFile = str(base / resolved.Model)
    if resolved.ModelFile:
        _check_contained("ModelFile", resolved.ModelFile, base / resolved.ModelFile, roots)
        resolved.ModelFile = str(base / resolved.ModelFile)
    return resolved


class Supervisor:
    """The table of backend processes. Loads of different keys run in parallel; of one key, one at a time."""

    def __init__(
        self,
        *,
        backends: dict[str, BackendCommand],
        bind_host: str,
        advertise_host: str,
        ports: PortAllocator,
        logs: LogStore,
        models_path: Path,
        backend_token: Callable[[], str],
        allowed_model_roots: Sequence[Path] = (),
        stop_grace: float = 5.0,
        artifacts: ArtifactStore | None = None,
        on_staged: Callable[[str], None] | None = None,
    ) -> None:
        self._backends = backends
        self._bind_host = bind_host
        self._advertise_host = advertise_host
        self._ports = ports
        self._logs = logs
        self._models_path = models_path
        self._allowed_model_roots = tuple(allowed_model_roots)
        self._backend_token = backend_token
        self._stop_grace = stop_grace
        self._replicas: dict[str, Replica] = {}
        self.artifacts = artifacts or ArtifactStore(models_path)
        self._on_staged = on_staged or (lambda key: None)
        self.staging: set[str] = set()  # keys whose files are being staged
        self._key_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    # --- reads ---

    def replicas(self) -> list[Replica]:
        """Every process, loading or running, by key."""
        return [self._replicas[key] for key in sorted(self._replicas)]

    def find(self, selector: str) -> list[Replica]:
        """The processes an exact key or a bare model name designates."""
        return [self._replicas[key] for key in resolve(selector, self._replicas)]

    def vram_in_use(self) -> int:
        """Declared VRAM of every running and loading process."""
        return sum(replica.vram_bytes for replica in self._replicas.values())

    # --- load ---

    async def load(self, request: LoadRequest) -> Replica:
        """The live process for the request's key, started (and its model loaded) when there is none.

        Raises `UnknownBackend`, `ModelPathRefused`, `ports.NoFreePort` or `LoadFailed`; a failed start leaves
        no process behind.
        """
        command = self._backends.get(request.backend)
        if command is None:
            raise UnknownBackend(
                f"unknown backend {request.backend!r}; known: {', '.join(sorted(self._backends))}"
            )
        options = with_model_paths(request.model_options, self._models_path, self._allowed_model_roots)
        request = dataclasses.replace(request, model_options=options)
        key = process_key(request.model_name, request.replica_index)
        async with self._key_locks[key]:
            existing = self._replicas.get(key)
            if existing is not None:
                if await self._is_live(existing):
                    return existing
                log.warning("%s (pid %d) has died; replacing it", key, existing.pid)
                await self._terminate(existing)
            self._logs.reset(key)
            if request.files:
                await self._stage(key, request)
            try:
                replica = await self._spawn(key, request, command)
                await self._bring_up_or_clean_up(replica, request)
            except BaseException:
                self.artifacts.unpin(key)
                raise
            return replica

    async def _stage(self, key: str, request: LoadRequest) -> None:
        """The request's files present and verified before the backend starts (see `artifacts`); a failure is
        written to the replica's own log and raised as `StagingError`."""
        self.staging.add(key)
        try:
            await self.artifacts.ensure(request.files, key=key, timeout=request.download_timeout)
        except StagingError as error:
            self._logs.append(key, "stderr", f"[agent] staging failed: {error}")
            log.warning("%s: staging failed: %s", key, error)
            raise
        finally:
            self.staging.discard(key)
        self._logs.append(key, "stdout", f"[agent] {len(request.files)} file(s) staged; starting the backend")
        self._on_staged(key)

    @staticmethod
    async def _is_live(replica: Replica) -> bool:
        """Not exited. One that does not answer Health gets a second to show it is dying (just killed);
        one that is merely busy counts as live, so a slow backend is never replaced."""
        assert replica.exited is not None
        if replica.has_exited:
            return False
        if await replica.backend_client().health(ALIVE_CHECK_TIMEOUT):
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(replica.exited), DYING_GRACE_SECONDS)
        return not replica.has_exited

    async def _spawn(self, key: str, request: LoadRequest, command: BackendCommand) -> Replica:
        port = self._ports.acquire()
        token = self._backend_token()
        try:
            process = await asyncio.create_subprocess_exec(
                *_launch_argv([*command.argv, "--addr", f"{self._bind_host}:{port}"]),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=backend_environment(os.environ, command.env, token),
                start_new_session=True,
                limit=LINE_LIMIT,
            )
        except OSError as error:
            self._ports.release(port)
            raise LoadFailed(
                f"cannot start backend {request.backend!r} ({command.argv[0]}): {error}"
            ) from error
        replica = Replica(
            key=key,
            model_name=request.model_name,
            replica_index=request.replica_index,
            backend=request.backend,
            port=port,
            address=f"{self._advertise_host}:{port}",
            dial_address=f"{_dial_host(self._bind_host)}:{port}",
            token=token,
            vram_bytes=request.vram_bytes,
            process=process,
        )
        replica.exited = asyncio.create_task(self._watch(replica))
        self._replicas[key] = replica
        log.info("%s: started %s (pid %d) on port %d", key, request.backend, replica.pid, port)
        return replica

    async def _bring_up_or_clean_up(self, replica: Replica, request: LoadRequest) -> None:
        """Waits for Health OK and a successful LoadModel within the load timeout, else stops the process."""
        started = time.monotonic()
        try:
            await asyncio.wait_for(self._bring_up(replica, request.model_options), request.load_timeout)
        except BaseException as error:
            await asyncio.shield(self._terminate(replica))
            if isinstance(error, TimeoutError):
                reason = f"backend was not ready within the load timeout of {request.load_timeout:g} s"
                raise LoadFailed(self._with_stderr(replica.key, reason), timed_out=True) from None
            if isinstance(error, LoadFailed):
                raise LoadFailed(self._with_stderr(replica.key, str(error))) from None
            raise
        replica.state = RUNNING
        replica.load_seconds = time.monotonic() - started
        log.info("%s: ready at %s after %.2f s", replica.key, replica.address, replica.load_seconds)

    async def _bring_up(self, replica: Replica, model_options: backend_pb2.ModelOptions) -> None:
        assert replica.exited is not None
        client = replica.backend_client()
        while not await client.health(HEALTH_CALL_TIMEOUT):
            if replica.exited.done():
                raise LoadFailed(f"backend exited with code {replica.process.returncode} before it was ready")
            await asyncio.sleep(HEALTH_POLL_SECONDS)
        success, message = await client.load_model(model_options)
        if not success:
            raise LoadFailed(f"LoadModel failed: {message}")

    def _with_stderr(self, key: str, reason: str) -> str:
        stderr = [line.text for line in self._logs.read(key) if line.stream == "stderr"]
        tail = [text[:STDERR_LINE_CHARS] for text in stderr[-STDERR_LINES_IN_ERRORS:]]
        return "\n".join([f"{key}: {reason}; last stderr lines:" if tail else f"{key}: {reason}", *tail])

    # --- process life ---

    async def _watch(self, replica: Replica) -> None:
        """Records the process's output; once it has exited, frees its port and its place in the table."""
        readers = [
            asyncio.create_task(self._pump(replica.key, replica.process.stdout, "stdout")),
            asyncio.create_task(self._pump(replica.key, replica.process.stderr, "stderr")),
        ]
        code = await replica.process.wait()
        _, unfinished = await asyncio.wait(readers, timeout=OUTPUT_DRAIN_SECONDS)
        for reader in unfinished:
            reader.cancel()
        _signal_group(replica.pid, signal.SIGKILL)  # whatever the backend left behind in its group
        self._ports.release(replica.port)
        if self._replicas.get(replica.key) is replica:
            del self._replicas[replica.key]
            self.artifacts.unpin(replica.key)
        log.info("%s: pid %d exited with code %s", replica.key, replica.pid, code)

    async def _pump(self, key: str, stream: asyncio.StreamReader | None, name: str) -> None:
        assert stream is not None
        while True:
            try:
                raw = await stream.readline()
            except ValueError:
                self._logs.append(key, name, f"[line longer than {LINE_LIMIT} bytes dropped]")
                continue
            if not raw:
                return
            self._logs.append(key, name, raw.decode("utf-8", errors="replace").rstrip("\r\n"))

    async def _terminate(self, replica: Replica) -> None:
        """SIGTERM to the process group, SIGKILL after the grace period; returns once it is gone."""
        assert replica.exited is not None
        if replica.exited.done():
            return
        _signal_group(replica.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(replica.exited), self._stop_grace)
        except TimeoutError:
            _signal_group(replica.pid, signal.SIGKILL)
            await replica.exited

    # --- stop ---

    async def stop(self, selector: str) -> list[str]:
        """Stops what an exact key or a bare model name designates; answers the keys stopped."""
        replicas = self.find(selector)
        await asyncio.gather(*(self._terminate(replica) for replica in replicas))
        return [replica.key for replica in replicas]

    async def stop_all(self) -> None:
        await asyncio.gather(*(self._terminate(replica) for replica in self.replicas()))
