"""The playground (`GET /` of the HTTP door) in a real headless Chromium, against a real
tritonserver and the gateway in this process: what the page shows equals what gRPC's
Classify answers for the same image bytes (labels, order, and the scores and logits exactly,
from the rows' data attributes, and as printed), for a plain classifier, an open-vocabulary
model with typed labels and a bank's adapter; its bearer token, latency and version; and
its errors, shown as the door words them.

Chromium and chromedriver are Debian's (`make browser`; tests/tools.py: skipped where missing,
failed under `make test`). The browser runs in a thread (Selenium blocks), the gateway on
this test's event loop. A screenshot of each run goes to test-artifacts/ at the repository's
root (docs/images/playground.png is one of them).
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import grpc
import psutil
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from cliplora.export.bank_create import BankOptions, create_bank
from cliplora.export.bank_update import AdapterSpec, add_adapters
from cliplora.export.pipeline import ExportOptions, run_export
from cliplora.serve.stack.child_guard import guarded
from cliplora.serve.stack.triton_launcher import LocalTriton
from cliplora.v1 import classifier_pb2 as pb
from tests import factories, leftovers, tools
from tests.ports import free_port
from tests.serving import CLASSES, in_process_gateway, smooth_png, triton_ports

T = TypeVar("T")
pytestmark = [pytest.mark.triton, pytest.mark.subprocess]  # tritonserver; chromedriver and Chromium

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
TOKEN = "playground-test-token-0123456789"
BANK_CLASSES = ["apple", "pear", "plum"]  # none of CLASSES: a dropped adapter cannot pass
TYPED_LABELS = "wolf, snow leopard\na very small teapot,, cat\n"  # as a user types them
LABELS = ["wolf", "snow leopard", "a very small teapot", "cat"]  # what the page must send
NOT_AN_IMAGE = b"\x00garbage\xff" * 10
DRIVER_GRACE_S = 5.0  # chromedriver's time to close Chromium when stopped, before the guard kills the rest
WAIT_S = 30.0  # a loaded 2-core machine: Triton, the gateway, Chromium and other sessions


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, tiny_config: Path) -> Path:
    """`plain` (no adapter, no open vocabulary), `ov` (a LoRA, --open-vocabulary) and the bank
    `bank` (the base with CLASSES, adapter `acme` with BANK_CLASSES): a few seconds of export."""
    root = tmp_path_factory.mktemp("playground")
    repo = root / "repo"
    classes = factories.write_classes(root / "classes.txt", CLASSES)
    lora = factories.write_paper_checkpoint(root / "lora.pt", encoder="both", position="all", params=("q", "v"))
    common = dict(model=str(tiny_config), pretrained=None, classes=classes, templates=("a photo of a {}.",),
                  repository=repo, allow_random_weights=True, probes=1)
    run_export(ExportOptions(lora="none", name="plain", **common))
    run_export(ExportOptions(lora=str(lora), name="ov", open_vocabulary=True, **common))
    create_bank(BankOptions(name="bank", model=str(tiny_config), pretrained=None, allow_random_weights=True,
                            repository=repo, classes=classes, probes=1))
    acme = factories.write_paper_checkpoint(root / "acme.pt", encoder="vision", position="all", seed=3)
    add_adapters(repo, "bank", [AdapterSpec("acme", str(acme), factories.write_classes(root / "acme.txt", BANK_CLASSES))],
                 probes=1)
    return repo


@pytest.fixture(scope="module")
def triton(repository: Path) -> Iterator[LocalTriton]:
    with LocalTriton(repository, ports=triton_ports(), poll_seconds=1) as server:
        yield server


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("playground-images") / "gradient.png"
    path.write_bytes(smooth_png(160, 120, seed=3))
    return path


@pytest.fixture(scope="module")
def browser() -> tuple[str, str]:
    """Chromium and chromedriver, looked for before anything is exported or started."""
    return tools.require("chromium", tools.BROWSER_INSTALL), tools.require("chromedriver", tools.BROWSER_INSTALL)


@contextmanager
def chromium(browser: tuple[str, str], width: int = 1200, height: int = 1000) -> Iterator[WebDriver]:
    """Headless Chromium through chromedriver (its port from tests/ports.py). On the way out,
    whatever happened, the browser quits and nothing it started may still run: neither the
    processes under chromedriver when it quits (Chromium's renderers and helpers drop the
    environment) nor any carrying this browser's own marker (tests/leftovers.py)."""
    browser_path, driver_path = browser
    marker = os.urandom(8).hex()
    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    folder = Path(tempfile.mkdtemp(prefix="cliplora-chromedriver-"))
    service = Service(str(guarded_driver(driver_path, folder)), port=free_port(),
                      env={**os.environ, leftovers.CASE_VARIABLE: marker})
    driver: WebDriver | None = None
    try:
        driver = webdriver.Chrome(service=service, options=options)
        yield driver
    finally:
        process = getattr(service, "process", None)  # set once chromedriver was started
        started = _tree(process.pid) if process is not None else []
        if driver is not None:
            driver.quit()
        service.stop()
        left = list({p.pid: p for p in _running(started, timeout_s=10)
                     + leftovers.still_running(leftovers.CASE_VARIABLE, marker, 1)}.values())
        shutil.rmtree(folder, ignore_errors=True)
        if left:
            report = leftovers.describe(left)
            leftovers.kill(left)
            raise AssertionError(f"Chromium or chromedriver still running after quit:\n{report}")


