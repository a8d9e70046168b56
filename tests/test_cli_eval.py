"""``bofrs eval`` and ``bofrs report`` on a tiny transformers model and a made-up corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bofrs.__main__ import main
from tiny_models import tiny_llama

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(path)
    return path


class CharTokenizer:
    """Tokens are characters modulo the vocabulary: enough to score text."""

    def __call__(self, text: str, return_tensors: str = "pt") -> object:
        ids = torch.tensor([[ord(c) % 96 for c in text]])
        return type("Encoded", (), {"input_ids": ids})()


def test_eval_json_and_report(llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    import bofrs.cli.eval as cli

    real = cli._load_model
    monkeypatch.setattr(cli, "_load_model", lambda p: (real(p)[0], CharTokenizer()))
    corpus = tmp_path / "text.txt"
    corpus.write_text("It is a truth universally acknowledged. " * 40)
    out = tmp_path / "eval.json"
    code = main(["eval", str(llama), "--formats", "bof4s+opq,higgs4p2@64,bf16", "--corpus", str(corpus),
                 "--windows", "3", "--length", "48", "--json", str(out), "--per-layer",
                 "--per-layer-formats", "nf4,bof4s", "--per-layer-windows", "1", "--resamples", "50",
                 "--no-progress"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "| unquantized |" in printed and "| bof4s+opq |" in printed and "| layer |" in printed
    assert "KL - nf4" in printed
    result = json.loads(out.read_text())
    assert result["corpus"]["windows"] == [3, 48]
    assert result["reference"]["bootstrap"] == {
        "unit": "window", "resamples": 50, "seed": 0, "confidence": 0.95, "units": 3,
        "warning": "only 3 windows: bootstrap intervals are unreliable below 10",
    }  # fmt: skip
    formats = result["formats"]
    assert list(formats) == ["nf4", "bof4s+opq", "higgs4p2@64", "bf16"]  # the baseline is added
    assert formats["bf16"]["mean_t2"] < formats["nf4"]["mean_t2"]
    assert formats["bf16"]["bits_per_weight"] == 16.0
    assert formats["bf16"]["kl"]["value"] < formats["nf4"]["kl"]["value"]
    assert abs(formats["bf16"]["perplexity"] - result["baseline_perplexity"]) < 0.05 * result["baseline_perplexity"]
    lo, hi = formats["nf4"]["kl"]["ci"]
    assert 0 < lo <= formats["nf4"]["kl"]["value"] <= hi
    assert len(formats["nf4"]["per_layer_t2"]) == 14
    assert len(result["per_layer"]["layers"]) == 14
    assert "| nf4 vs bof4s |" in printed and result["per_layer"]["summary"]["layers"] == 14
    report = tmp_path / "report.html"
    assert main(["report", str(out), str(report)]) == 0
    page = report.read_text()
    assert page.count("data:image/png;base64,") == 4 and "bof4s+opq" in page


def test_eval_without_corpus_and_errors(llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(llama), "--formats", "nf4,int4", "--corpus", "none", "--no-progress"]) == 0
    assert "perplexity" not in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "nothing"), "--no-progress"]) == 2
    assert "model" in capsys.readouterr().err
    assert main(["eval", str(llama), "--formats", "nf9", "--corpus", "none", "--no-progress"]) == 2
    assert "codebook" in capsys.readouterr().err
    assert main(["eval", str(llama), "--corpus", "none", "--llamacpp", "Q4_0", "--no-progress"]) == 2
    assert "GGUF" in capsys.readouterr().err
    assert main(["eval", str(llama), "--corpus", str(tmp_path / "missing.txt"), "--no-progress"]) == 2
    assert "corpus" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["report", str(bad), str(tmp_path / "r.html")]) == 2
    assert "result" in capsys.readouterr().err
