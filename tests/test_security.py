"""Gateway access control: bearer tokens (health stays open), TLS and mutual TLS."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cliplora.core.client import client_channel
from cliplora.core.errors import InvalidArgument
from cliplora.serve.gateway.security import load_tokens, token_matches
from cliplora.serve.gateway.server import GatewayServer
from cliplora.serve.gateway.settings import GatewaySettings
from cliplora.serve.stack.triton_launcher import LocalTriton
from cliplora.v1 import classifier_pb2 as pb
from cliplora.v1 import classifier_pb2_grpc as pb_grpc
from tests.serving import CLASSES, free_port, in_process_gateway

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


@pytest.mark.subprocess
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
        # Past authentication: the lookup itself answers (this gateway's Triton is down, by design).
        assert allowed.returncode == 1 and b"UNAVAILABLE: Triton is unavailable, so model 'absent'" in err, err
    finally:
        await gateway.stop(1)


def test_missing_token_file_is_not_found_before_any_call(tmp_path, capsys) -> None:
    from cliplora.cli import main

    image = tmp_path / "x.png"
    image.write_bytes(b"")
    code = main(["classify", "--target", "127.0.0.1:1", "--model", "m", "--token-file", str(tmp_path / "nope"),
                 str(image)])
    assert code == 1 and "NOT_FOUND: --token-file not found" in capsys.readouterr().err


# `cliplora evaluate --target` through a gateway that wants a token and/or TLS, in front of a
# real Triton serving the tiny models.

EVALUATED = ("base", "lora")


@pytest.fixture(scope="module")
def triton(tiny_triton: LocalTriton) -> LocalTriton:
    """The session's tritonserver on the tiny `base` and `lora`."""
    return tiny_triton


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory, tiny_repository: Path) -> tuple[Path, dict[str, dict]]:
    """A labelled folder (one sub-folder per class of the models) and what in-process evaluation
    of each model on it gives: the figures the gateway must reproduce."""
    from cliplora.core.datasets import read_labelled_images
    from cliplora.evaluate import evaluate_model
    from tests import factories

    root = tmp_path_factory.mktemp("labelled")
    for i, label in enumerate(["cat", "cat", "dog", "tabby", "red_panda"]):
        assert label in CLASSES
        (root / label).mkdir(exist_ok=True)
        factories.make_image(48 + 8 * i, 40, seed=i).save(root / label / f"{i}.png")
    data = read_labelled_images(str(root))
    return root, {name: evaluate_model(data, name, repository=tiny_repository) for name in EVALUATED}


async def _evaluate_cli(data: Path, port: int, *flags: str) -> tuple[int, dict | None, str]:
    """`cliplora evaluate --target` of both models as a child process (CLIPLORA_TOKEN unset):
    exit status, the JSON it printed (None on failure), stderr."""
    env = {k: v for k, v in os.environ.items() if k != "CLIPLORA_TOKEN"}
    command = [str(Path(sys.executable).with_name("cliplora")), "evaluate", "--data", str(data),
               *(f"--name={name}" for name in EVALUATED), "--target", f"127.0.0.1:{port}", "--quiet", *flags]
    process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE, env=env)
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return process.returncode, json.loads(out) if process.returncode == 0 else None, err.decode()


def _assert_evaluated(result: dict | None, expected: dict[str, dict], port: int) -> None:
    """Every image of the folder went through the gateway, with the in-process figures."""
    assert result is not None and result["images"] == 5
    for name in EVALUATED:
        served = result["models"][name]
        assert served["via"] == f"gateway 127.0.0.1:{port}"
        assert {k: served[k] for k in ("images", "correct", "top1", "per_class")} == \
               {k: expected[name][k] for k in ("images", "correct", "top1", "per_class")}


async def _wait_serving_over_tls(port: int, pki: Path, *, mutual: bool, timeout_s: float = 30.0) -> None:
    """tests.serving waits over plaintext; a TLS gateway only answers health over TLS."""
    identity = {"cert": pki / "client.pem", "key": pki / "client.key"} if mutual else {}
    deadline = time.monotonic() + timeout_s
    async with client_channel(f"127.0.0.1:{port}", ca=pki / "ca.pem", aio=True, **identity) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service="cliplora.v1.Classifier"), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            assert time.monotonic() < deadline, f"TLS gateway on {port} not SERVING after {timeout_s:.0f} s"
            await asyncio.sleep(0.1)


async def test_evaluate_cli_with_a_bearer_token(triton: LocalTriton, tiny_repository: Path, labelled,
                                                tmp_path: Path) -> None:
    """With `--token-file` evaluate gets the in-process figures through the gateway; without the
    token, or with a wrong one, it exits 1 naming UNAUTHENTICATED."""
    data, expected = labelled
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    right, wrong = tmp_path / "token", tmp_path / "wrong-token"
    right.write_text(TOKEN)
    wrong.write_text("wrong-token-0123456789")
    async with in_process_gateway(triton.grpc_url, tiny_repository, metrics_port=-1,
                                  auth_tokens_file=tokens) as (gateway, _stub):
        code, result, err = await _evaluate_cli(data, gateway.port, "--token-file", str(right))
        assert code == 0, err
        _assert_evaluated(result, expected, gateway.port)
        for flags in ((), ("--token-file", str(wrong))):
            code, _, err = await _evaluate_cli(data, gateway.port, *flags)
            assert code == 1 and "cliplora evaluate: UNAUTHENTICATED" in err, (flags, err)


