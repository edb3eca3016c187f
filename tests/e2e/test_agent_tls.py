"""TLS and mTLS on WorkerControl: a real agent started with certificates made in the test, real clients."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import pytest

from tests.conftest import agent_ready, wait_until
from tests.e2e.conftest import AgentProcess, FakeControlPlane
from tests.e2e.gateway_support import RealAgent, approve_when_registered
from tests.e2e.tls_support import CertificateAuthority, Issued
from tests.factories import ModelConfigFactory
from worker_client.client import AsyncWorkerControlClient, ChannelTls, WorkerControlClient
from worker_client.errors import WorkerError

pytestmark = pytest.mark.e2e


class Pki:
    """The cluster's CA, an impostor CA, and certificates for an agent on 127.0.0.1 and a control plane."""

    def __init__(self, directory: Path) -> None:
        self.ca = CertificateAuthority(directory, "cluster")
        self.other_ca = CertificateAuthority(directory, "impostor")
        self.agent = self.ca.issue("agent", hosts=("127.0.0.1", "localhost"))
        self.named_agent = self.ca.issue("named-agent", hosts=("agent.internal",))
        self.control_plane = self.ca.issue("control-plane", client=True)
        self.stranger = self.other_ca.issue("control-plane", client=True)

    def client_tls(
        self, ca: CertificateAuthority | None = None, client: Issued | None = None, **kw
    ) -> ChannelTls:
        return ChannelTls(
            (ca or self.ca).cert_pem,
            client.cert_pem if client else None,
            client.key_pem if client else None,
            **kw,
        )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def tls_flags(cert: Issued, client_ca: CertificateAuthority | None = None) -> list[str]:
    flags = ["--tls-cert", str(cert.cert), "--tls-key", str(cert.key)]
    return [*flags, "--tls-client-ca", str(client_ca.cert)] if client_ca else flags


def start_tls_agent(
    start_agent: Callable[..., AgentProcess], control_plane: FakeControlPlane, tls: ChannelTls, *flags: str
) -> AgentProcess:
    agent = start_agent(control_plane, *flags, wait=False)
    wait_until(lambda: control_plane.calls_to("/register"), timeout=30, message="registration")
    wait_until(lambda: client(agent, tls).health(), timeout=30, message="the agent's gRPC server over TLS")
    return agent


def client(agent: AgentProcess, tls: ChannelTls | None) -> WorkerControlClient:
    return WorkerControlClient(agent.address, agent.control_plane.node_token, 10, tls=tls)


def assert_refused(agent: AgentProcess, tls: ChannelTls | None) -> None:
    """The handshake fails: health is down and a call never reaches the service."""
    refused = client(agent, tls)
    assert not refused.health()
    with pytest.raises(WorkerError) as failure:
        refused.list_replicas()
    assert failure.value.code == grpc.StatusCode.UNAVAILABLE


def test_agent_with_tls_serves_load_health_and_list_and_refuses_plaintext_and_a_wrong_ca(
    pki: Pki, control_plane: FakeControlPlane, start_agent
) -> None:
    tls = pki.client_tls()
    agent = start_tls_agent(start_agent, control_plane, tls, *tls_flags(pki.agent))
    secure = client(agent, tls)
    loaded = secure.load_replica("m", 0, "echo", {"Model": "m"})
    assert [r.process_key for r in secure.list_replicas()] == ["m#0"] and loaded.pid

    async def list_async() -> list[str]:
        aclient = AsyncWorkerControlClient(agent.address, control_plane.node_token, 10, tls=tls)
        return [r.process_key for r in await aclient.list_replicas()]

    assert asyncio.run(list_async()) == ["m#0"]
    assert_refused(agent, None)  # plaintext
    assert_refused(agent, pki.client_tls(ca=pki.other_ca))  # the agent's certificate is not signed by it
    assert "with TLS" in agent.log()


def test_mtls_refuses_clients_without_a_certificate_of_the_cluster_ca(
    pki: Pki, control_plane: FakeControlPlane, start_agent
) -> None:
    tls = pki.client_tls(client=pki.control_plane)
    agent = start_tls_agent(start_agent, control_plane, tls, *tls_flags(pki.agent, client_ca=pki.ca))
    assert client(agent, tls).list_replicas() == []
    assert_refused(agent, pki.client_tls())  # no client certificate
    assert_refused(agent, pki.client_tls(client=pki.stranger))  # signed by another CA
    assert_refused(agent, None)


def test_the_certificate_must_name_the_address_dialed_unless_a_server_name_is_set(
    pki: Pki, control_plane: FakeControlPlane, start_agent
) -> None:
    named = pki.client_tls(server_name="agent.internal")
    agent = start_tls_agent(start_agent, control_plane, named, *tls_flags(pki.named_agent))
    assert client(agent, named).list_replicas() == []
    assert_refused(agent, pki.client_tls())  # dials 127.0.0.1, the certificate names agent.internal


@pytest.mark.django_db(transaction=True)
def test_control_plane_places_and_answers_through_an_mtls_agent(
    pki: Pki, cp_server, settings, tmp_path
) -> None:
    """The gateway's placement (LoadReplica), ListReplicas and health, through `nodes.agent_clients` with
    `LOCALAI_GRPC_TLS_*`."""
    from nodes.agent_clients import worker_control_client
    from nodes.tokens import node_token_for

    settings.LOCALAI_GRPC_TLS_CA = str(pki.ca.cert)
    settings.LOCALAI_GRPC_TLS_CLIENT_CERT = str(pki.control_plane.cert)
    settings.LOCALAI_GRPC_TLS_CLIENT_KEY = str(pki.control_plane.key)
    agent = RealAgent(
        cp_server,
        "tls-node",
        tmp_path / "tls-node.log",
        [*tls_flags(pki.agent, client_ca=pki.ca), "--vram", "8GiB"],
    )
    try:
        node = approve_when_registered(agent.name)
        agent_client = worker_control_client(node.address, node_token_for(node), 10)
        wait_until(lambda: agent_ready(agent_client), timeout=30, message="the agent over mTLS")
        ModelConfigFactory(name="secure-echo")
        body = {"model": "secure-echo", "messages": [{"role": "user", "content": "over tls"}]}
        answer = httpx.post(f"{cp_server.url}/v1/chat/completions", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == "echo: over tls"
        assert [r.process_key for r in agent_client.list_replicas()] == ["secure-echo#0"]
        # Without the control plane's certificate the same agent refuses the call.
        settings.LOCALAI_GRPC_TLS_CLIENT_CERT = settings.LOCALAI_GRPC_TLS_CLIENT_KEY = ""
        assert not worker_control_client(node.address, node_token_for(node), 10).health()
    finally:
        agent.stop()
