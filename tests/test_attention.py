"""Packed rows: each document attends only to itself, through flex_attention (a BlockMask) or SDPA
(a dense mask), and a packed row computes what each of its documents computes alone.

CPU flex_attention has no backward, so on CPU the flex path is checked forward-only (compiled, as it
runs on GPU) and trains through the dense mask; on a GPU the tests train through flex_attention.
"""

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask

import trainkit.model as model_module
from tests.conftest import TINY_SHAPE
from trainkit.config import ModelConfig
from trainkit.model import Attention, build_model, document_mask, materialize

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Documents of mixed lengths: rows of 32 tokens hold [5, 11, 9 + 7 padding] and [20, 3 + 9 padding].
DOC_LENGTHS = [[5, 11, 9], [20, 3]]
SEQ = 32


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(name="tiny", **(TINY_SHAPE | {"vocab_size": 64} | overrides))


def packed_batch(generator: torch.Generator):
    """Rows as ``trainkit.data`` packs them, and the documents they hold as (input_ids, labels) pairs."""
    rows = {name: torch.zeros(len(DOC_LENGTHS), SEQ, dtype=torch.long) for name in ("ids", "labels", "pos", "doc")}
    documents = []
    for r, lengths in enumerate(DOC_LENGTHS):
        start = 0
        for d, n in enumerate(lengths + [SEQ - sum(lengths)]):  # the padding is one more document
            ids = torch.randint(0, 64, (n,), generator=generator)
            labels = torch.cat([ids[1:], torch.tensor([-100])]) if d < len(lengths) else torch.full((n,), -100)
            rows["ids"][r, start : start + n] = ids
            rows["labels"][r, start : start + n] = labels
            rows["pos"][r, start : start + n] = torch.arange(n)
            rows["doc"][r, start : start + n] = d
            if d < len(lengths):
                documents.append((ids, labels))
            start += n
    return rows, documents


@pytest.mark.parametrize("device", DEVICES)
def test_packed_loss_and_grads_equal_each_document_alone(device, monkeypatch):
    torch.manual_seed(0)
    model = materialize(build_model(tiny_config()), torch.device(device))
    rows, documents = packed_batch(torch.Generator().manual_seed(1))
    rows = {k: v.to(device) for k, v in rows.items()}

    def loss_and_grads(pairs):
        model.zero_grad(set_to_none=True)
        loss = sum(model(**inputs) for inputs in pairs)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    packed = [dict(input_ids=rows["ids"], position_ids=rows["pos"], document_ids=rows["doc"], labels=rows["labels"])]
    alone = [dict(input_ids=ids[None].to(device), labels=labels[None].to(device)) for ids, labels in documents]
    assert isinstance(document_mask(rows["doc"]), BlockMask if device == "cuda" else torch.Tensor)
    loss, grads = loss_and_grads(packed)
    want_loss, want_grads = loss_and_grads(alone)
    tol = {} if device == "cpu" else {"rtol": 1e-4, "atol": 1e-5}  # GPU kernels sum in another order
    torch.testing.assert_close(loss, want_loss, **tol)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, **tol, msg=name)
    if device == "cpu":  # the flex path, forward only
        monkeypatch.setattr(model_module, "FLEX_DEVICES", {"cpu"})
        assert isinstance(document_mask(rows["doc"]), BlockMask)
        with torch.no_grad():
            torch.testing.assert_close(model(**packed[0]), want_loss)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_flex_attention_equals_dense_mask_sdpa(autocast, monkeypatch):
    torch.manual_seed(0)
    cfg = tiny_config()
    attention = materialize(build_model(cfg), torch.device("cpu")).model.layers["0"].self_attn
    assert isinstance(attention, Attention)
    rows, _ = packed_batch(torch.Generator().manual_seed(1))
    x = torch.randn(len(DOC_LENGTHS), SEQ, cfg.hidden_size)
    angles = torch.randn(len(DOC_LENGTHS), 1, SEQ, cfg.hidden_size // cfg.num_heads)
    cos, sin = angles.cos(), angles.sin()
    dense = document_mask(rows["doc"])
    monkeypatch.setattr(model_module, "FLEX_DEVICES", {"cpu"})
    block_mask = document_mask(rows["doc"])
    assert isinstance(dense, torch.Tensor) and isinstance(block_mask, BlockMask)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        want = attention(x, cos, sin, dense)
        got = attention(x, cos, sin, block_mask)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, **({"rtol": 2e-2, "atol": 1e-2} if autocast else {}))