def guarded_driver(driver_path: str, folder: Path) -> Path:
    """A script that runs chromedriver under the product's child guard
    (serve/stack/child_guard.py, whose parent is this pytest process): should pytest die,
    even by SIGKILL, the guard kills chromedriver and every Chromium process under it.
    Selenium starts it as it would chromedriver (its flags follow)."""
    script = folder / "chromedriver"
    command = " ".join(shlex.quote(part) for part in guarded([driver_path], DRIVER_GRACE_S))
    script.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
    script.chmod(0o755)
    return script


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _running(processes: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Those of `processes` still running (zombies count as gone) after up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = []
        for process in processes:
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(process)
            except psutil.NoSuchProcess:
                continue
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


# -- what the page shows ------------------------------------------------------------------


def wait(driver: WebDriver, condition: Callable[[WebDriver], T], what: str) -> T:
    """`condition`'s first truthy value within WAIT_S; a timeout names `what`."""
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(condition, f"the page: {what}")


def models_listed(driver: WebDriver) -> list[str]:
    """The model select's values, once it is filled (enabled)."""
    select = driver.find_element(By.ID, "model")
    wait(driver, lambda d: select.is_enabled(), "the model list is filled")
    return [option.get_attribute("value") for option in Select(select).options]


def classify(driver: WebDriver) -> str:
    """Click Classify and wait for its answer; returns the output's state (done | error)."""
    output = driver.find_element(By.ID, "output")
    before = int(output.get_attribute("data-request"))
    driver.find_element(By.ID, "classify").click()
    wait(driver, lambda d: int(output.get_attribute("data-request")) == before + 1
         and output.get_attribute("data-state") in ("done", "error"), "Classify answered")
    return output.get_attribute("data-state")


DROP = """
const [b64, name, zone] = arguments;
const file = new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], name, {type: "image/png"});
const data = new DataTransfer();
data.items.add(file);
for (const type of ["dragenter", "dragover", "drop"]) {
  zone.dispatchEvent(new DragEvent(type, {dataTransfer: data, bubbles: true, cancelable: true}));
}
"""


def drop(driver: WebDriver, path: Path) -> None:
    """Drop the file on the drop zone as a drag from the desktop would (the drag events a
    browser fires, carrying the file; WebDriver cannot drag from outside the page)."""
    driver.execute_script(DROP, base64.b64encode(path.read_bytes()).decode(), path.name,
                          driver.find_element(By.ID, "drop"))


def shown(driver: WebDriver) -> list[dict[str, str | float]]:
    """Each result row: its data attributes, its printed score and logit, and how much of its
    track its bar fills."""
    rows = []
    for row in driver.find_elements(By.CSS_SELECTOR, "#results .result-row"):
        fill, track = (row.find_element(By.CLASS_NAME, name).rect["width"] for name in ("bar-fill", "bar"))
        rows.append({"label": row.get_attribute("data-label"), "score": row.get_attribute("data-score"),
                     "logit": row.get_attribute("data-logit"), "bar": fill / track,
                     "score_text": row.find_element(By.CLASS_NAME, "result-score").text,
                     "logit_text": row.find_element(By.CLASS_NAME, "result-logit").text})
    return rows


def assert_shows(driver: WebDriver, reply: pb.ClassifyResponse) -> None:
    """The page's rows are gRPC's answer: labels in its order, scores and logits exactly (the
    JSON numbers JavaScript kept), printed as 12.34% and `logit 1.234`, bars as long as the scores."""
    expected = list(reply.results[0].predictions)
    rows = shown(driver)
    assert [r["label"] for r in rows] == [p.label for p in expected]
    assert [(float(r["score"]), float(r["logit"])) for r in rows] == [(p.score, p.logit) for p in expected]
    assert [(r["score_text"], r["logit_text"]) for r in rows] == [
        (f"{p.score * 100:.2f}%", f"logit {p.logit:.3f}") for p in expected]
    for row, prediction in zip(rows, expected, strict=True):  # the bar is the score (to a pixel of a ~290 px track)
        assert abs(row["bar"] - prediction.score) < 0.01, (row["label"], row["bar"], prediction.score)
    assert driver.find_element(By.ID, "error").is_displayed() is False


def answered(driver: WebDriver, version: str) -> None:
    """The latency the page measured, and the version header."""
    assert re.fullmatch(r"latency \d+\.\d ms \(measured in this page\)", driver.find_element(By.ID, "latency").text)
    assert version in driver.find_element(By.ID, "version").text


def browser_log(driver: WebDriver) -> list[dict]:
    """The console's entries since the last call (Chromium hands each out once)."""
    return driver.get_log("browser")


def console_errors(driver: WebDriver) -> list[str]:
    """What the page logged as errors since the last look, but the door's refusals (each
    failed request is logged as a network error; the page shows them itself): a
    Content-Security-Policy refusal, a script error."""
    return [entry["message"] for entry in browser_log(driver)
            if entry["level"] == "SEVERE" and entry["source"] != "network"]


def screenshot(driver: WebDriver, name: str, top: bool = True) -> Path:
    """The viewport, scrolled to the page's top unless `top` is False, into test-artifacts/."""
    if top:
        driver.execute_script("window.scrollTo(0, 0)")
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    assert driver.save_screenshot(str(path)), f"no screenshot written to {path}"
    print(f"playground screenshot: {path}")
    return path


# -- the tests ------------------------------------------------------------------------------


def _differ(*replies: pb.ClassifyResponse) -> None:
    """The answers compared against are not trivially alike: each ranks distinct scores and
    each has labels of its own."""
    for reply in replies:
        scores = [p.score for p in reply.results[0].predictions]
        assert len(set(scores)) == len(scores) > 1, scores
    assert len({tuple(p.label for p in r.results[0].predictions) for r in replies}) == len(replies)


async def test_the_page_answers_as_grpc_does(browser: tuple[str, str], triton: LocalTriton, image: Path,
                                             tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(TOKEN + "\n")
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    async with in_process_gateway(triton.grpc_url, http_port=free_port(), auth_tokens_file=tokens) as (gateway, stub):
        one = [pb.Image(encoded=image.read_bytes())]
        expected = {
            "plain": await stub.Classify(pb.ClassifyRequest(model="plain", images=one, top_k=5), metadata=metadata),
            "ov": await stub.Classify(pb.ClassifyRequest(model="ov", images=one, top_k=5, labels=LABELS),
                                      metadata=metadata),
            "acme": await stub.Classify(pb.ClassifyRequest(model="bank", adapter="acme", images=one, top_k=5),
                                        metadata=metadata),
        }
        _differ(*expected.values())
        assert [p.label for p in expected["ov"].results[0].predictions] != LABELS  # the order is the model's
        url = f"http://127.0.0.1:{gateway.http_port}/"
        await asyncio.to_thread(_drive_answers, browser, url, image, expected)


def _drive_answers(browser: tuple[str, str], url: str, image: Path, expected: dict[str, pb.ClassifyResponse]) -> None:
    with chromium(browser) as driver:
        driver.get(url)
        for control in ("model", "adapter", "file", "labels", "token"):  # each control is named by a label
            assert driver.find_elements(By.CSS_SELECTOR, f"label[for='{control}']"), control

        # Tokens are on: the model list is refused until the token is typed (kept for the tab).
        error = driver.find_element(By.ID, "error")
        wait(driver, lambda d: error.is_displayed(), "the refused model list")
        assert error.text.startswith("UNAUTHENTICATED: "), error.text
        assert [e for e in browser_log(driver) if e["source"] != "network"] == []  # its 401 is logged
        driver.find_element(By.ID, "token").send_keys(TOKEN, Keys.TAB)
        assert models_listed(driver) == ["bank", "ov", "plain"]
        assert not error.is_displayed()

        # A classifier without open vocabulary: its own classes, labels not offered.
        Select(driver.find_element(By.ID, "model")).select_by_value("plain")
        assert not driver.find_element(By.ID, "labels").is_enabled()
        assert not driver.find_element(By.ID, "adapter").is_displayed()
        driver.find_element(By.ID, "file").send_keys(str(image))
        preview = driver.find_element(By.ID, "preview")
        wait(driver, lambda d: preview.is_displayed() and d.execute_script("return arguments[0].naturalWidth", preview) == 160,
             "the preview of the chosen image")
        assert classify(driver) == "done", driver.find_element(By.ID, "error").text
        assert_shows(driver, expected["plain"])
        answered(driver, "version 1")

        # Open vocabulary: the typed labels, split on commas and newlines, blanks dropped.
        Select(driver.find_element(By.ID, "model")).select_by_value("ov")
        labels = driver.find_element(By.ID, "labels")
        assert labels.is_enabled()
        labels.send_keys(TYPED_LABELS)
        assert classify(driver) == "done", driver.find_element(By.ID, "error").text
        assert_shows(driver, expected["ov"])
        answered(driver, "version 1")
        screenshot(driver, "playground.png")

        # A bank: its adapters, base first; the chosen one answers with its own classes.
        Select(driver.find_element(By.ID, "model")).select_by_value("bank")
        adapter = Select(driver.find_element(By.ID, "adapter"))
        assert driver.find_element(By.ID, "adapter").is_displayed()
        assert [o.get_attribute("value") for o in adapter.options] == ["base", "acme"]
        assert not driver.find_element(By.ID, "labels").is_enabled()
        adapter.select_by_value("acme")
        assert classify(driver) == "done", driver.find_element(By.ID, "error").text
        assert_shows(driver, expected["acme"])
        answered(driver, "adapter acme")

        # The token stays for the tab: a reload lists the models without asking again.
        driver.refresh()
        assert models_listed(driver) == ["bank", "ov", "plain"]
        assert not driver.find_element(By.ID, "error").is_displayed()
        assert console_errors(driver) == []


async def test_errors_show_as_the_door_words_them_at_phone_width(browser: tuple[str, str], triton: LocalTriton,
                                                               image: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "not-an-image.png"
    garbage.write_bytes(NOT_AN_IMAGE)
    async with in_process_gateway(triton.grpc_url, http_port=free_port()) as (gateway, stub):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Classify(pb.ClassifyRequest(model="plain", images=[pb.Image(encoded=NOT_AN_IMAGE)], top_k=5))
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        plain = await stub.Classify(pb.ClassifyRequest(model="plain", images=[pb.Image(encoded=image.read_bytes())],
                                                       top_k=5))
        url = f"http://127.0.0.1:{gateway.http_port}/"
        await asyncio.to_thread(_drive_errors, browser, url, image, garbage, refused.value.details(), plain)


def _drive_errors(browser: tuple[str, str], url: str, image: Path, garbage: Path, refusal: str,
                  plain: pb.ClassifyResponse) -> None:
    with chromium(browser) as driver:
        # A phone's viewport (the window cannot be made that narrow): nothing scrolls sideways.
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": 360, "height": 780, "deviceScaleFactor": 2, "mobile": True})
        driver.get(url)
        assert models_listed(driver) == ["bank", "ov", "plain"]
        error = driver.find_element(By.ID, "error")

        # No image chosen yet: the page says so itself.
        Select(driver.find_element(By.ID, "model")).select_by_value("plain")
        assert classify(driver) == "error"
        assert error.text.startswith("Choose an image first")

        # Labels typed for `ov` are not sent once a model without open vocabulary is chosen:
        # the plain model's own classes answer, for an image dropped on the zone.
        Select(driver.find_element(By.ID, "model")).select_by_value("ov")
        driver.find_element(By.ID, "labels").send_keys(TYPED_LABELS)
        Select(driver.find_element(By.ID, "model")).select_by_value("plain")
        drop(driver, image)
        assert driver.find_element(By.ID, "file-name").text.startswith(image.name)
        assert classify(driver) == "done", error.text
        assert_shows(driver, plain)
        width = driver.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1] == 360, width
        for row in driver.find_elements(By.CSS_SELECTOR, "#results .result-row"):
            assert row.rect["x"] >= 0 and row.rect["x"] + row.rect["width"] <= 360, row.rect
        # The answer, below the form on one column, was brought into view.
        top = driver.execute_script("return document.getElementById('output').getBoundingClientRect().top")
        assert 0 <= top < 780 / 2, top
        screenshot(driver, "playground-narrow.png", top=False)

        # Bytes that are no image: the gateway's own words, and the last answer's rows gone.
        driver.find_element(By.ID, "file").send_keys(str(garbage))
        assert classify(driver) == "error"
        assert error.text == f"INVALID_ARGUMENT: {refusal}"
        assert shown(driver) == []
        assert console_errors(driver) == []


def test_a_test_killed_mid_browser_leaves_no_browser_behind(browser: tuple[str, str]) -> None:
    """SIGKILL the process that holds a browser (as a killed pytest would be): the guard
    around chromedriver ends chromedriver and every Chromium process within seconds.
    (Without the guard, all of them lived on: tried when it was added.)"""
    probe_variable, probe = "CLIPLORA_TEST_BROWSER_PROBE", os.urandom(8).hex()
    script = (f"import time\nfrom tests.test_playground_browser import chromium\n"
              f"with chromium({browser!r}) as driver:\n"
              f"    driver.get('about:blank')\n    print('ready', flush=True)\n    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", script], cwd=ARTIFACTS.parent, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, probe_variable: probe})
    try:
        assert holder.stdout.readline().strip() == "ready"
        started = leftovers.marked(probe_variable, probe)
        names = {p.name() for p in started}
        assert "chromedriver" in names and any("chrom" in name and name != "chromedriver" for name in names), names
        holder.kill()
        holder.wait(10)
        left = leftovers.still_running(probe_variable, probe, 10)
        assert not left, f"left after the holder was SIGKILLed:\n{leftovers.describe(left)}"
    finally:
        holder.kill()
        leftovers.kill(leftovers.marked(probe_variable, probe))
