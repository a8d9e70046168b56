"""``bofrs quantize``: a transformers checkpoint in, a bofrs checkpoint out."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import bofrs
from bofrs.__main__ import main
from tiny_models import logits, tiny_llama

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    model = tiny_llama(tie_word_embeddings=True).eval()
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path, max_shard_size="60KB")  # several shards
    return path, model


@pytest.mark.parametrize(
    "options",
    [
        ["--codebook", "bof4s", "--block-size", "32"],
        ["--codebook", "nf4", "--opq", "0.95", "--rotation", "hadamard", "--scale-dtype", "dq8"],
        ["--codebook", "higgs", "--bits", "4", "--p", "2", "--group-size", "64"],
    ],
)
def test_quantize_matches_quantize_model(
    llama: tuple[Path, torch.nn.Module], tmp_path: Path, options: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    src, model = llama
    assert len(list(src.glob("*.safetensors"))) > 1
    dst = tmp_path / "out"
    assert main(["quantize", str(src), str(dst), "--no-progress", *options]) == 0
    summary = capsys.readouterr().out
    assert "14 of" in summary and "MB/s" in summary  # 2 layers x 7 Linear weights
    loaded = bofrs.load_quantized(dst)
    reference = transformers.LlamaForCausalLM(model.config).eval()
    reference.load_state_dict(model.state_dict())
    args = dict(zip(options[::2], options[1::2]))
    rotation = args.get("--rotation")
    config = bofrs.QuantConfig(
        codebook=args["--codebook"], block_size=int(args.get("--block-size", 64)),
        scale_dtype=args.get("--scale-dtype", "bfloat16"),
        opq=float(args["--opq"]) if "--opq" in args else None, rotation=rotation,
        bits=int(args.get("--bits", 4)), p=int(args.get("--p", 2)), group_size=int(args.get("--group-size", 1024)),
    )  # fmt: skip
    bofrs.quantize_model(reference, config, progress=False)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(loaded, ids), logits(reference, ids))


def test_existing_output_is_refused_and_bad_input_fails_cleanly(
    llama: tuple[Path, torch.nn.Module], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, _ = llama
    dst = tmp_path / "out"
    dst.mkdir()
    assert main(["quantize", str(src), str(dst), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "missing"), str(tmp_path / "x"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["quantize", str(src), str(tmp_path / "y"), "--codebook", "nf5", "--no-progress"]) == 2
    assert "codebook" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_interrupted_run_leaves_nothing(llama: tuple[Path, torch.nn.Module], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, _ = llama
    import bofrs.io.convert as convert

    calls = {"n": 0}
    real = convert.save_file

    def interrupt_second_shard(*a: object, **k: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(convert, "save_file", interrupt_second_shard)
    assert main(["quantize", str(src), str(tmp_path / "out"), "--no-progress"]) == 130
    assert os.listdir(tmp_path) == []


def test_gguf_input_goes_through_transformers(
    llama: tuple[Path, torch.nn.Module], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    src, model = llama
    import bofrs.eval.data as evaldata

    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    copy = transformers.LlamaForCausalLM(model.config).eval()
    copy.load_state_dict(model.state_dict())
    monkeypatch.setattr(evaldata, "load_gguf", lambda path: (copy, None))
    dst = tmp_path / "out"
    assert main(["quantize", str(fake), str(dst), "--codebook", "nf4", "--no-progress"]) == 0
    assert "14 of" in capsys.readouterr().out
    loaded = bofrs.load_quantized(dst)
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(2))
    assert torch.equal(logits(loaded, ids), logits(copy, ids))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_budget_allocates_by_the_alphas(
    llama: tuple[Path, torch.nn.Module], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, model = llama
    alphas_file = tmp_path / "alphas.json"
    assert main(["sensitivity", str(src), "-o", str(alphas_file), "--windows", "2", "--length", "16",
                 "--no-progress"]) == 0  # fmt: skip
    alphas = json.loads(alphas_file.read_text())
    assert len(alphas) == 14 and min(alphas.values()) > -1e-3 * max(alphas.values())  # KL >= 0
    # One layer matters far more than all others: it gets the most bits.
    alphas = {n: 1e-6 for n in alphas}
    alphas["model.layers.1.mlp.down_proj"] = 100.0
    alphas_file.write_text(json.dumps(alphas))
    dst = tmp_path / "mixed"
    menu = "higgs2p2,higgs5p1,bof4s,bf16"
    assert main(["quantize", str(src), str(dst), "--budget", "6.0", "--alphas", str(alphas_file),
                 "--menu", menu, "--no-progress"]) == 0  # fmt: skip
    summary = capsys.readouterr().out
    assert "allocation at" in summary
    loaded = bofrs.load_quantized(dst)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied
    modules = dict(loaded.named_modules())
    # The float32 layer kept as stored costs 32 bits: the rest must share under 3 bits.
    assert isinstance(modules["model.layers.1.mlp.down_proj"], torch.nn.Linear)
    kinds = {type(m).__name__ for n, m in modules.items() if n.endswith("_proj") and n != "model.layers.1.mlp.down_proj"}
    assert kinds == {"HiggsLinear", "QuantLinear"}
    # The same allocation through the Python API, then quantize_model: identical outputs.
    config, plan = bofrs.io.convert.allocation_config(src, alphas, 6.0, menu.split(","), progress=False)
    assert plan.average_bits <= 6.0
    reference = transformers.LlamaForCausalLM(model.config).eval()
    reference.load_state_dict(model.state_dict())
    bofrs.quantize_model(reference, config, progress=False)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(loaded, ids), logits(reference, ids))
    assert main(["quantize", str(src), str(tmp_path / "x"), "--budget", "4"]) == 2
    assert "--alphas" in capsys.readouterr().err
    alphas_file.write_text('{"a": NaN}')
    assert main(["quantize", str(src), str(tmp_path / "x"), "--budget", "4", "--alphas", str(alphas_file)]) == 2
    assert "alphas" in capsys.readouterr().err
    alphas_file.write_text('{"model.layers.0.mlp.up_proj": 1.0}')
    assert main(["quantize", str(src), str(tmp_path / "x"), "--budget", "4", "--alphas", str(alphas_file)]) == 2
    assert "no value for layer" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
