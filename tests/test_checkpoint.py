"""save_quantized / load_quantized: bit-identical round trips and clear errors on bad files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import bofrs
from bofrs.nn import QuantLinear


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.a = nn.Linear(64, 96)
        self.b = nn.Linear(96, 64, bias=False)
        self.norm = nn.LayerNorm(64)
        self.lm_head = nn.Linear(64, 50, bias=False)
        self.lm_head.weight = self.embed.weight  # tied
        self.register_buffer("step", torch.tensor(3))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        return self.lm_head(self.norm(h + self.b(torch.relu(self.a(h)))))


def quantized_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    config = bofrs.QuantConfig(block_size=32, overrides={"b": {"codebook": "af4", "scale_dtype": "float32"}})
    bofrs.quantize_model(net, config, progress=False)
    return net


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("max_shard_bytes", [1 << 30, 4000])
def test_round_trip_is_bit_identical(tmp_path: Path, max_shard_bytes: int) -> None:
    net = quantized_net()
    bofrs.save_quantized(net, tmp_path, max_shard_bytes=max_shard_bytes)
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert (len(shards) > 1) == (max_shard_bytes < 10_000)
    skeleton = Net()  # fresh random weights, float Linear layers
    loaded = bofrs.load_quantized(tmp_path, skeleton)
    assert loaded is skeleton
    assert isinstance(loaded.a, QuantLinear) and isinstance(loaded.b, QuantLinear)
    assert loaded.b.codebook.name == "af4" and loaded.b.scales.dtype == torch.float32
    assert_same_state(net, loaded)
    assert loaded.lm_head.weight is loaded.embed.weight
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        assert torch.equal(net(ids), loaded(ids))


def test_quant_config_is_recorded(tmp_path: Path) -> None:
    config = bofrs.QuantConfig(block_size=32)
    bofrs.save_quantized(quantized_net(), tmp_path, config=config)
    index = json.loads((tmp_path / "bofrs_model.json").read_text())
    assert bofrs.QuantConfig.from_dict(index["quant_config"]) == config
    assert set(index["layers"]) == {"a", "b"}


def test_shared_quant_layer_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    shared = nn.Linear(32, 32)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    bofrs.quantize_model(model, bofrs.QuantConfig(block_size=32), progress=False)
    bofrs.save_quantized(model, tmp_path)
    skeleton = copy.deepcopy(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)))
    loaded = bofrs.load_quantized(tmp_path, skeleton)
    assert loaded[0] is loaded[2]
    assert_same_state(model, loaded)


def _shard(tmp_path: Path) -> Path:
    return sorted(tmp_path.glob("*.safetensors"))[0]


def test_corrupted_shard_raises_format_error(tmp_path: Path) -> None:
    bofrs.save_quantized(quantized_net(), tmp_path)
    shard = _shard(tmp_path)
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x55  # flip bits in the last stored tensor
    shard.write_bytes(bytes(data))
    with pytest.raises(bofrs.FormatError, match="checksum"):
        bofrs.load_quantized(tmp_path, Net())


def test_truncated_shard_raises_format_error(tmp_path: Path) -> None:
    bofrs.save_quantized(quantized_net(), tmp_path)
    shard = _shard(tmp_path)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(bofrs.FormatError):
        bofrs.load_quantized(tmp_path, Net())


@pytest.mark.parametrize("version", [0, 2, "1"])
def test_other_format_versions_raise(tmp_path: Path, version: object) -> None:
    bofrs.save_quantized(quantized_net(), tmp_path)
    path = tmp_path / "bofrs_model.json"
    index = json.loads(path.read_text())
    index["format_version"] = version
    path.write_text(json.dumps(index))
    with pytest.raises(bofrs.FormatError, match="format version"):
        bofrs.load_quantized(tmp_path, Net())


def test_bad_index_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        bofrs.load_quantized(tmp_path, Net())
    bofrs.save_quantized(quantized_net(), tmp_path)
    path = tmp_path / "bofrs_model.json"
    path.write_text("{not json")
    with pytest.raises(bofrs.FormatError, match="unreadable"):
        bofrs.load_quantized(tmp_path, Net())
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(bofrs.FormatError, match="not a bofrs model"):
        bofrs.load_quantized(tmp_path, Net())


def test_missing_shard_and_wrong_skeleton(tmp_path: Path) -> None:
    bofrs.save_quantized(quantized_net(), tmp_path, max_shard_bytes=4000)
    with pytest.raises(ValueError, match="no transformers config"):
        bofrs.load_quantized(tmp_path)
    with pytest.raises(bofrs.FormatError):
        bofrs.load_quantized(tmp_path, nn.Sequential(nn.Linear(64, 96)))
    _shard(tmp_path).unlink()
    with pytest.raises(FileNotFoundError):
        bofrs.load_quantized(tmp_path, Net())


def test_save_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="model"):
        bofrs.save_quantized("net", tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_shard_bytes"):
        bofrs.save_quantized(quantized_net(), tmp_path, max_shard_bytes=0)
