"""report.json (a contract: the README's "Load tests"), report.md and latency.png for one run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from cliplora.loadtest.runner import RunResult
from cliplora.loadtest.stats import ratios, summary_ms


def build_report(result: RunResult, *, target: str, seed: int = 0) -> dict[str, Any]:
    """The contract's `models` and `ratios`, plus `intervals` and `run` beside them."""
    models: dict[str, Any] = {}
    for model in result.models:
        ok = result.latencies(model)
        errors = sum(result.errors(model).values())
        models[model] = {
            "requests": int(ok.size + errors),
            "errors": int(errors),
            "throughput_rps": float(ok.size / result.measured_seconds),
            "latency_ms": summary_ms(ok),
        }
    first = result.models[0]
    ratio_table: dict[str, Any] = {}
    intervals: dict[str, Any] = {}
    for model in result.models[1:]:
        found = ratios(result.latencies(first), result.latencies(model), seed=seed)
        key = f"{model}/{first}"
        ratio_table[key] = {name: r.value for name, r in found.items()}
        intervals[key] = {name: {"low": r.low, "high": r.high, "contains_1": r.contains_one()}
                          for name, r in found.items()}
    return {
        "models": models,
        "ratios": ratio_table,
        "intervals": {"confidence": 0.95, "method": "percentile bootstrap over requests", "ratios": intervals},
        "run": {
            "target": target,
            "mode": result.mode,
            "concurrency": result.concurrency,
            "rate_rps": result.rate,
            "measured_seconds": result.measured_seconds,
            "warmup_seconds": result.warmup_seconds,
            "interleaved": result.models,
            "errors_by_code": {m: result.errors(m) for m in result.models},
            "started_unix": result.started_unix,
            "ended_unix": result.ended_unix,
        },
    }


def _fmt(value: float, digits: int = 1) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


PLOT_FILENAME = "latency.png"


def render_markdown(report: dict[str, Any], plot: str = f"![latency CDF]({PLOT_FILENAME})") -> str:
    """report.md; `plot` is the line that shows the plot (an image link beside the file)."""
    run = report["run"]
    load = f"concurrency {run['concurrency']}" if run["mode"] == "closed" else f"open loop at {run['rate_rps']} req/s"
    lines = [
        "# Load test",
        "",
        f"Target: {run['target']}; {load}; {run['measured_seconds']:.1f} s measured after "
        f"{run['warmup_seconds']:.0f} s warm-up; models interleaved request by request: "
        f"{', '.join(run['interleaved'])}.",
        "",
        "| model | requests | errors | throughput (req/s) | p50 ms | p90 ms | p99 ms | mean ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in report["models"].items():
        lat = m["latency_ms"]
        lines.append(f"| {name} | {m['requests']} | {m['errors']} | {_fmt(m['throughput_rps'], 2)} | "
                     f"{_fmt(lat['p50'])} | {_fmt(lat['p90'])} | {_fmt(lat['p99'])} | {_fmt(lat['mean'])} |")
    if report["ratios"]:
        lines += ["", "Ratios with 95% bootstrap intervals (throughput: ratio of service rates, 1/mean latency):", "",
                  "| ratio | p50 | p99 | throughput |", "|---|---|---|---|"]
        for key, r in report["ratios"].items():
            ci = report["intervals"]["ratios"][key]
            cells = [f"{_fmt(r[n], 3)} [{_fmt(ci[n]['low'], 3)}, {_fmt(ci[n]['high'], 3)}]" for n in ("p50", "p99", "throughput")]
            lines.append(f"| {key} | {' | '.join(cells)} |")
    prometheus = report.get("prometheus")
    if prometheus:
        lines += ["", f"Server side, from Prometheus ({prometheus['window_seconds']} s window):", "",
                  "| model | gateway p50 ms | gateway p99 ms | gateway mean ms | Triton compute ms/inference |",
                  "|---|---|---|---|---|"]
        for name in report["models"]:
            g = prometheus["gateway"].get(name, {})
            t = prometheus["triton"].get(name, {})
            lines.append(f"| {name} | {_fmt(g.get('p50_ms'), 2)} | {_fmt(g.get('p99_ms'), 2)} | "
                         f"{_fmt(g.get('mean_ms'), 2)} | {_fmt(t.get('compute_ms_per_inference'), 2)} |")
    verdict = report.get("verdict")
    if verdict:
        lines += ["", f"**Verdict: {'PASS' if verdict['passed'] else 'FAIL'}** "
                      f"(overhead bound {verdict['bound']:.0%} vs {report['run']['interleaved'][0]}):"]
        for key, v in verdict["comparisons"].items():
            shown = ", ".join(f"{k.removesuffix('_ratio')} ×{val:.3f}" for k, val in v.items() if k.endswith("_ratio"))
            if v.get("missing"):
                shown = f"{shown + '; ' if shown else ''}missing {', '.join(v['missing'])}"
            outcome = "within" if v["within_bound"] else "OUTSIDE" if v.get("computed", True) else "NOT COMPUTED"
            lines.append(f"- {key}: {shown or 'no server-side data'} → {outcome}")
    lines += ["", plot, ""]
    return "\n".join(lines)


def plot_cdf(result: RunResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2), dpi=120)
    for model in result.models:
        ms = np.sort(result.latencies(model) * 1e3)
        if ms.size:
            axis.plot(ms, np.arange(1, ms.size + 1) / ms.size, label=f"{model} (n={ms.size})")
    axis.set_xlabel("latency (ms)")
    axis.set_ylabel("fraction of requests")
    axis.set_title("Latency CDF, models interleaved")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_report(report: dict[str, Any], result: RunResult, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n")
    (folder / "report.md").write_text(render_markdown(report))
    plot_cdf(result, folder / PLOT_FILENAME)


def _jsonable(obj: Any) -> Any:
    """NaN and infinities (a model with no successful request) become null: valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    return obj
