"""`cliplora finetune` and `cliplora evaluate` on a generated coloured-shapes task.

A tiny random CLIP cannot tell the colours apart zero-shot; a few dozen steps of the
paper's LoRA must, and the published model must score exactly what training measured.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import pytest
import torch

from cliplora.core.accuracy import accuracy_report
from cliplora.core.datasets import few_shot_split, read_labelled_images
from cliplora.core.errors import FailedPrecondition, InvalidArgument, NotFound
from cliplora.evaluate import evaluate_model
from cliplora.export.pipeline import ExportOptions, run_export
from cliplora.finetune.lora_layers import LoraSpec, TrainableLoraBranch, apply_lora, lora_parameters
from cliplora.finetune.train import FinetuneOptions, run_finetune
from cliplora.model.base_model import load_base_model
from cliplora.model.lora_paper import load_clip_lora_checkpoint
from tests import factories

FAST = dict(lr=5e-3, batch_size=16)  # a random tiny CLIP needs a larger step than 2e-4 to learn in 40 steps


def _options(data: Path, output: Path, config: Path, **overrides) -> FinetuneOptions:
    settings = dict(model=str(config), pretrained=None, data=data, shots=8, output=output, seed=3,
                    iterations=40, allow_random_weights=True, device="cpu", **FAST)
    settings.update(overrides)
    return FinetuneOptions(**settings)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return factories.write_shapes_dataset(tmp_path_factory.mktemp("shapes") / "data", per_class=28)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes, tiny_config):
    return run_finetune(_options(shapes, tmp_path_factory.mktemp("run") / "out", tiny_config))


@pytest.mark.slow
def test_finetuned_beats_zero_shot_clearly(trained) -> None:
    run = json.loads((trained.output / "run.json").read_text())
    assert run["status"] == "done" and run["steps_done"] == 40
    assert run["data"]["train_images"] == 32 and run["data"]["eval_images"] == 80
    zero_shot, tuned = run["zero_shot"]["top1"], run["accuracy"]["top1"]
    assert tuned >= 0.75 and tuned - zero_shot >= 0.3, (zero_shot, tuned)
    assert len(run["losses"]) == 40 and sum(run["losses"][-5:]) < sum(run["losses"][:5])


@pytest.mark.slow
def test_checkpoint_is_the_papers_format(trained) -> None:
    raw = torch.load(trained.checkpoint, map_location="cpu", weights_only=True)
    assert set(raw) == {"weights", "metadata"}
    assert raw["metadata"] == {"r": 2, "alpha": 1.0, "encoder": "both", "params": ["q", "k", "v"], "position": "all"}
    expected = factories.paper_checkpoint(encoder="both", position="all", params=("q", "k", "v"))["weights"]
    assert list(raw["weights"]) == [f"layer_{i}" for i in range(2 * factories.BLOCKS)] == list(expected)
    for index, (tower, _block) in enumerate(factories.adapted_blocks("both", "all")):
        layer = raw["weights"][f"layer_{index}"]
        assert set(layer) == {"q_proj", "k_proj", "v_proj"}
        d = factories.width(tower)  # text first, then vision: the widths differ
        for entry in layer.values():
            assert set(entry) == {"w_lora_A", "w_lora_B"}
            assert entry["w_lora_A"].shape == (2, d) and entry["w_lora_B"].shape == (d, 2)
            assert entry["w_lora_A"].dtype == entry["w_lora_B"].dtype == torch.float32
            assert entry["w_lora_B"].abs().max() > 0  # trained away from the zero initialisation
    adapter = load_clip_lora_checkpoint(trained.checkpoint, text_blocks=12, vision_blocks=12)
    assert adapter.updates[0].scale == pytest.approx(1 / math.sqrt(2))


@pytest.mark.slow
def test_published_model_scores_what_training_measured(trained, tmp_path, tiny_config) -> None:
    """finetune → export → evaluate: the same top-1 and per-class figures, and the
    base published with --lora none scores the zero-shot figure."""
    run = json.loads((trained.output / "run.json").read_text())
    common = dict(model=str(tiny_config), pretrained=None, classes=trained.output / "classes.txt",
                  templates=tuple(run["templates"]), repository=tmp_path / "repo", allow_random_weights=True, probes=4)
    run_export(ExportOptions(lora=str(trained.checkpoint), name="shapes-lora", **common))
    run_export(ExportOptions(lora="none", name="shapes-base", **common))
    heldout = read_labelled_images(trained.output / "heldout.csv")
    tuned = evaluate_model(heldout, "shapes-lora", repository=tmp_path / "repo")
    base = evaluate_model(heldout, "shapes-base", repository=tmp_path / "repo")
    for served, trained_figure in ((tuned, run["accuracy"]), (base, run["zero_shot"])):
        assert served["images"] == 80
        assert served["top1"] == trained_figure["top1"]
        assert served["per_class"] == trained_figure["per_class"]
    assert tuned["top1"] > base["top1"]


@pytest.mark.slow
def test_same_seed_same_adapter_and_resume_continues_exactly(shapes, tmp_path, tiny_config) -> None:
    short = dict(iterations=6, save_every=2)
    first = run_finetune(_options(shapes, tmp_path / "a", tiny_config, **short))
    again = run_finetune(_options(shapes, tmp_path / "b", tiny_config, **short))
    stopped = run_finetune(_options(shapes, tmp_path / "c", tiny_config, **short), should_stop=lambda step: step == 3)
    assert stopped.checkpoint is None and stopped.steps_done == 3
    assert not (tmp_path / "c" / "lora.pt").exists()
    resumed = run_finetune(_options(shapes, tmp_path / "c", tiny_config, resume=True, **short))
    other_seed = run_finetune(_options(shapes, tmp_path / "d", tiny_config, **(short | {"seed": 4})))

    def tensors(result) -> list[torch.Tensor]:
        raw = torch.load(result.checkpoint, weights_only=True)["weights"]
        return [t for layer in raw.values() for entry in layer.values() for t in entry.values()]

    reference = tensors(first)
    for result in (again, resumed):
        assert all(torch.equal(x, y) for x, y in zip(reference, tensors(result), strict=True))
    assert resumed.run.losses == first.run.losses
    assert not all(torch.equal(x, y) for x, y in zip(reference, tensors(other_seed), strict=True))


@pytest.mark.slow
def test_existing_output_and_changed_resume_are_refused(shapes, tmp_path, tiny_config) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FailedPrecondition, match="not empty"):
        run_finetune(_options(shapes, out, tiny_config, iterations=2))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    with pytest.raises(NotFound, match="no training state"):
        run_finetune(_options(shapes, out, tiny_config, iterations=2, resume=True))
    run_finetune(_options(shapes, tmp_path / "run", tiny_config, iterations=2))
    with pytest.raises(FailedPrecondition, match=r"different settings.*'lr'"):
        run_finetune(_options(shapes, tmp_path / "run", tiny_config, iterations=2, resume=True, lr=1e-3))


@pytest.mark.slow
def test_a_run_that_fails_early_can_be_resumed_and_bad_images_stop_it_first(shapes, tmp_path, tiny_config) -> None:
    from cliplora.finetune.train import _load_state

    blown = _options(shapes, tmp_path / "blown", tiny_config, lr=1e12, iterations=50)
    with pytest.raises(FailedPrecondition, match="the loss became"):
        run_finetune(blown)
    state = _load_state(blown, few_shot_split(read_labelled_images(shapes), 8, 3)[0])
    assert state["step"] == 0  # saved before the first step: --resume is possible
    broken = tmp_path / "broken"
    for folder in shapes.iterdir():
        (broken / folder.name).mkdir(parents=True)
        for image in folder.iterdir():
            (broken / folder.name / image.name).write_bytes(image.read_bytes())
    (broken / "red" / "000.png").write_bytes(b"not a png")
    with pytest.raises(InvalidArgument, match="000.png"):
        run_finetune(_options(broken, tmp_path / "b", tiny_config, shots=28, iterations=2))
    assert not any((tmp_path / "b").iterdir())  # nothing written: the same --output works after a fix


def test_lora_starts_at_the_base_model_and_only_lora_trains(tiny_config) -> None:
    base = load_base_model(str(tiny_config), None, allow_random_weights=True)
    images = torch.rand(2, 3, factories.IMAGE_SIZE, factories.IMAGE_SIZE)
    with torch.no_grad():
        before = base.model.encode_image(images)
    adapted = apply_lora(base.model, LoraSpec(encoder="vision", position="top3", params=("q", "v", "o")))
    assert [(b.tower, b.block) for b in adapted] == [("vision", 9), ("vision", 10), ("vision", 11)]
    trainable = [p for p in base.model.parameters() if p.requires_grad]
    assert trainable == lora_parameters(adapted) and len(trainable) == 3 * 3 * 2
    base.model.eval()
    with torch.no_grad():
        assert torch.allclose(base.model.encode_image(images), before, atol=1e-5)  # B = 0 at init
        adapted[0].attention.branches["q"].w_lora_B.fill_(0.1)
        assert not torch.allclose(base.model.encode_image(images), before, atol=1e-3)


def test_branch_follows_the_paper() -> None:
    torch.manual_seed(0)
    branch = TrainableLoraBranch(d_in=64, d_out=48, r=4, alpha=2.0, dropout=0.25)
    assert branch.scale == pytest.approx(2.0 / math.sqrt(4))
    assert torch.count_nonzero(branch.w_lora_B) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform_(a=√5) on [r, d_in]: U(-1/√d_in, 1/√d_in)
    assert branch.w_lora_A.abs().max() <= bound and branch.w_lora_A.std() > bound / 3
    with torch.no_grad():
        branch.w_lora_B.normal_()
    x = torch.randn(8, 64)
    branch.eval()
    expected = x @ branch.w_lora_A.t() @ branch.w_lora_B.t() * branch.scale
    assert torch.allclose(branch(x), expected, atol=1e-5)
    branch.train()
    assert not torch.allclose(branch(x), expected, atol=1e-3)  # dropout on the input while training


def test_data_layouts_and_split(tmp_path, shapes) -> None:
    data = read_labelled_images(shapes)
    assert data.classes == ("blue", "green", "red", "yellow") and len(data) == 112
    train, rest = few_shot_split(data, 5, seed=7)
    assert len(train) == 20 and len(rest) == 92
    assert {i.path for i in train.items}.isdisjoint(i.path for i in rest.items)
    assert few_shot_split(data, 5, seed=7)[0].items == train.items != few_shot_split(data, 5, seed=8)[0].items
    rest.write_csv(tmp_path / "rest.csv")
    assert read_labelled_images(tmp_path / "rest.csv").items == rest.items
    with pytest.raises(InvalidArgument, match="too few"):
        few_shot_split(data, 29, seed=0)
    (tmp_path / "bad.csv").write_text("path,label\nonly-one-column\n")
    with pytest.raises(InvalidArgument, match="row 1"):
        read_labelled_images(tmp_path / "bad.csv")
    (tmp_path / "missing.csv").write_text("nowhere.png,red\n")
    with pytest.raises(NotFound, match="nowhere.png"):
        read_labelled_images(tmp_path / "missing.csv")
    with pytest.raises(NotFound):
        read_labelled_images(tmp_path / "no-such-folder")


def test_accuracy_report() -> None:
    report = accuracy_report([0, 0, 1, 2], [0, 1, 1, 0], ["a", "b", "c", "d"])
    assert report["top1"] == 0.5 and report["correct"] == 2 and report["images"] == 4
    assert report["per_class"] == {"a": {"images": 2, "correct": 1, "top1": 0.5},
                                   "b": {"images": 1, "correct": 1, "top1": 1.0},
                                   "c": {"images": 1, "correct": 0, "top1": 0.0}}


@pytest.mark.slow
def test_evaluate_refuses_labels_the_model_lacks(trained, tmp_path, tiny_config) -> None:
    classes = factories.write_classes(tmp_path / "classes.txt", ["red", "green", "blue"])  # no yellow
    run_export(ExportOptions(model=str(tiny_config), pretrained=None, lora=str(trained.checkpoint), classes=classes,
                             templates=(), name="three", repository=tmp_path / "repo", allow_random_weights=True,
                             probes=2))
    with pytest.raises(InvalidArgument, match="yellow"):
        evaluate_model(read_labelled_images(trained.output / "heldout.csv"), "three", repository=tmp_path / "repo")


@pytest.mark.subprocess
def test_cli_finetune_then_evaluate(shapes, tmp_path, tiny_config) -> None:
    cli = [sys.executable, "-m", "cliplora.cli"]
    out = tmp_path / "out"
    trained = subprocess.run([*cli, "finetune", "--model", str(tiny_config), "--allow-random-weights",
                              "--data", str(shapes), "--shots", "2", "--iterations", "4", "--lr", "5e-3", "--output", str(out),
                              "--params", "q", "v", "--position", "top2", "--encoder", "text", "--device", "cpu"],
                             capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr
    summary = json.loads(trained.stdout)
    assert summary["steps_done"] == 4 and summary["checkpoint"] == str(out / "lora.pt")
    metadata = torch.load(out / "lora.pt", weights_only=True)["metadata"]
    assert metadata["params"] == ["q", "v"] and metadata["position"] == "top2" and metadata["encoder"] == "text"
    exported = subprocess.run([*cli, "export", "--model", str(tiny_config), "--allow-random-weights", "--lora",
                               str(out / "lora.pt"), "--classes", str(out / "classes.txt"), "--name", "t",
                               "--repository", str(tmp_path / "repo"), "--probes", "2", "--quiet"],
                              capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr
    evaluated = subprocess.run([*cli, "evaluate", "--data", str(out / "heldout.csv"), "--name", "t",
                                "--repository", str(tmp_path / "repo"), "--quiet"],
                               capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)
    assert report["images"] == 104 and report["models"]["t"]["images"] == 104
    assert report["models"]["t"]["top1"] == json.loads((out / "run.json").read_text())["accuracy"]["top1"]
    again = subprocess.run([*cli, "finetune", "--model", str(tiny_config), "--allow-random-weights",
                            "--data", str(shapes), "--shots", "2", "--output", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "FAILED_PRECONDITION" in again.stderr


CTRL_C_STEPS = 60  # ~30 ms a step here: a second or more between the first progress line and the end


def _cli_finetune(data: Path, output: Path, config: Path, seed: int, *extra: str) -> list[str]:
    """A fast `cliplora finetune` command line: one shot per class, LoRA on the top block only."""
    return [str(Path(sys.executable).parent / "cliplora"), "finetune", "--model", str(config),
            "--allow-random-weights", "--data", str(data), "--shots", "1", "--iterations", str(CTRL_C_STEPS),
            "--lr", "5e-3", "--batch-size", "4", "--seed", str(seed), "--position", "top1", "--params", "q", "v",
            "--save-every", "5", "--device", "cpu", "--output", str(output), *extra]


def _lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    raw = torch.load(path, map_location="cpu", weights_only=True)["weights"]
    return {f"{layer}.{proj}.{name}": t for layer, entries in raw.items() for proj, entry in entries.items()
            for name, t in entry.items()}


@pytest.mark.subprocess
def test_ctrl_c_saves_and_resume_finishes_bit_exact(tmp_path, tiny_config) -> None:
    """SIGINT to a real `cliplora finetune` ends it after the current step with exit 130 and the
    --resume command; --resume then ends on the very lora.pt of an uninterrupted run of that seed
    (another seed's differs, so the equality is not trivial)."""
    data = factories.write_shapes_dataset(tmp_path / "data", per_class=3)
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # three runs at once; the same for every run
    started: list[subprocess.Popen] = []
    logs: list[IO[str]] = []

    def start(output: Path, seed: int, *extra: str) -> subprocess.Popen:
        name = f"{output.name}{''.join(extra)}"
        logs.extend(((tmp_path / f"{name}.out").open("w"), (tmp_path / f"{name}.err").open("w")))
        process = subprocess.Popen(_cli_finetune(data, output, tiny_config, seed, *extra), env=env,
                                   stdout=logs[-2], stderr=logs[-1])
        started.append(process)
        return process

    def finished(process: subprocess.Popen) -> tuple[int, str, str]:
        code = process.wait(timeout=300)
        out, err = logs[2 * started.index(process) : 2 * started.index(process) + 2]
        return code, Path(out.name).read_text(), Path(err.name).read_text()

    interrupted_out, straight_out, other_out = tmp_path / "interrupted", tmp_path / "straight", tmp_path / "other"
    try:
        straight, other = start(straight_out, 3), start(other_out, 4)
        interrupted = start(interrupted_out, 3)
        progress = re.compile(rf"finetune: (\d+)/{CTRL_C_STEPS}")
        deadline = time.monotonic() + 240
        interrupted_log = tmp_path / "interrupted.err"
        while not progress.search(interrupted_log.read_text()):
            assert interrupted.poll() is None, interrupted_log.read_text()
            assert time.monotonic() < deadline, "no progress line from the run to interrupt"
            time.sleep(0.02)
        seen = int(progress.search(interrupted_log.read_text())[1])
        interrupted.send_signal(signal.SIGINT)
        code, stdout, stderr = finished(interrupted)
        assert code == 130, stderr
        summary = json.loads(stdout)
        assert summary["checkpoint"] is None and seen <= summary["steps_done"] < CTRL_C_STEPS
        assert (f"CANCELLED: stopped after step {summary['steps_done']}; "
                f"continue with --resume --output {interrupted_out}") in stderr
        assert (interrupted_out / "state.pt").is_file() and not (interrupted_out / "lora.pt").exists()
        assert json.loads((interrupted_out / "run.json").read_text())["status"] == "stopped"

        code, stdout, stderr = finished(start(interrupted_out, 3, "--resume"))
        assert code == 0, stderr
        assert f"resuming at step {summary['steps_done']} of {CTRL_C_STEPS}" in stderr
        assert json.loads(stdout)["steps_done"] == CTRL_C_STEPS
        for process in (straight, other):
            code, _, stderr = finished(process)
            assert code == 0, stderr
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in logs:
            log.close()

    resumed, reference = _lora_tensors(interrupted_out / "lora.pt"), _lora_tensors(straight_out / "lora.pt")
    assert resumed.keys() == reference.keys() and len(reference) == 2 * 2 * 2
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    other_seed = _lora_tensors(other_out / "lora.pt")
    assert not all(torch.equal(other_seed[k], reference[k]) for k in reference)


@pytest.mark.triton
async def test_evaluate_through_the_gateway_equals_in_process(trained, tmp_path, tiny_config) -> None:
    from cliplora.serve.stack.triton_launcher import LocalTriton
    from tests.serving import in_process_gateway, triton_ports

    repository = tmp_path / "repo"
    run_export(ExportOptions(model=str(tiny_config), pretrained=None, lora=str(trained.checkpoint),
                             classes=trained.output / "classes.txt", templates=(), name="shapes", repository=repository,
                             allow_random_weights=True, probes=2))
    heldout = read_labelled_images(trained.output / "heldout.csv")
    local = evaluate_model(heldout, "shapes", repository=repository)
    triton = LocalTriton(repository, ports=triton_ports()).start()
    try:
        async with in_process_gateway(triton.grpc_url, repository, metrics_port=-1) as (gateway, _stub):
            served = await asyncio.to_thread(evaluate_model, heldout, "shapes", target=f"127.0.0.1:{gateway.port}")
    finally:
        triton.cleanup()
    assert served["via"].startswith("gateway") and local["via"] == "onnxruntime"
    assert {k: served[k] for k in ("images", "correct", "top1", "per_class")} == \
           {k: local[k] for k in ("images", "correct", "top1", "per_class")}
