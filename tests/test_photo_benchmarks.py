"""The phone-photo benchmark tools: ``loadtest --images photos``, the decode gate's figures
and verdict, and the preprocessing rate read from a gateway's metrics."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import ExifTags, Image

from cliplora.loadtest import photos
from cliplora.loadtest.cli import load_images
from cliplora.loadtest.decode_gate import LOGIT_BOUND, Outputs, compare, photo_set, verdict
from cliplora.loadtest.decode_rate import rates, ratios, scrape
from cliplora.serve.gateway.metrics import GatewayMetrics


def describe(data: bytes) -> tuple[str, tuple[int, int], int | None]:
    image = Image.open(io.BytesIO(data))
    return image.format, image.size, image.getexif().get(ExifTags.Base.Orientation)


def test_loadtest_images_photos_are_phone_photos(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(photos, "PHONE_SIZE", (64, 48))  # the real 4032 x 3024 takes seconds to draw
    sent = load_images("photos", seed=0)
    assert [describe(d) for d in sent] == [("JPEG", (64, 48), None), ("JPEG", (48, 64), None),
                                            ("JPEG", (64, 48), 6), ("JPEG", (48, 64), 8)]
    assert {describe(d)[1] for d in load_images(None, seed=0)} == {(640, 480), (480, 640)}  # the default
    (tmp_path / "a.png").write_bytes(sent[0])
    assert load_images(str(tmp_path), seed=0) == [sent[0]]  # a folder


def test_gate_photo_sets_alternate_sizes_and_tags() -> None:
    assert [describe(d)[1:] for d in photo_set(40, 30, 4, seed=1)] == [((40, 30), None), ((30, 40), None),
                                                                      ((40, 30), 6), ((30, 40), 8)]


def outputs(logits: list[list[float]], crops: int = 0) -> Outputs:
    array = np.array(logits, dtype=np.float32)
    return Outputs(array, None, np.full((len(logits), 2, 2, 3), crops, np.uint8), [1.0] * len(logits))


def test_gate_figures_rescale_to_logit_scale_100_and_count_flips() -> None:
    exact = outputs([[1.0, 0.5, 0.0], [0.0, 0.2, 0.1]])
    fast = outputs([[1.0, 0.52, 0.0], [0.0, 0.08, 0.1]], crops=1)  # image 1: top-1 moves from class 1 to 2
    figures = compare(exact, fast, logit_scale=50.0)
    assert figures["max_abs_dlogit"] == pytest.approx(0.12)
    assert figures["max_abs_dlogit_at_100"] == pytest.approx(0.24)
    assert figures["top1_agreement"] == 0.5
    assert figures["min_top1_margin_at_100"] == pytest.approx(0.2)  # 0.1 at scale 50
    assert figures["max_abs_dpixel"] == 1 and figures["identical_crops"] == 0


def test_gate_verdict_needs_every_top1_and_the_logit_bound() -> None:
    def sets(delta: float, agreement: float) -> dict:
        return {"a": {"gaps": {"3": {"max_abs_dlogit_at_100": 0.0, "top1_agreement": 1.0}}},
                "b": {"gaps": {"3": {"max_abs_dlogit_at_100": delta, "top1_agreement": agreement}}}}

    assert verdict(sets(LOGIT_BOUND, 1.0), [3.0])["3"]["fast_may_be_default"] is True
    assert verdict(sets(LOGIT_BOUND * 1.01, 1.0), [3.0])["3"]["fast_may_be_default"] is False
    assert verdict(sets(0.0, 0.99), [3.0])["3"]["fast_may_be_default"] is False


def test_decode_rate_reads_a_gateways_metrics() -> None:
    metrics = GatewayMetrics()
    port = metrics.serve(0)
    try:
        metrics.pool_workers.set(1)
        url = f"http://127.0.0.1:{port}/metrics"
        before = scrape(url)
        for _ in range(4):
            metrics.preprocess.observe(0.05)
            metrics.pool_wait.observe(0.01)
        metrics.pool_cpu.inc(0.1)
        after = scrape(url)
    finally:
        metrics.close()
    figures = rates(before, after, window_s=2.0)
    assert figures["images"] == 4 and figures["workers"] == 1
    assert figures["mean_ms"] == 50.0 and figures["images_per_busy_worker_s"] == 20.0
    assert figures["images_per_cpu_s"] == 40.0 and figures["images_per_s"] == 2.0
    assert figures["mean_queue_wait_ms"] == 10.0
    slower = dict(figures, images_per_busy_worker_s=5.0, images_per_cpu_s=8.0, images_per_s=1.0)
    assert ratios({"exact": slower, "fast": figures}) == {
        "fast/exact": {"images_per_busy_worker_s": 4.0, "images_per_cpu_s": 5.0, "images_per_s": 2.0}}


def test_decode_rate_refuses_a_page_without_the_pool() -> None:
    from prometheus_client import CollectorRegistry, Counter, start_http_server

    registry = CollectorRegistry()
    Counter("something_total", "not a gateway", registry=registry)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        with pytest.raises(SystemExit, match="not a cliplora gateway"):
            scrape(f"http://127.0.0.1:{server.server_port}/metrics")
    finally:
        server.shutdown()
        server.server_close()
