"""The gateway's decoding: ``--decode`` / ``--exif-orientation`` reach the crops sent to
Triton, and the worker pool is sized to the machine with its queue in the metrics."""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_array_equal  # imported at collection: its first import runs lscpu
from PIL import Image

from cliplora.core.errors import InvalidArgument
from cliplora.core.preprocess import Decoding, preprocess_bytes
from cliplora.loadtest.photos import jpeg_bytes, photo_like
from cliplora.serve.cli import add_arguments as add_serve_arguments
from cliplora.serve.gateway.decode_pool import DecodePool, available_cores, cpu_quota
from cliplora.serve.gateway.metrics import GatewayMetrics
from cliplora.serve.gateway.settings import GatewaySettings
from cliplora.v1 import classifier_pb2 as pb
from tests.fakes import FakeContext, FakeTriton, service

SIZE = 16  # FakeTriton's model: 4:3 images scale in the decoder from 2 x 3 x (21 x 16) = 126 x 96


def value(metrics: GatewayMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


async def crop_sent(data: bytes, **settings: object) -> np.ndarray:
    triton = FakeTriton()
    await service(triton, **settings).Classify(pb.ClassifyRequest(model="m", images=[pb.Image(encoded=data)]),
                                               FakeContext())
    return triton.batches[0][0]


@pytest.mark.parametrize("mode", ["exact", "fast"])
async def test_decode_setting_reaches_the_crop_sent_to_triton(mode: str) -> None:
    data = jpeg_bytes(photo_like(256, 192, seed=5))
    sent = await crop_sent(data, decode=mode)
    assert_array_equal(sent, preprocess_bytes(data, SIZE, decoding=Decoding(mode)))
    other = "fast" if mode == "exact" else "exact"
    assert not np.array_equal(sent, preprocess_bytes(data, SIZE, decoding=Decoding(other)))


async def test_orientation_setting_reaches_the_crop_sent_to_triton() -> None:
    data = jpeg_bytes(photo_like(60, 40, seed=6), orientation=6)
    applied, ignored = await crop_sent(data), await crop_sent(data, exif_orientation="ignore")
    assert_array_equal(applied, preprocess_bytes(data, SIZE, decoding=Decoding(orientation="apply")))
    assert_array_equal(ignored, preprocess_bytes(data, SIZE, decoding=Decoding(orientation="ignore")))
    assert not np.array_equal(applied, ignored)


def test_serve_flags_and_environment_set_decoding() -> None:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--decode", "exact", "--exif-orientation", "ignore", "--preprocess-workers", "3"])
    settings = GatewaySettings.from_sources(vars(args), environ={})
    assert settings.decoding == Decoding("exact", "ignore") and settings.pool_workers == 3
    from_env = GatewaySettings.from_sources({}, environ={"CLIPLORA_DECODE": "exact"})
    assert from_env.decoding.mode == "exact"
    assert GatewaySettings().decoding == Decoding()  # the defaults: fast, apply
    with pytest.raises(InvalidArgument, match="decode must be one of exact, fast, got 'slow'"):
        GatewaySettings.from_sources({"decode": "slow"}, environ={})
    with pytest.raises(InvalidArgument, match="preprocess_workers must not be negative"):
        GatewaySettings(preprocess_workers=-1)


def test_pool_is_sized_to_the_machine_by_default() -> None:
    assert GatewaySettings().pool_workers == available_cores() == min(len(os.sched_getaffinity(0)),
                                                                      cpu_quota() or 10**6)


@pytest.mark.parametrize("files,quota", [
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "150000 100000\n"}, 2),
    ({"cpu.max": "50000 100000\n"}, 1),
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cpu_quota_from_cgroup_files(tmp_path: Path, files: dict[str, str], quota: int | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_quota(tmp_path) == quota
    cores = len(os.sched_getaffinity(0))
    assert available_cores(tmp_path) == (cores if quota is None else min(cores, quota))


def test_pool_queue_busy_wait_and_cpu_are_metrics() -> None:
    metrics = GatewayMetrics()
    pool = DecodePool(1, metrics)
    release = threading.Event()
    try:
        first = pool.submit(release.wait, 10)
        queued = [pool.submit(sum, range(200_000)) for _ in range(3)]
        for _ in range(100):  # the single thread picks up the first task
            if value(metrics, "cliplora_gateway_preprocess_pool_busy") == 1:
                break
            threading.Event().wait(0.01)
        assert value(metrics, "cliplora_gateway_preprocess_pool_workers") == 1
        assert value(metrics, "cliplora_gateway_preprocess_pool_busy") == 1
        assert value(metrics, "cliplora_gateway_preprocess_pool_queued") == 3
        assert queued[2].cancel()  # a caller gave up before it started: it leaves the queue
        assert value(metrics, "cliplora_gateway_preprocess_pool_queued") == 2
        release.set()
        assert first.result(10) is True and [f.result(10) for f in queued[:2]] == [sum(range(200_000))] * 2
    finally:
        release.set()
        pool.shutdown(wait=True)
    assert value(metrics, "cliplora_gateway_preprocess_pool_queued") == 0
    assert value(metrics, "cliplora_gateway_preprocess_pool_busy") == 0
    assert value(metrics, "cliplora_gateway_preprocess_pool_wait_seconds_count") == 3
    assert value(metrics, "cliplora_gateway_preprocess_pool_cpu_seconds_total") > 0


def test_pool_refuses_after_shutdown_without_counting_a_queued_task() -> None:
    metrics = GatewayMetrics()
    pool = DecodePool(1, metrics)
    pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit(Image.new, "RGB", (1, 1))
    assert value(metrics, "cliplora_gateway_preprocess_pool_queued") == 0