async def test_evaluate_cli_over_tls_and_mutual_tls(triton: LocalTriton, tiny_repository: Path, labelled,
                                                    pki: Path, tmp_path: Path) -> None:
    """`--tls-ca` (with the token the gateway also wants) evaluates over TLS, and without the token
    is UNAUTHENTICATED; behind mutual TLS, `--tls-cert/--tls-key` get through, the CA alone does not."""
    data, expected = labelled
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    token = tmp_path / "token"
    token.write_text(TOKEN)
    ca = ("--tls-ca", str(pki / "ca.pem"))
    server_identity = {"tls_cert": pki / "server.pem", "tls_key": pki / "server.key"}
    async with in_process_gateway(triton.grpc_url, tiny_repository, wait_serving=False, metrics_port=-1,
                                  auth_tokens_file=tokens, **server_identity) as (gateway, _stub):
        await _wait_serving_over_tls(gateway.port, pki, mutual=False)
        code, result, err = await _evaluate_cli(data, gateway.port, *ca, "--token-file", str(token))
        assert code == 0, err
        _assert_evaluated(result, expected, gateway.port)
        code, _, err = await _evaluate_cli(data, gateway.port, *ca)
        assert code == 1 and "cliplora evaluate: UNAUTHENTICATED" in err, err

    async with in_process_gateway(triton.grpc_url, tiny_repository, wait_serving=False, metrics_port=-1,
                                  tls_client_ca=pki / "ca.pem", **server_identity) as (gateway, _stub):
        await _wait_serving_over_tls(gateway.port, pki, mutual=True)
        code, result, err = await _evaluate_cli(data, gateway.port, *ca, "--tls-cert", str(pki / "client.pem"),
                                                "--tls-key", str(pki / "client.key"))
        assert code == 0, err
        _assert_evaluated(result, expected, gateway.port)
        code, _, err = await _evaluate_cli(data, gateway.port, *ca)  # no client certificate
        assert code == 1 and "cliplora evaluate: UNAVAILABLE" in err, err


def test_bearer_scheme_is_case_insensitive_and_whitespace_is_not_the_token() -> None:
    from cliplora.serve.gateway.security import bearer_token

    for header in (f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER {TOKEN}", f"  Bearer   {TOKEN}  ", f"bEaReR\t{TOKEN}"):
        assert bearer_token(header) == TOKEN.encode(), header
    for header in (f"Basic {TOKEN}", f"Bearer{TOKEN}", "Bearer", "Bearer   ", "", None, b"Bearer x"):
        assert bearer_token(header) == b"", header


async def test_bearer_scheme_in_any_case_over_grpc(tmp_path) -> None:
    """RFC 7235: the scheme is case-insensitive; spaces around the value are not the token."""
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    gateway = await _gateway(auth_tokens_file=tokens)

    async def list_models(value: str) -> str:
        try:
            await pb_grpc.ClassifierStub(channel).ListModels(pb.ListModelsRequest(), timeout=5,
                                                             metadata=(("authorization", value),))
            return "OK"
        except grpc.aio.AioRpcError as exc:
            return exc.code().name

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            for value in (f"bearer {TOKEN}", f"BEARER {TOKEN}", f"Bearer  {TOKEN} ", f" Bearer {TOKEN}"):
                assert await list_models(value) == "OK", value
            for value in (f"Basic {TOKEN}", f"Bearer{TOKEN}", f"bearer {TOKEN}x"):
                assert await list_models(value) == "UNAUTHENTICATED", value
    finally:
        await gateway.stop(1)


async def test_the_http_door_speaks_the_same_tls_and_tokens(pki: Path, tmp_path) -> None:
    """The HTTP door takes gRPC's TLS files and tokens: https only, a client certificate when
    mutual, the token on /v1/ (health open)."""
    import ssl

    import aiohttp

    trusted = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    with_cert = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    with_cert.load_cert_chain(pki / "client.pem", pki / "client.key")

    async def get(url: str, context: ssl.SSLContext | bool, token: str | None = None) -> int | str:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            async with aiohttp.ClientSession() as session, session.get(url, ssl=context, headers=headers) as answer:
                return answer.status
        except aiohttp.ClientError as exc:
            return type(exc).__name__

    http_port = free_port()
    gateway = await _gateway(tls_cert=pki / "server.pem", tls_key=pki / "server.key", http_port=http_port)
    try:
        assert await get(f"https://127.0.0.1:{http_port}/healthz", trusted) == 200
        assert await get(f"https://127.0.0.1:{http_port}/healthz", ssl.create_default_context()) != 200  # unknown CA
        assert await get(f"http://127.0.0.1:{http_port}/healthz", False) != 200  # plaintext is not spoken
    finally:
        await gateway.stop(1)

    os.environ["CLIPLORA_AUTH_TOKENS"] = TOKEN
    try:
        gateway = await _gateway(tls_cert=pki / "server.pem", tls_key=pki / "server.key",
                                 tls_client_ca=pki / "ca.pem", http_port=http_port)
    finally:
        del os.environ["CLIPLORA_AUTH_TOKENS"]
    try:
        assert await get(f"https://127.0.0.1:{http_port}/healthz", trusted) != 200  # no client certificate
        assert await get(f"https://127.0.0.1:{http_port}/healthz", with_cert) == 200
        assert await get(f"https://127.0.0.1:{http_port}/v1/models", with_cert) == 401
        assert await get(f"https://127.0.0.1:{http_port}/v1/models", with_cert, TOKEN) == 200  # (an empty list)
    finally:
        await gateway.stop(1)
