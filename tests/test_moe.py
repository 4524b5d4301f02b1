import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from dist_moe import build, loss_of, train  # the torchrun driver next to this file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from trainkit.config import ConfigError, ModelConfig
from trainkit.model import build_model, materialize
from trainkit.moe import MoE
from trainkit.weights import check_model_matches, export_hf, load_hf_weights, model_config_from_hf

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def tiny(**overrides) -> ModelConfig:
    shape = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48, vocab_size=128)
    return ModelConfig(name="tiny-moe", **(shape | dict(num_experts=8, num_experts_per_tok=2) | overrides))


def random_model(cfg: ModelConfig):
    torch.manual_seed(0)
    model = materialize(build_model(cfg), CPU)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # init leaves these constant, which would hide mix-ups
                param.add_(torch.randn_like(param) * 0.1)
            if name.endswith("mlp.gate.weight"):  # decisive routing, so top-k never hangs on rounding
                param.normal_()
    return model.eval()


def load_ours(folder):
    model = materialize(build_model(model_config_from_hf(folder)), CPU)
    load_hf_weights(model, folder)
    return model.eval()


def moe_layers(model) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def assert_exports_to_transformers(model, folder, architecture):
    export_hf(model, folder, dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(theirs).__name__ == architecture
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        assert (theirs(ids).logits - model(ids)).abs().max() <= 1e-4
    check_model_matches(model.cfg, folder)
    reloaded = load_ours(folder)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_mixtral_export_loads_in_transformers(tmp_path):
    cfg = tiny()
    assert_exports_to_transformers(random_model(cfg), tmp_path, "MixtralForCausalLM")
    with pytest.raises(ConfigError, match="model.num_experts=4"):
        check_model_matches(replace(cfg, num_experts=4), tmp_path)


def test_transformers_mixtral_loads_with_same_logits_and_aux_loss(tmp_path):
    hf_cfg = MixtralConfig(
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        vocab_size=128,
        rope_theta=10000.0,
        initializer_range=0.5,  # decisive routing
    )
    torch.manual_seed(0)
    MixtralForCausalLM(hf_cfg).save_pretrained(tmp_path)  # written per expert, as hub checkpoints are
    theirs = MixtralForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = load_ours(tmp_path)
    assert (ours.cfg.num_experts, ours.cfg.intermediate_size) == (8, 48)
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        out = theirs(ids, output_router_logits=True)
        assert (out.logits - ours(ids)).abs().max() <= 1e-4
    # transformers pools the layers before its product; the per-layer losses are the Switch formula.
    want = [load_balancing_loss_func((logits,), 8, 2) for logits in out.router_logits]
    assert_close(torch.stack([m.aux_loss for m in moe_layers(ours)]), torch.stack(want), rtol=0, atol=1e-5)
    assert_close(ours.moe_aux_loss(), torch.stack(want).mean(), rtol=0, atol=1e-5)
    assert ours.moe_drop_counts() == (0, 2 * ids.numel() * 2)  # layers x tokens x top-k, none dropped


def test_qwen2_moe_shared_expert_matches_transformers(tmp_path):
    cfg = tiny(qkv_bias=True, moe_intermediate_size=24, shared_expert_intermediate_size=40)
    model = random_model(cfg)
    assert_exports_to_transformers(model, tmp_path, "Qwen2MoeForCausalLM")
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        logits = model(ids)
        for moe in moe_layers(model):
            moe.shared_expert.down_proj.weight.zero_()
        assert (model(ids) - logits).abs().max() > 1e-3


def test_capacity_drops_the_last_slots_of_full_experts():
    cfg = tiny(hidden_size=8, intermediate_size=4, num_experts=4, capacity_factor=1.0)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.experts.gate_up_proj)
    torch.nn.init.normal_(moe.experts.down_proj)
    # Token t is the basis vector e_t, so gate column t is its logits: 2 for its first choice, 1 for its second.
    routes = [(0, 1), (0, 2), (0, 1), (0, 3), (1, 0), (2, 3)]
    with torch.no_grad():
        moe.gate.weight.zero_()
        for t, (first, second) in enumerate(routes):
            moe.gate.weight[first, t], moe.gate.weight[second, t] = 2.0, 1.0
    x = torch.eye(8)[:6]

    def expert(e, v):
        gate, up = (moe.experts.gate_up_proj[e] @ v).chunk(2)
        return moe.experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up)

    def expected(dropped):
        weights = (math.e / (math.e + 1), 1 / (math.e + 1))
        return torch.stack(
            [
                sum(w * expert(e, x[t]) for w, e in zip(weights, route) if (t, e) not in dropped)
                for t, route in enumerate(routes)
            ]
        )

    # Capacity ceil(1.0 * 6 tokens * 2 / 4 experts) = 3. First choices claim it before second choices:
    # expert 0 takes the first choices of tokens 0-2 and drops token 3's and token 4's second choice.
    with torch.no_grad():
        assert_close(moe(x[None])[0], expected({(3, 0), (4, 0)}))
        assert (moe.dropped, moe.routed) == (2, 12)
        moe.capacity_factor = 0.0
        assert_close(moe(x[None])[0], expected(set()))
        assert (moe.dropped, moe.routed) == (0, 12)


def test_expert_parallel_matches_one_process(tmp_path):
    cfg = tiny(hidden_size=32, intermediate_size=24, vocab_size=64)
    train_cfg = replace(cfg, capacity_factor=1.0, shared_expert_intermediate_size=16)
    torch.manual_seed(0)
    setup = {
        "cfg": cfg,
        "state": random_model(cfg).state_dict(),
        "batches": torch.randint(0, 64, (2, 2, 16)),  # [rank, row, token]
        "train_cfg": train_cfg,
        "train_state": random_model(train_cfg).state_dict(),
        "steps": torch.randint(0, 64, (3, 2, 2, 16)),  # [step, rank, row, token]
    }
    torch.save(setup, tmp_path / "setup.pt")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*torchrun, "tests/dist_moe.py", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    model = build(cfg, setup["state"])
    for rank, got in enumerate(ranks):
        logits, loss = loss_of(model, setup["batches"][rank], 2)
        loss.backward()
        assert_close(got["logits"], logits, rtol=1e-5, atol=1e-6)
        assert_close(got["loss"], loss, rtol=1e-5, atol=0)
    for name, param in model.named_parameters():
        for rank, got in enumerate(ranks):
            # Each rank holds 4 of the 8 experts; gradients of the rest are summed over ranks.
            want = param.grad.chunk(2)[rank] if ".experts." in name else param.grad
            assert_close(got["grads"][name], want, rtol=1e-5, atol=1e-7, msg=name)

    model = build(train_cfg, setup["train_state"])
    losses = train(model, setup["steps"], range(2), torch.nn.utils.clip_grad_norm_)
    assert model.moe_drop_counts()[0] > 0  # capacity dropped slots: EP must drop the same ones
    assert all(norm > 0.1 for _, norm in losses)  # so clipping scaled every step
    for got in ranks:
        assert_close(torch.tensor(got["losses"]), torch.tensor(losses), rtol=1e-5, atol=0)
