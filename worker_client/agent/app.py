"""The agent's life: serve WorkerControl, register, heartbeat, stop orphans, and shut down cleanly."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import signal
from typing import Any

import grpc

from worker_client.agent.artifacts import ArtifactStore, human_bytes
from worker_client.agent.config import AgentConfig
from worker_client.agent.controlplane import (
    ControlPlane,
    ControlPlaneError,
    ControlPlaneUnreachable,
    Registration,
    TokenRejected,
)
from worker_client.agent.host import detect_gpu, ram
from worker_client.agent.keys import replica_digest
from worker_client.agent.logstore import LogStore
from worker_client.agent.ports import PortAllocator, can_bind
from worker_client.agent.service import WorkerControlService, start_server
from worker_client.agent.state import node_credential
from worker_client.agent.supervisor import RUNNING, Supervisor

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_INTERVAL = 10.0
FIRST_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 10.0
DRAIN_POLL_SECONDS = 0.5
SERVER_STOP_GRACE = 1.0
# Each control-plane call made while shutting down (drain, in-flight poll, deregister) waits at most this long:
# a control plane that does not answer must not hold the agent's shutdown.
SHUTDOWN_CALL_TIMEOUT = 3.0
# While files are being staged, progress goes to the control plane (and the replica's log) this often.
PROGRESS_INTERVAL = 1.0
PROGRESS_LOG_EVERY = 2  # progress reports per log line


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Agent:
    """One worker agent; `run()` returns the exit code once SIGTERM or SIGINT has been handled."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.logs = LogStore()
        self.registration: Registration | None = None
        self.artifacts = ArtifactStore(
            config.models_path,
            cache_size=config.models_cache_size,
            rate_limit=config.download_rate_limit,
            control_plane_url=config.register_to,
            node_token=self.node_token,
            node_id=lambda: self.registration.id if self.registration else "",
            note=self._note,
        )
        self.supervisor = Supervisor(
            backends=config.backends,
            bind_host=config.bind_host,
            advertise_host=config.advertise_host,
            ports=PortAllocator(config.port, functools.partial(can_bind, config.bind_host)),
            logs=self.logs,
            models_path=config.models_path,
            allowed_model_roots=config.allowed_model_roots,
            backend_token=lambda: self.registration.backend_token if self.registration else "",
            artifacts=self.artifacts,
            on_staged=self._staged,
        )
        self._reports: set[asyncio.Task[None]] = set()
        self.control_plane = ControlPlane(config.register_to, config.registration_token)
        self._has_gpu = detect_gpu() is not None
        self._orphan_suspects: set[str] = set()
        # The digest of the replica set the control plane last accepted (answered `send_replicas: false`).
        self._listed_digest: str | None = None
        # Read (or made) before serving anything: a state directory that cannot be used stops the agent.
        self.credential = node_credential(config.state_dir, config.node_name)

    def node_token(self) -> str:
        """The token WorkerControl calls must present; empty (refusing everything) until registered."""
        return self.registration.node_token if self.registration else ""

    async def run(self) -> int:
        service = WorkerControlService(
            self.supervisor, self.logs, hosts_models=self.config.node_type == "backend"
        )
        address = f"{self.config.bind_host}:{self.config.port}"
        server = await start_server(address, service, self.node_token, self.config.tls)
        if self.config.tls is not None:
            mtls = " requiring client certificates" if self.config.tls.client_ca else ""
            log.info("WorkerControl listening on %s with TLS%s", address, mtls)
        elif _is_loopback(self.config.bind_host):
            log.info("WorkerControl listening on %s (plaintext, loopback)", address)
        else:
            log.warning(
                "WorkerControl listening on %s in plaintext: keep it on a private network or set "
                "--tls-cert and --tls-key",
                address,
            )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        life = asyncio.create_task(self._register_and_heartbeat())
        progress = asyncio.create_task(self._report_progress())
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({life, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (life, progress, stopping):
                task.cancel()
            await self._shutdown(server)
        if life.done() and not life.cancelled():
            life.result()  # re-raises what ended the registration and heartbeat loop
        return 0

    # --- registration and heartbeat ---

    async def _register_and_heartbeat(self) -> None:
        await self._register()
        while True:
            await asyncio.sleep(self._heartbeat_interval())
            await self._heartbeat()

    def _heartbeat_interval(self) -> float:
        from_server = self.registration.heartbeat_interval if self.registration else None
        return self.config.heartbeat_interval or from_server or DEFAULT_HEARTBEAT_INTERVAL

    async def _register(self) -> None:
        """Registers, retrying with exponential backoff until the control plane answers 2xx. Registering
        again while running first stops every backend: they hold the previous backend token, which the new
        registration replaces (the control plane drops their rows and places replicas again)."""
        if self.registration is not None and self.supervisor.replicas():
            log.warning(
                "stopping every backend before registering again: they hold the previous backend token"
            )
            await self.supervisor.stop_all()
        delay = FIRST_RETRY_DELAY
        while True:
            try:
                self.registration = await self.control_plane.register(self._registration_body())
            except ControlPlaneError as error:
                if error.status == 409:
                    log.error(
                        "node name %r is registered by another agent (a different credential); an admin "
                        "must delete that node first. Retrying in %.1f s",
                        self.config.node_name,
                        delay,
                    )
                else:
                    log.warning("registration failed (%s); retrying in %.1f s", error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY)
                continue
            self._orphan_suspects = set()
            self._listed_digest = None
            log.info("registered as node %s (%s)", self.registration.id, self.registration.status)
            return

    async def _heartbeat(self) -> None:
        """One heartbeat. While the replica set is the one the control plane last accepted in full, only its
        digest is sent (the control plane's cheapest path); an answer with `send_replicas` (its rows differ)
        makes the next heartbeat list every replica — at once when this one sent only the digest."""
        assert self.registration is not None
        for _attempt in range(2):
            body, sent_list = self._heartbeat_body()
            try:
                answer = await self.control_plane.heartbeat(self.registration, body)
            except TokenRejected as error:
                log.warning("heartbeat refused (%s); registering again", error)
                await self._register()
                return
            except ControlPlaneError as error:
                log.warning("heartbeat failed: %s", error)
                self._listed_digest = None
                return
            # An agent that answers without the field (an older control plane) keeps listing in full.
            accepted = answer.get("send_replicas", True) is False
            self._listed_digest = body["replica_digest"] if accepted else None
            if sent_list or accepted:
                break
        for key in self._confirmed_orphans(answer.get("orphans") or []):
            log.warning("%s: the control plane has no replica for it in two heartbeats; stopping it", key)
            await self.supervisor.stop(key)

    def _confirmed_orphans(self, listed: list[str]) -> list[str]:
        """Running keys the control plane called orphans in this answer and the one before."""
        confirmed = self._orphan_suspects.intersection(listed)
        self._orphan_suspects = set(listed)
        running = {replica.key for replica in self.supervisor.replicas() if replica.state == RUNNING}
        return sorted(confirmed & running)

    def _memory(self) -> dict[str, Any]:
        gpu = detect_gpu() if self._has_gpu else None
        total_ram, available_ram = ram()
        if gpu is not None:
            vram = {"total_vram": gpu.total, "available_vram": gpu.free, "gpu_vendor": gpu.vendor}
        else:
            total = self.config.vram or 0
            vram = {
                "total_vram": total,
                "available_vram": max(0, total - self.supervisor.vram_in_use()),
                "gpu_vendor": "",
            }
        return {**vram, "total_ram": total_ram, "available_ram": available_ram}

    def _registration_body(self) -> dict[str, Any]:
        proof = {"node_credential": self.credential}
        if self.registration is not None:
            proof["node_token"] = self.registration.node_token
        return {
            **proof,
            "name": self.config.node_name,
            "node_type": self.config.node_type,
            "address": self.config.advertise_addr,
            **self._memory(),
            "labels": self.config.labels,
            "max_replicas_per_model": self.config.max_replicas_per_model,
            "backends": sorted(self.config.backends),
            "replicas": [replica.key for replica in self.supervisor.replicas()],
        }

    def _heartbeat_body(self) -> tuple[dict[str, Any], bool]:
        """The heartbeat's body, and whether it lists the replicas (else it carries only their digest: the set
        is the one the control plane accepted last time)."""
        replicas = self.supervisor.replicas()
        digest = replica_digest(r.key for r in replicas)
        body: dict[str, Any] = {
            **self._memory(),
            "artifacts": self.artifacts.held(),
            "replica_digest": digest,
        }
        if digest == self._listed_digest:
            return body, False
        body["replicas"] = [{"key": r.key, "address": r.address, "state": r.state} for r in replicas]
        return body, True

    # --- staging progress ---

    def _note(self, key: str, text: str) -> None:
        """A staging message: in the replica's own log (`model#i`) when it is for one, and in the agent's."""
        if key:
            self.logs.append(key, "stdout", text)
        log.info("%s%s", f"{key}: " if key else "", text)

    def _staged(self, key: str) -> None:
        """The replica's files are in place: tell the control plane at once that it is loading now."""
        task = asyncio.create_task(self._send_progress([{"key": key, "state": "loading"}]))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _send_progress(self, replicas: list[dict[str, Any]]) -> None:
        if self.registration is None:
            return
        try:
            await self.control_plane.downloads(self.registration, {"replicas": replicas})
        except ControlPlaneError as error:
            log.warning("progress report failed: %s", error)

    async def _report_progress(self) -> None:
        """Every `PROGRESS_INTERVAL` while files are staged for replicas: bytes done/total and rate per
        replica to the control plane (`POST /api/node/{id}/downloads`); every few reports, a line in the
        replica's log. Survives every failure."""
        ticks = 0
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL)
            try:
                keys = sorted(self.artifacts.waiting)
                if not keys:
                    continue
                ticks += 1
                reports = []
                for key in keys:
                    done, total, rate = self.artifacts.progress(key)
                    reports.append(
                        {"key": key, "state": "downloading", "bytes": done, "total": total, "rate": rate}
                    )
                    if ticks % PROGRESS_LOG_EVERY == 0:
                        share = f" ({100 * done / total:.0f}%)" if total else ""
                        self.logs.append(
                            key,
                            "stdout",
                            f"[agent] downloading: {human_bytes(done)} of {human_bytes(total)}{share}, "
                            f"{human_bytes(rate)}/s",
                        )
                await self._send_progress(reports)
            except Exception:
                log.exception("progress report failed")

    # --- shutdown ---

    async def _shutdown(self, server: grpc.aio.Server) -> None:
        """Drain (bounded), stop serving, stop every backend, deregister.

        The in-flight count lives in the control plane's database: the agent cannot see the requests routed to
        its backends. So when the control plane cannot be reached, nothing can stop new requests from being
        routed here nor tell when the running ones end: the agent does not wait (its backends still get their
        SIGTERM grace period to finish what they are doing) and tries to deregister once, briefly."""
        if self.registration is not None:
            await self._drain(self.registration)
        await server.stop(SERVER_STOP_GRACE)
        await self.supervisor.stop_all()
        if self.registration is not None:
            try:
                await self.control_plane.deregister(self.registration, timeout=SHUTDOWN_CALL_TIMEOUT)
            except ControlPlaneError as error:
                log.warning("deregister failed (%s); the control plane will mark this node offline", error)
            else:
                log.info("deregistered node %s", self.registration.id)
        await self.control_plane.aclose()

    async def _drain(self, node: Registration) -> None:
        """Asks the control plane to drain this node and waits until its in-flight count is 0, at most
        `drain_timeout`; returns at once when the control plane cannot be reached."""
        try:
            await self.control_plane.drain(node, timeout=SHUTDOWN_CALL_TIMEOUT)
        except (ControlPlaneUnreachable, TokenRejected) as error:
            log.warning("drain failed (%s); not waiting for in-flight requests", error)
            return
        except ControlPlaneError as error:
            log.warning("drain failed: %s", error)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout
        while loop.time() < deadline:
            try:
                if await self.control_plane.in_flight(node, timeout=SHUTDOWN_CALL_TIMEOUT) == 0:
                    log.info("drained: no request in flight")
                    return
            except (ControlPlaneUnreachable, TokenRejected) as error:
                log.warning("cannot read in-flight count (%s); not waiting any longer", error)
                return
            except ControlPlaneError as error:
                log.warning("cannot read in-flight count: %s", error)
            await asyncio.sleep(min(DRAIN_POLL_SECONDS, max(0.0, deadline - loop.time())))
        log.warning(
            "in-flight requests did not finish within %g s; stopping anyway", self.config.drain_timeout
        )
