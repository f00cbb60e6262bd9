"""`cliplora serve`: its flags and its entry point.

Without ``--triton-url`` (or ``CLIPLORA_TRITON_URL``) it runs the local stack
(`cliplora.serve.stack`): a supervised Triton and Prometheus with the gateway in front.
With one it runs the gateway alone (`cliplora.serve.gateway.server.run_gateway`), as the
gateway image does.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import astuple
from pathlib import Path

from cliplora.core.repository import DEFAULT_REPOSITORY
from cliplora.serve.gateway.settings import DEFAULT_HTTP_PORT, ENV_PREFIX, GatewaySettings
from cliplora.serve.gateway.settings import add_arguments as add_gateway_arguments
from cliplora.serve.stack.prometheus import DEFAULT_PORT as PROMETHEUS_PORT
from cliplora.serve.stack.supervisor import ReadinessProbe, RestartPolicy
from cliplora.serve.stack.triton_launcher import TritonPorts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", default=str(DEFAULT_REPOSITORY))
    parser.add_argument("--grpc-port", type=int, default=GatewaySettings.grpc_port)
    parser.add_argument("--metrics-port", type=int, default=GatewaySettings.metrics_port)
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT,
                        help="the HTTP door: REST, OpenAI-compatible /v1/embeddings and the playground page at / "
                             f"(default {DEFAULT_HTTP_PORT}; 0: off)")
    parser.add_argument("--triton-url", help="HOST:PORT of an existing Triton (gRPC); then only the gateway starts")
    parser.add_argument("--host", default=None, help=f"gateway bind address (default {GatewaySettings.host})")
    parser.add_argument("--log-dir", default="logs", help="Triton and Prometheus logs (default logs/)")
    triton_ports = ",".join(str(port) for port in astuple(TritonPorts()))
    parser.add_argument("--triton-ports", default=triton_ports, metavar="HTTP,GRPC,METRICS",
                        help=f"ports of the local Triton (default {triton_ports})")
    parser.add_argument("--prometheus-port", type=int, default=PROMETHEUS_PORT,
                        help=f"local Prometheus port (default {PROMETHEUS_PORT})")
    parser.add_argument("--max-restarts", type=int, default=RestartPolicy.max_restarts,
                        help="restarts of the local Triton or Prometheus allowed within --restart-window-s; one "
                             "more failure stops the stack with a non-zero status "
                             f"(default {RestartPolicy.max_restarts})")
    parser.add_argument("--restart-window-s", type=float, default=RestartPolicy.window_s,
                        help=f"the window of --max-restarts, in seconds (default {RestartPolicy.window_s:g})")
    parser.add_argument("--triton-hang-s", type=float, default=ReadinessProbe.hang_s,
                        help="the local Triton is hung, killed and restarted, after this long without an answer "
                             f"to its readiness probe; 0: never (default {ReadinessProbe.hang_s:g})")
    add_gateway_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Every setting is parsed and checked here, before anything starts."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flags = {k: v for k, v in vars(args).items() if v is not None}
    flags["repository"] = Path(args.repository)
    settings = GatewaySettings.from_sources(flags)
    policy = RestartPolicy(max_restarts=args.max_restarts, window_s=args.restart_window_s)
    probe = ReadinessProbe(interval_s=settings.health_interval_s, timeout_s=settings.health_timeout_s,
                           hang_s=args.triton_hang_s)
    ports = TritonPorts.parse(args.triton_ports)
    # An existing Triton, named by flag or by CLIPLORA_TRITON_URL, means: the gateway only.
    if args.triton_url is not None or os.environ.get(f"{ENV_PREFIX}TRITON_URL"):
        from cliplora.serve.gateway.server import run_gateway

        run_gateway(settings)
    else:
        from cliplora.serve.stack.run import run_stack

        run_stack(settings, Path(args.repository), Path(args.log_dir), triton_ports=ports,
                  prometheus_port=args.prometheus_port, restart_policy=policy, triton_probe=probe)
    return 0
