"""Gateway access control: bearer tokens (health stays open), TLS and mutual TLS."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cliplora.core.client import client_channel
from cliplora.core.errors import InvalidArgument
from cliplora.serve.security import load_tokens, token_matches
from cliplora.serve.server import GatewayServer
from cliplora.serve.settings import GatewaySettings
from cliplora.v1 import classifier_pb2 as pb
from cliplora.v1 import classifier_pb2_grpc as pb_grpc
from tests.serving import free_port

TOKEN = "s3cret-token-0123456789"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=cliplora test CA", cwd=d)
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        extra = ["-extfile", "server.ext"] if name == "server" else []
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", *extra, cwd=d)
    return d


async def _gateway(**settings) -> GatewayServer:
    gateway = GatewayServer(GatewaySettings(grpc_port=0, metrics_port=-1, triton_url=f"127.0.0.1:{free_port()}",
                                            health_interval_s=0.2, **settings))
    await gateway.start()
    return gateway


async def _list_models(channel: grpc.aio.Channel, token: str | None = None) -> str:
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    try:
        await pb_grpc.ClassifierStub(channel).ListModels(pb.ListModelsRequest(), timeout=5, metadata=metadata)
        return "OK"
    except grpc.aio.AioRpcError as exc:
        return exc.code().name


def test_tokens_from_file_and_environment(tmp_path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# comment\n{TOKEN}\n\nanother-token-abcdefgh\n")
    tokens = load_tokens(path, {"CLIPLORA_AUTH_TOKENS": "env-token-0123456789, "})
    assert tokens == (b"env-token-0123456789", TOKEN.encode(), b"another-token-abcdefgh")
    assert token_matches(TOKEN.encode(), tokens) and not token_matches(b"s3cret-token-012345678", tokens)
    with pytest.raises(InvalidArgument, match="at least 16"):
        load_tokens(None, {"CLIPLORA_AUTH_TOKENS": "short"})
    assert load_tokens(None, {}) == ()


async def test_bearer_tokens_guard_everything_but_health(tmp_path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    gateway = await _gateway(auth_tokens_file=tokens)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            assert await _list_models(channel) == "UNAUTHENTICATED"
            assert await _list_models(channel, "wrong-token-0123456789") == "UNAUTHENTICATED"
            assert await _list_models(channel, TOKEN) == "OK"
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING  # reachable without a token
        assert gateway.metrics.unauthenticated._value.get() == 2
    finally:
        await gateway.stop(1)


async def test_tls_and_mutual_tls(pki: Path) -> None:
    gateway = await _gateway(tls_cert=pki / "server.pem", tls_key=pki / "server.key")
    target = f"127.0.0.1:{gateway.port}"
    try:
        async with client_channel(target, ca=pki / "ca.pem", aio=True) as channel:
            assert await _list_models(channel) == "OK"
        async with grpc.aio.insecure_channel(target) as channel:
            assert await _list_models(channel) == "UNAVAILABLE"  # plaintext is not spoken
    finally:
        await gateway.stop(1)

    gateway = await _gateway(tls_cert=pki / "server.pem", tls_key=pki / "server.key", tls_client_ca=pki / "ca.pem")
    target = f"127.0.0.1:{gateway.port}"
    try:
        async with client_channel(target, ca=pki / "ca.pem", aio=True) as channel:
            assert await _list_models(channel) == "UNAVAILABLE"  # no client certificate
        async with client_channel(target, ca=pki / "ca.pem", cert=pki / "client.pem", key=pki / "client.key",
                                  aio=True) as channel:
            assert await _list_models(channel) == "OK"
    finally:
        await gateway.stop(1)


def test_tls_settings_are_validated(pki: Path) -> None:
    with pytest.raises(InvalidArgument, match="both tls_cert and tls_key"):
        GatewaySettings(tls_cert=pki / "server.pem")
    with pytest.raises(InvalidArgument, match="mutual TLS"):
        GatewaySettings(tls_client_ca=pki / "ca.pem")


async def test_classify_cli_with_token_and_tls(pki: Path, tmp_path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    gateway = await _gateway(tls_cert=pki / "server.pem", tls_key=pki / "server.key", auth_tokens_file=tokens)
    image = tmp_path / "x.png"
    from tests import factories

    factories.make_image(20, 20).save(image)
    script = str(Path(sys.executable).with_name("cliplora"))
    base = [script, "classify", "--target", f"127.0.0.1:{gateway.port}", "--model", "absent",
            "--tls-ca", str(pki / "ca.pem"), str(image)]
    try:
        import asyncio

        denied = await asyncio.create_subprocess_exec(*base, stderr=asyncio.subprocess.PIPE)
        _, err = await denied.communicate()
        assert denied.returncode == 1 and b"UNAUTHENTICATED" in err
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN)
        allowed = await asyncio.create_subprocess_exec(*base[:2], "--token-file", str(token_file), *base[2:],
                                                       stderr=asyncio.subprocess.PIPE)
        _, err = await allowed.communicate()
        assert allowed.returncode == 1 and b"NOT_FOUND" in err  # past authentication; no such model
    finally:
        await gateway.stop(1)


def test_missing_token_file_is_not_found_before_any_call(tmp_path, capsys) -> None:
    from cliplora.cli import main

    image = tmp_path / "x.png"
    image.write_bytes(b"")
    code = main(["classify", "--target", "127.0.0.1:1", "--model", "m", "--token-file", str(tmp_path / "nope"),
                 str(image)])
    assert code == 1 and "NOT_FOUND: --token-file not found" in capsys.readouterr().err
