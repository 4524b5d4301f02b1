"""Expert parallelism against one process; tests/test_moe.py runs ``torchrun tests/dist_moe.py WORKDIR``.

WORKDIR/setup.pt holds two configs with their weights and one batch per rank (per step); each rank
writes WORKDIR/rank<r>.pt: its logits, loss and gradients (of the expert stacks, its own experts;
of the rest, summed over ranks), and the losses and gradient norms of a few clipped AdamW steps.
The test computes the same in one process, from the same functions.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from parallel.expert_parallel import apply_ep, clip_grad_norm_
from trainkit.model import build_model, materialize


def build(cfg, state):
    model = materialize(build_model(cfg), torch.device("cpu"))
    model.load_state_dict(state)
    return model


def loss_of(model, ids, num_ranks):
    """This rank's share of the global loss: token-mean cross-entropy over all ranks plus the mean aux loss."""
    logits = model(ids)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    aux = model.cfg.router_aux_loss_coef * model.moe_aux_loss()
    return logits, (ce / ids[:, 1:].numel() + aux) / num_ranks


def sum_dense_grads(model):
    """Gradients of the replicated parameters summed over ranks; expert stacks are complete already."""
    for param in model.parameters():
        if not isinstance(param, DTensor):
            dist.all_reduce(param.grad)


def train(model, steps, ranks, clip):
    """Loss and gradient norm of AdamW steps on the summed loss of ``ranks``' batches (``steps[i][rank]``),
    the norm clipped to 0.1 by ``clip``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for batches in steps:
        loss = sum(loss_of(model, batches[rank], len(batches))[1] for rank in ranks)
        loss.backward()
        loss = loss.detach()
        if dist.is_initialized():
            sum_dense_grads(model)
            dist.all_reduce(loss)
        norm = clip(model.parameters(), 0.1)
        optimizer.step()
        optimizer.zero_grad()
        losses.append((loss.item(), norm.item()))
    return losses


def main(workdir: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    setup = torch.load(workdir / "setup.pt", weights_only=False)

    model = build(setup["cfg"], setup["state"])
    apply_ep(model, mesh)
    logits, loss = loss_of(model, setup["batches"][rank], world)
    loss.backward()
    sum_dense_grads(model)
    grads = {name: p.grad.to_local() if isinstance(p, DTensor) else p.grad for name, p in model.named_parameters()}

    model = build(setup["train_cfg"], setup["train_state"])
    apply_ep(model, mesh)
    losses = train(model, setup["steps"], [rank], clip_grad_norm_)
    torch.save({"logits": logits, "loss": loss, "grads": grads, "losses": losses}, workdir / f"rank{rank}.pt")
    dist.barrier()  # no rank tears its connections down while another still talks on them
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
