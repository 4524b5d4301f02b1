"""The model's own loss path: chunked cross-entropy equals cross-entropy on full logits."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainkit.model import chunked_cross_entropy


@pytest.mark.parametrize("head_trains", [True, False], ids=["trained_head", "frozen_head"])
def test_chunked_cross_entropy_equals_full_logits_loss_and_grads(head_trains):
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False).requires_grad_(head_trains)
    hidden = torch.randn(2, 37, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 37))
    labels[0, :5] = -100
    wrt = (hidden, head.weight) if head_trains else (hidden,)
    full = F.cross_entropy(head(hidden).flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    full_grads = torch.autograd.grad(2 * full, wrt)
    chunked = chunked_cross_entropy(hidden, head, labels, chunk_elements=50 * 8)  # 10 chunks of 8 tokens
    chunked_grads = torch.autograd.grad(2 * chunked, wrt)
    torch.testing.assert_close(chunked, full)
    for got, want in zip(chunked_grads, full_grads):
        torch.testing.assert_close(got, want)
    with torch.no_grad():
        torch.testing.assert_close(chunked_cross_entropy(hidden, head, labels, chunk_elements=50 * 8), full)
