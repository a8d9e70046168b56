"""Tables of an :func:`bofrs.evaluate_formats` result, and paired comparisons from its record."""

from __future__ import annotations

from typing import Any

import numpy as np

from bofrs.eval.stats import Bootstrap, Interval, unit_of_token


def _ci(stat: dict[str, Any], digits: int, scale: float = 1.0, signed: bool = False) -> str:
    sign = "+" if signed else ""
    lo, hi = (v * scale for v in stat["ci"])
    return f"{stat['value'] * scale:{sign}.{digits}f} [{lo:{sign}.{digits}f}, {hi:{sign}.{digits}f}]"


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table of an :func:`bofrs.evaluate_formats` result: bits per weight and mean
    ``t^2``, and with text the KL divergence to the unquantized model (mean and 99th
    percentile, nats/token), its paired difference to the baseline, top-1 agreement and
    perplexity, each with its 95 % (or the chosen) interval."""
    formats: dict[str, Any] = result["formats"]
    if "reference" not in result:
        lines = ["| format | bits/weight | mean t^2 |", "|---|---|---|"]
        for label, e in formats.items():
            lines.append(f"| {label} | {e['bits_per_weight']:.4f} | {e['mean_t2']:.5f} |")
        return "\n".join(lines)
    base = result.get("baseline")
    conf = round(100 * result["reference"]["bootstrap"]["confidence"])
    diff = f" KL - {base} |" if base else ""
    lines = [
        f"| format | bits/weight | mean t^2 | mean KL [{conf} % CI] |{diff} KL p99 | top-1 % | perplexity [{conf} % CI] |",
        "|---|---|---|---|" + ("---|" if base else "") + "---|---|---|",
    ]
    ref = result["reference"]["perplexity"]
    lines.append(f"| unquantized | 16 or 32 | 0 | 0 |{' |' if base else ''} 0 | 100 | {_ci(ref, 3)} |")
    for label, e in formats.items():
        row = f"| {label} | {e['bits_per_weight']:.4f} | {e['mean_t2']:.5f} | {_ci(e['kl'], 4)} |"
        if base:
            row += f" {_ci(e['vs_baseline']['kl_diff'], 4, signed=True)} |"
        ppl = {"value": e["perplexity"], "ci": e["perplexity_ci"]}
        row += f" {e['kl_p99']['value']:.3f} | {100 * e['top1']['value']:.2f} | {_ci(ppl, 3)} |"
        lines.append(row)
    warning = result["reference"]["bootstrap"].get("warning")
    if warning:
        lines.append(f"\n(warning: {warning})")
    return "\n".join(lines)


def compare(result: dict[str, Any], a: str, b: str) -> Interval:
    """Mean KL of format ``a`` minus that of ``b`` with the paired window-bootstrap interval,
    recomputed from the per-window sums of the record (same seed, draws and confidence)."""
    boot = _bootstrap(result)
    per = result["tokens"]["length"] - 1
    means = []
    for label in (a, b):
        if label not in result["formats"]:
            raise ValueError(f"compare: no format {label!r} in the result")
        sums = np.asarray(result["formats"][label]["per_window"]["kl"], dtype=np.float64)
        values = np.repeat(sums / per, per)  # same window sums, hence the same window means
        means.append(boot.mean_samples(values))
    (va, sa), (vb, sb) = means
    return boot.interval(va - vb, sa - sb)


def _bootstrap(result: dict[str, Any]) -> Bootstrap:
    settings = result["reference"]["bootstrap"]
    if settings["unit"] != "window":
        raise ValueError("compare: needs a result bootstrapped per window")
    per = result["tokens"]["length"] - 1
    return Bootstrap(
        unit_of_token([per] * result["tokens"]["windows"], "window"),
        resamples=settings["resamples"], seed=settings["seed"], confidence=settings["confidence"],
    )  # fmt: skip


def ranking(result: dict[str, Any], labels: list[str] | None = None) -> list[str]:
    """Sentences ordering ``labels`` (default: every format) by mean KL, best first: each
    neighbour pair either separated (its paired interval excludes 0) or not."""
    names = labels or list(result["formats"])
    order = sorted(names, key=lambda n: result["formats"][n]["kl"]["value"])
    out = []
    for better, worse in zip(order, order[1:]):
        d = compare(result, worse, better)
        verdict = "separated" if d.low > 0 else "not separated"
        out.append(f"{better} < {worse}: KL difference {d.value:+.4f} [{d.low:+.4f}, {d.high:+.4f}] ({verdict})")
    return out
