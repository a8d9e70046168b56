"""Why Gemma-3's old table was wrong: the same formats scored on windows opened by BOS (as
llama.cpp's llama-perplexity does for models with ``add_bos_token``) and on windows cut out
of the text without it (what bofrs did before), with intervals.

    python benches/eval_bos.py --data DATA --model gemma3 --windows 8

Writes benches/results/bos_{model}.md and .json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import realmodel

import bofrs
from bofrs import evaldata
from bofrs.eval import bos_token, format_table, token_windows

FORMATS = ["nf4", "af4", "bof4", "bof4s", "bof4s+rot"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    realmodel.add_arguments(parser)
    parser.add_argument("--formats", default=",".join(FORMATS))
    args = parser.parse_args()
    real = realmodel.load(args)
    bos = bos_token(real.tokenizer)
    if bos is None:
        raise SystemExit(f"{real.name} does not use BOS: nothing to compare")
    text = evaldata.corpus_text("pride50", args.data)
    ids = real.tokenizer(text, return_tensors="pt").input_ids[0]
    plain = token_windows(ids[1:], args.length, max_windows=real.evaluation.shape[0])
    out = [f"{real.name}: `python {shlex.join(sys.argv)}`; the same {real.evaluation.shape[0]} x "
           f"{args.length}-token stretch of Pride and Prejudice from chapter 50, scored both ways"]  # fmt: skip
    results = {}
    for label, windows in (("BOS first (now)", real.evaluation), ("no BOS (before)", plain)):
        result = bofrs.evaluate_formats(real.model, args.formats.split(","), windows)
        results[label] = result
        out += ["", f"**{label}**", "", format_table(result)]
    print("\n".join(out))
    path = Path(f"benches/results/bos_{real.name}.md")
    path.write_text("\n".join(out) + "\n")
    path.with_suffix(".json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
