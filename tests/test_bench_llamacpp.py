"""The llama.cpp benchmark helpers (benches/llamacpp.py, benches/bench_decode_vs_llamacpp.py):
parsers of llama.cpp's outputs, the build-directory layout, and the requantization cache. Fast;
no llama.cpp needed (fake binaries are small shell scripts)."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

BENCHES = Path(__file__).resolve().parent.parent / "benches"


def _load(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


llamacpp = _load("llamacpp")
bench = _load("bench_decode_vs_llamacpp")


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _fake_tree(root: Path, version: str, commit: str = "abc1234") -> Path:
    """A llama_cpp_python-<version> layout with every target as a script."""
    source = root / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    source.mkdir(parents=True)
    (source / "CMakeLists.txt").write_text("")
    for target in llamacpp.TARGETS:
        _script(source / "build" / "bin" / target, f'echo "version: 0.5.0-dev (build 7, commit {commit})"\n')
    return source


# -- llamacpp.py ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("version: 0.5.0-dev (build 1, commit 0c1e570)\nbuilt with GNU 12.2.0\n", "0c1e570"),
        ("register_backend: ...\nversion: 4567 (deadbee)\n", "deadbee"),
        ("no version here\n", ""),
    ],
)
def test_parse_version(text: str, expected: str) -> None:
    line, commit = llamacpp.parse_version(text)
    assert commit == expected
    assert (line == "") == (expected == "")


def test_build_state(tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    assert llamacpp.build_state(log) == "none"
    log.write_text("[1/2] compiling\n[2/2] linking\nrc 0\n")
    assert llamacpp.build_state(log) == "done"
    log.write_text("[1/2] compiling\nFAILED\nrc 1\n")
    assert llamacpp.build_state(log) == "failed"
    log.write_text("[1/2] compiling\n")
    assert llamacpp.build_state(log) == "running"
    old = time.time() - 2 * llamacpp.STALE_LOG_SECONDS
    os.utime(log, (old, old))
    assert llamacpp.build_state(log) == "failed"  # nobody writes it any more


def test_find_prefers_the_newest_built_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOFRS_LLAMACPP_DIR", str(tmp_path))
    _fake_tree(tmp_path, "0.3.9", "1111111")
    newest = _fake_tree(tmp_path, "0.3.36", "2222222")
    (tmp_path / "build.log").write_text("rc 0\n")
    found = llamacpp.find_or_build(build=False, log=lambda _: None)
    assert found is not None
    assert found.source == newest and found.sdist_version == "0.3.36" and found.commit == "2222222"
    assert found.binary("llama-bench") == newest / "build" / "bin" / "llama-bench"
    with pytest.raises(ValueError, match="name"):
        found.binary("llama-server")


def test_find_without_build_reports_and_returns_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOFRS_LLAMACPP_DIR", str(tmp_path / "empty"))
    messages: list[str] = []
    assert llamacpp.find_or_build(build=False, log=messages.append) is None
    assert any("not built" in m for m in messages)


def test_find_waits_for_a_running_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOFRS_LLAMACPP_DIR", str(tmp_path))
    source = _fake_tree(tmp_path, "0.3.36")
    (source / "build" / "bin" / "test-backend-ops").unlink()  # the build has not got there yet
    (tmp_path / "build.log").write_text("[99/149] compiling\n")
    messages: list[str] = []
    assert llamacpp.find_or_build(log=messages.append, wait_seconds=0) is None
    assert any("waiting" in m for m in messages) and any("gave up" in m for m in messages)


def test_cli_skips_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("BOFRS_LLAMACPP_DIR", str(tmp_path / "empty"))
    assert llamacpp.main(["--no-build"]) == 0
    assert "skipped" in capsys.readouterr().out


def _fake_llama(tmp_path: Path, quantize_body: str) -> object:
    bin_dir = tmp_path / "bin"
    _script(bin_dir / "llama-quantize", quantize_body)
    return llamacpp.LlamaCpp(tmp_path, bin_dir, "0.0.0", "", "")


def _recording_quantizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[object, Path, Path]:
    """A fake llama-quantize that records its arguments (one line per call, in the returned
    file) and writes "<input bytes> <type>" to the output (its last four arguments are the input,
    output, type and threads), a cache in tmp_path, and a source model."""
    monkeypatch.setenv("BOFRS_LLAMACPP_DIR", str(tmp_path / "cache"))
    calls = tmp_path / "calls"
    llama = _fake_llama(tmp_path, f'echo "$@" >> {calls}\n[ "$1" = --allow-requantize ] || exit 3\n'
                                  'shift $(($# - 4)); { cat "$1"; echo " $3"; } > "$2"\n')  # fmt: skip
    src = tmp_path / "model.gguf"
    src.write_text("weights")
    return llama, calls, src


def test_requantize_caches_by_input_and_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    llama, calls, src = _recording_quantizer(tmp_path, monkeypatch)
    first = llamacpp.requantize(src, "q4_0", llama)
    assert first.read_text() == "weights Q4_0\n"
    assert llamacpp.requantize(src, "Q4_0", llama) == first  # cached: no second call
    other = llamacpp.requantize(src, "IQ4_NL", llama)
    assert other != first and other.read_text() == "weights IQ4_NL\n"
    assert len(calls.read_text().splitlines()) == 2
    time.sleep(0.01)
    src.write_text("new weights")  # another input file content: requantized again
    assert llamacpp.requantize(src, "Q4_0", llama).read_text() == "new weights Q4_0\n"
    assert not list((tmp_path / "cache" / "gguf").glob("*.partial"))


def test_requantize_can_set_the_output_and_embedding_types(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    llama, calls, src = _recording_quantizer(tmp_path, monkeypatch)
    plain = llamacpp.requantize(src, "Q4_0", llama)
    four_bit_out = llamacpp.requantize(src, "q4_0:q4_0", llama)
    assert four_bit_out != plain and four_bit_out.read_text() == "weights Q4_0\n"
    assert "OUT-Q4_0" in four_bit_out.name and "OUT" not in plain.name
    first, second = calls.read_text().splitlines()
    assert "--output-tensor-type" not in first
    assert "--output-tensor-type Q4_0 --token-embedding-type Q4_0" in second
    assert llamacpp.requantize(src, "Q4_0:Q4_0", llama) == four_bit_out  # cached
    assert len(calls.read_text().splitlines()) == 2
    with pytest.raises(ValueError, match="type"):
        llamacpp.requantize(src, "Q4_0:", llama)


def test_requantize_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOFRS_LLAMACPP_DIR", str(tmp_path / "cache"))
    src = tmp_path / "model.gguf"
    src.write_text("weights")
    failing = _fake_llama(tmp_path, 'echo "unknown type $4" >&2\ntouch "$3"\nexit 1\n')
    with pytest.raises(RuntimeError, match="unknown type NOPE"):
        llamacpp.requantize(src, "NOPE", failing)
    assert not list((tmp_path / "cache" / "gguf").glob("*"))  # no partial output left
    with pytest.raises(ValueError, match="type"):
        llamacpp.requantize(src, "Q4_0; rm -rf /", failing)
    with pytest.raises(FileNotFoundError, match="src"):
        llamacpp.requantize(tmp_path / "missing.gguf", "Q4_0", failing)


# -- bench_decode_vs_llamacpp.py --------------------------------------------------------------


def test_parse_llama_bench() -> None:
    run = {"n_threads": 2, "model_type": "llama 256M Q4_0", "build_commit": "0c1e570", "samples_ts": [1.0, 3.0]}
    text = json.dumps([
        {**run, "n_prompt": 128, "n_gen": 0, "avg_ts": 900.5, "stddev_ts": 3.0},
        {**run, "n_prompt": 0, "n_gen": 64, "avg_ts": 120.25, "stddev_ts": 1.5},
    ])  # fmt: skip
    tests = bench.parse_llama_bench(text)
    assert set(tests) == {"pp128", "tg64"}
    assert tests["pp128"]["avg_ts"] == 900.5 and tests["tg64"]["avg_ts"] == 120.25
    assert tests["tg64"]["n_threads"] == 2 and tests["tg64"]["samples_ts"] == [1.0, 3.0]
    with pytest.raises(ValueError, match="list"):
        bench.parse_llama_bench('{"avg_ts": 1}')


def test_parse_backend_ops_perf() -> None:
    text = (
        "Backend 1/1: CPU\n  Device description: AMD EPYC\n"
        "  MUL_MAT(name=mm_q4_0_4096x11008,type=f32,ne=[4096,1,1,1],op_params=[],sources=q4_0[11008,4096,1,1],"
        "f32[11008,1,1,1]):                  676 runs -  3179.49 us/run -    24827 kB/run - \x1b[1;34m   7.45 GB/s\x1b[0m\n"
        "  MUL_MAT(type_a=q4_0,type_b=f32,m=4096,n=1,k=14336):   1014 runs -  1005.77 us/run -  24827 kB/run\n"
        "  Backend CPU: \x1b[1;32mOK\x1b[0m\n"
    )
    times = bench.parse_backend_ops_perf(text)
    assert times == {"mm_q4_0_4096x11008": 3179.49, "type_a=q4_0,type_b=f32,m=4096,n=1,k=14336": 1005.77}


def test_c_enum() -> None:
    header = """
    enum other { OTHER_A = 5 };
    enum ggml_type {
        GGML_TYPE_F32  = 0,   // a comment, with a comma
        GGML_TYPE_F16,        /* 1 */
        // GGML_TYPE_Q4_2 = 4, removed
        GGML_TYPE_Q4_0 = 0x2,
        GGML_TYPE_Q4_1,
        GGML_TYPE_COUNT,
    };
    """
    assert bench.c_enum(header, "ggml_type") == {
        "GGML_TYPE_F32": 0, "GGML_TYPE_F16": 1, "GGML_TYPE_Q4_0": 2, "GGML_TYPE_Q4_1": 3, "GGML_TYPE_COUNT": 4,
    }  # fmt: skip
    assert bench.c_enum(header, "other") == {"OTHER_A": 5}
    with pytest.raises(ValueError, match="ggml_op"):
        bench.c_enum(header, "ggml_op")


def test_mul_mat_case_matches_the_test_file_layout() -> None:
    line = bench.mul_mat_case(29, {"f32": 0, "q4_0": 2}, "q4_0", 4096, 11008)
    *numbers, name = line.split()
    values = list(map(int, numbers))
    op, out_type, ne, n_params = values[0], values[1], values[2:6], values[6]
    assert (op, out_type, ne, n_params, values[7]) == (29, 0, [4096, 1, 1, 1], 0, 2)
    src0, src1 = values[8:17], values[17:26]
    row = 11008 // 32 * 18
    assert src0 == [2, 11008, 4096, 1, 1, 18, row, row * 4096, row * 4096]  # type, ne[4], nb[4]
    assert src1 == [0, 11008, 1, 1, 1, 4, 4 * 11008, 4 * 11008, 4 * 11008]
    assert len(values) == 26 and name == "mm_q4_0_4096x11008"
    with pytest.raises(ValueError, match="multiple"):
        bench.mul_mat_case(29, {"f32": 0, "q4_0": 2}, "q4_0", 64, 100)


def test_gguf_summary(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    q8 = gguf.GGMLQuantizationType.Q8_0
    f32 = rng.standard_normal((4, 64)).astype(np.float32)

    def q8_0(a: np.ndarray) -> np.ndarray:
        return np.asarray(gguf.quants.quantize(a, q8))

    writer.add_tensor("token_embd.weight", q8_0(rng.standard_normal((8, 64)).astype(np.float32)), raw_dtype=q8)
    writer.add_tensor("blk.0.attn_q.weight", q8_0(f32), raw_dtype=q8)
    writer.add_tensor("blk.0.attn_k.weight", q8_0(f32), raw_dtype=q8)
    writer.add_tensor("blk.0.ffn_down.weight", f32)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    summary = bench.gguf_summary(path)
    assert summary["blocks_types"] == {"Q8_0": 2, "F32": 1}  # the 1-D norm is not counted
    assert summary["blocks_bpw"] == pytest.approx((8.5 * 2 + 32) / 3)
    assert summary["output_type"] == "Q8_0" and summary["output_bpw"] == pytest.approx(8.5)
    assert "tied" in summary["output_tensor"]
    assert summary["blocks_not_main_type"] == {"blk.0.ffn_down.weight": "F32"}
