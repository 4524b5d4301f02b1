"""The model's own loss path: the fused chunked cross-entropy equals cross-entropy on full logits."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import TINY_SHAPE
from trainkit import model as model_module
from trainkit.config import ModelConfig
from trainkit.model import build_model, chunked_cross_entropy, materialize

# bf16 logits and gradients round at 2**-8 relative; sums over ~100 tokens stay well inside these.
TOLERANCE = {torch.float32: {}, torch.bfloat16: {"rtol": 2e-2, "atol": 5e-4}}


def reference_loss(hidden, head, labels):
    """Cross-entropy on the full logits, as the tensor-parallel path computes it."""
    logits = head(hidden).flatten(0, 1).float()
    return F.cross_entropy(logits, labels.flatten(), ignore_index=-100, reduction="sum")


def tied_setup(tied: bool, head_trains: bool, param_dtype: torch.dtype):
    torch.manual_seed(0)
    embed = nn.Embedding(50, 16).to(param_dtype)
    head = nn.Linear(16, 50, bias=False).to(param_dtype)
    if tied:
        head.weight = embed.weight
    head.weight.requires_grad_(head_trains)
    ids = torch.randint(0, 50, (2, 37))
    labels = torch.randint(0, 50, (2, 37))
    labels[0, :5] = -100
    labels[1, -3:] = -100
    return embed, head, ids, labels


PRECISIONS = pytest.mark.parametrize(
    "param_dtype,autocast",
    [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)],
    ids=["fp32", "bf16_autocast_fp32_master", "bf16_weights"],
)


@pytest.mark.parametrize("head_trains", [True, False], ids=["trained_head", "frozen_head"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@PRECISIONS
def test_chunked_cross_entropy_equals_full_logits_loss_and_grads(head_trains, tied, param_dtype, autocast):
    check_against_full_logits(head_trains, tied, param_dtype, autocast)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@PRECISIONS
def test_trained_head_chunks_are_loss_group_bytes(monkeypatch, tied, param_dtype, autocast):
    """A trained head's chunks are LOSS_GROUP_BYTES of logits (here 24 rows), not the 8 rows that
    ``chunk_elements`` gives a frozen one: each micro-batch of 37 tokens is a full chunk and a short one."""
    compute_dtype = torch.bfloat16 if autocast else param_dtype
    monkeypatch.setattr(model_module, "LOSS_GROUP_BYTES", 3 * 8 * 50 * compute_dtype.itemsize)
    calls = []
    addmm_ = torch.Tensor.addmm_
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda g, d, h, **kw: calls.append(len(h)) or addmm_(g, d, h, **kw))
    check_against_full_logits(True, tied, param_dtype, autocast)
    assert calls == [24, 13, 24, 13]  # two micro-batches of 37 tokens


def check_against_full_logits(head_trains, tied, param_dtype, autocast):
    embed, head, ids, labels = tied_setup(tied, head_trains, param_dtype)
    scale = torch.randn(16, dtype=param_dtype, requires_grad=True)  # something before the head that trains
    params = [p for p in {id(p): p for p in (embed.weight, head.weight, scale)}.values() if p.requires_grad]
    low = param_dtype != torch.float32 or autocast

    def run(loss_fn):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            hidden = embed(ids) * scale
            # Two micro-batches, each divided by the token count, accumulate as the trainer does.
            for part in (slice(0, 1), slice(1, 2)):
                loss = loss_fn(hidden[part], head, labels[part])
                (loss / 70).backward(retain_graph=part.start == 0)
                yield loss.detach()

    want = list(run(reference_loss))
    want_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    got = list(run(lambda h, m, y: chunked_cross_entropy(h, m, y, chunk_elements=50 * 8)))  # 8-token chunks
    tol = TOLERANCE[torch.bfloat16 if low else torch.float32]
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, **tol)
    for p, w in zip(params, want_grads):
        assert p.grad.dtype == p.dtype
        # A gradient summed over tokens in bfloat16 is off by steps of its largest terms, not of itself
        # where they cancel: torch 2.11's CPU kernels put one element of the vector's 0.002 (4 %) off.
        grad_tol = {**tol, "atol": max(tol["atol"], 2**-8 * w.abs().max().item())} if low else tol
        torch.testing.assert_close(p.grad.float(), w.float(), **grad_tol)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        hidden = embed(ids) * scale
        loss = chunked_cross_entropy(hidden, head, labels, chunk_elements=50 * 8)
        assert loss.grad_fn is None
        torch.testing.assert_close(loss, reference_loss(hidden, head, labels), **tol)


@pytest.mark.parametrize("multiplier", [1.0, 3.0], ids=["as_expected", "another_gradient"])
@PRECISIONS
def test_expected_grad_is_a_hint(multiplier, param_dtype, autocast):
    """Gradients computed times ``expected_grad`` in forward equal those computed without it, whether
    backward brings that gradient (nothing left to scale) or another one (scaled by their ratio)."""
    embed, head, ids, labels = tied_setup(True, True, param_dtype)
    expected = torch.tensor(1 / 70)

    def loss_and_grad(**hint):
        embed.weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = chunked_cross_entropy(embed(ids), head, labels, chunk_elements=50 * 8, **hint)
        (loss * expected * multiplier).backward()
        return loss.detach(), embed.weight.grad

    want_loss, want = loss_and_grad()
    got_loss, got = loss_and_grad(expected_grad=expected)
    assert torch.equal(got_loss, want_loss)
    tol = dict(TOLERANCE[torch.bfloat16 if param_dtype != torch.float32 or autocast else torch.float32])
    if "atol" in tol:
        tol["atol"] *= multiplier  # bfloat16 steps of gradients `multiplier` times larger
    torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_model_loss_equals_full_logits_loss(tied, autocast):
    """The whole model's ``labels=`` path gives every parameter the gradient of the full-logits loss."""
    cfg = ModelConfig(name="tiny", **TINY_SHAPE, vocab_size=96, tie_embeddings=tied)
    torch.manual_seed(0)
    model = materialize(build_model(cfg), torch.device("cpu"))
    ids = torch.randint(0, 96, (2, 24))
    labels = torch.randint(0, 96, (2, 24))
    labels[:, :4] = -100

    def grads(loss_fn):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    def full():
        logits = model(ids).flatten(0, 1).float()
        return F.cross_entropy(logits, labels.flatten(), ignore_index=-100, reduction="sum")

    want, want_grads = grads(full)
    got, got_grads = grads(lambda: model(ids, labels=labels))
    tol = TOLERANCE[torch.bfloat16 if autocast else torch.float32]
    torch.testing.assert_close(got, want, **tol)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], **tol, msg=name)


def test_add_rows_sums_a_repeated_index_in_float32_and_adds_once():
    """The rows of one index summed in float32 and added with one rounding. Added one by one in
    bfloat16, 500 rows of one index drift away from this."""
    torch.manual_seed(0)
    out = torch.randn(10, 8).bfloat16()
    index = torch.tensor([3] * 500 + [7, 0, 7, 9])
    rows = torch.randn(len(index), 8).bfloat16()
    want = (out.float() + torch.zeros(10, 8).index_add_(0, index, rows.float())).bfloat16()
    assert torch.equal(model_module.add_rows_(out.clone(), index, rows), want)
    one_by_one = out.clone()
    for i, row in zip(index, rows):
        one_by_one[i] += row
    assert not torch.equal(one_by_one, want)
