"""The command line: its commands and flags are a contract (the README's command tables), every
help page prints, and the flags' defaults are the library's own (no literal in the parser)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import pytest

from cliplora.cli import build_parser, main
from cliplora.export.cli import options as export_options
from cliplora.export.options import ExportOptions
from cliplora.finetune.cli import options as finetune_options
from cliplora.finetune.options import FinetuneOptions

COMMANDS = ["export", "finetune", "evaluate", "predict", "serve", "classify", "embed", "loadtest"]
# The contract's flags of each command (README.md): a parser may add flags, never lose one.
CONTRACT_FLAGS = {
    "export": {"--model", "--pretrained", "--lora", "--classes", "--template", "--name", "--repository",
               "--precision", "--unmerged", "--allow-random-weights", "--target", "--open-vocabulary"},
    "predict": {"--repository", "--name", "--top-k", "--labels", "--labels-file", "--template"},
    "serve": {"--repository", "--grpc-port", "--metrics-port", "--triton-url"},
    "classify": {"--target", "--model", "--top-k", "--labels", "--labels-file", "--template"},
    "embed": {"--target", "--model", "--version", "--text"},
    "loadtest": {"--target", "--models", "--concurrency", "--duration", "--report"},
}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_the_commands_and_their_contract_flags() -> None:
    parsers = _subparsers()
    assert [name for name in parsers if name in COMMANDS] == COMMANDS  # more may come, in any case these
    for command, wanted in CONTRACT_FLAGS.items():
        flags = {option for action in parsers[command]._actions for option in action.option_strings}
        assert wanted <= flags, (command, sorted(wanted - flags))


def test_every_help_page_prints(capsys) -> None:
    for command in [[], *([name] for name in _subparsers())]:
        with pytest.raises(SystemExit) as done:
            main([*command, "--help"])
        assert done.value.code == 0, command
        out = capsys.readouterr().out
        assert out.startswith(f"usage: cliplora {' '.join(command)}".rstrip()), out[:80]


def test_export_defaults_are_the_options_defaults() -> None:
    """Only the required flags: the parsed options equal `ExportOptions` built with its own
    defaults, which are the documented 32 / 8 / fp32 / portable."""
    required = dict(model="m", lora="none", classes="c.txt", name="n")
    args = build_parser().parse_args(["export", *[x for k, v in required.items() for x in (f"--{k}", v)]])
    parsed = export_options(args)
    assert parsed == ExportOptions(model="m", pretrained=None, lora="none", classes=Path("c.txt"), templates=(),
                                   name="n")
    assert (parsed.max_batch_size, parsed.probes, parsed.precision, parsed.target) == (32, 8, "fp32", "portable")
    assert parsed.repository == Path("model_repository")


def test_finetune_defaults_are_the_papers() -> None:
    args = build_parser().parse_args(["finetune", "--model", "m", "--data", "d", "--shots", "4", "--output", "o"])
    parsed = finetune_options(args)
    assert parsed == FinetuneOptions(model="m", pretrained=None, data=Path("d"), shots=4, output=Path("o"))
    # the paper's recipe, written here, not read from the product
    lora = parsed.lora
    assert (lora.encoder, lora.position, lora.params, lora.r, lora.alpha, lora.dropout) == (
        "both", "all", ("q", "k", "v"), 2, 1.0, 0.25)
    assert (parsed.lr, parsed.weight_decay, parsed.min_lr, parsed.batch_size, parsed.seed, parsed.save_every) == (
        2e-4, 1e-2, 1e-6, 32, 1, 100)
    assert parsed.total_iterations == 500 * 4


def test_flags_given_reach_the_options() -> None:
    """Each value given differs from its default, so the comparison above is not vacuous."""
    args = build_parser().parse_args(["export", "--model", "m", "--lora", "none", "--classes", "c.txt", "--name", "n",
                                      "--max-batch-size", "8", "--probes", "3", "--precision", "fp16",
                                      "--template", "a {}.", "--template", "the {}."])
    parsed = export_options(args)
    base = ExportOptions(model="m", pretrained=None, lora="none", classes=Path("c.txt"), templates=(), name="n")
    assert parsed == replace(base, max_batch_size=8, probes=3, precision="fp16", templates=("a {}.", "the {}."))
    assert parsed != base
    args = build_parser().parse_args(["finetune", "--model", "m", "--data", "d", "--shots", "4", "--output", "o",
                                      "--params", "q", "o", "--r", "4", "--encoder", "vision"])
    lora = finetune_options(args).lora
    assert (lora.params, lora.r, lora.encoder) == (("q", "o"), 4, "vision")
