"""The command line end to end on a real model: `bofrs quantize` a GGUF file, load the written
checkpoint with `bofrs.load_quantized`, and compare its perplexity on held-out text with the
fake-quantized model's (the same format decoded in place): they must agree.

    python benches/eval_checkpoint.py --austen austen --model smollm2 --windows 2 \\
        [--format bof4s+opq] [--out /tmp/bofrs-checkpoint]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import realmodel

import bofrs
from bofrs import evaldata
from bofrs.__main__ import main as cli

#: Format specs and the `bofrs quantize` options that produce them.
OPTIONS = {
    "bof4s+opq": ["--codebook", "bof4s", "--opq", "0.95"],
    "nf4": ["--codebook", "nf4"],
    "higgs4p2@64": ["--codebook", "higgs", "--bits", "4", "--p", "2", "--group-size", "64"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    realmodel.add_arguments(parser)
    parser.add_argument("--format", choices=sorted(OPTIONS), default="bof4s+opq")
    parser.add_argument("--out", default="/tmp/bofrs-checkpoint")
    args = parser.parse_args()
    real = realmodel.load(args)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    code = cli(["quantize", str(evaldata.model_path(args.model)), str(out), "--no-progress",
                *OPTIONS[args.format]])  # fmt: skip
    if code != 0:
        raise SystemExit(f"bofrs quantize failed with exit code {code}")
    seconds = time.perf_counter() - start
    with bofrs.fake_quantized(real.model, args.format):
        fake = bofrs.perplexity(real.model, real.evaluation)
    loaded = bofrs.load_quantized(out)
    layers = sum(isinstance(m, bofrs.nn.base.PackedLinear) for m in loaded.modules())
    ppl = bofrs.perplexity(loaded, real.evaluation)
    print(f"{args.model} {args.format}: {layers} packed layers, quantize {seconds:.1f} s; "
          f"perplexity on {tuple(real.evaluation.shape)} held-out tokens: checkpoint {ppl:.4f}, "
          f"fake-quantized {fake:.4f}, unquantized {bofrs.perplexity(real.model, real.evaluation):.4f}")
    if abs(ppl - fake) > 1e-3 * fake:
        raise SystemExit("the loaded checkpoint and the fake-quantized model disagree")


if __name__ == "__main__":
    main()
