"""A Llama-family decoder (Llama 2/3, SmolLM2, Qwen2, and with ``trainkit.moe`` Mixtral and Qwen2-MoE),
written to be parallelized.

Parameter names equal transformers' ``LlamaForCausalLM`` names, so HF checkpoints load without a
mapping and peft target names (``q_proj``, ``gate_proj``, ...) mean what users expect. Blocks live
in a ``ModuleDict`` keyed by layer index: names stay stable when a parallel plan wraps or drops
blocks. The model is built on the meta device and materialised with ``init_weights``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from trainkit.config import ModelConfig
from trainkit.cross_entropy import cross_entropy_grad_
from trainkit.moe import Experts, MoE


def head_dim(cfg: ModelConfig) -> int:
    return cfg.head_dim or cfg.hidden_size // cfg.num_heads


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """Inverse RoPE frequencies, with Llama-3 scaling of the long wavelengths when configured."""
    dim = head_dim(cfg)
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


# Devices where packed rows attend through flex_attention; elsewhere (CPU, whose flex_attention has no
# backward) through SDPA with a dense mask.
FLEX_DEVICES = {"cuda"}
# Compiled once per process: eager flex_attention is a reference that materialises the scores; compiled,
# it is a fused kernel that skips the blocks the mask empties (other documents, the future).
compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
# Eager, create_block_mask evaluates the mask function over the batch's (query, key) pairs through vmap,
# host-paced; compiled (as torchtitan does) it is a few fused kernels.
compiled_create_block_mask = torch.compile(create_block_mask)


def document_mask(document_ids: torch.Tensor) -> BlockMask | torch.Tensor:
    """Causal attention within each packed document (``document_ids`` [batch, seq]), built once per
    forward for every layer: a BlockMask on ``FLEX_DEVICES``, else a dense [batch, 1, seq, seq] mask."""
    bsz, seq = document_ids.shape
    if document_ids.device.type not in FLEX_DEVICES:
        causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
        return (causal & (document_ids[:, :, None] == document_ids[:, None, :]))[:, None]

    def same_document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (document_ids[b, q_idx] == document_ids[b, kv_idx])

    return compiled_create_block_mask(same_document_causal, bsz, None, seq, seq, device=document_ids.device)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the compute dtype, as the reference implementations do.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = head_dim(cfg)
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask):
        """``mask``: None (causal), a ``document_mask``: a BlockMask or a dense boolean mask."""
        bsz, seq, _ = x.shape
        # -1 instead of the configured head count: under tensor parallelism each rank holds a slice.
        q = self.q_proj(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        gqa = q.shape[1] != k.shape[1]
        if isinstance(mask, BlockMask):
            device = q.device.type
            if torch.is_autocast_enabled(device):  # autocast casts SDPA's inputs; flex's only from torch 2.13
                q, k, v = (t.to(torch.get_autocast_dtype(device)) for t in (q, k, v))
            out = compiled_flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seq, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, cfg: ModelConfig, intermediate_size: int | None = None):
        super().__init__()
        intermediate_size = intermediate_size or cfg.intermediate_size
        self.gate_proj = nn.Linear(cfg.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def feed_forward(cfg: ModelConfig) -> nn.Module:
    """The dense SwiGLU, or routed experts with an optional always-on shared SwiGLU."""
    if cfg.num_experts == 0:
        return MLP(cfg)
    shared = MLP(cfg, cfg.shared_expert_intermediate_size) if cfg.shared_expert_intermediate_size else None
    return MoE(cfg, shared)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = feed_forward(cfg)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


# Logit elements per chunk of a frozen head's (or a no-grad) loss: with a 128k vocabulary about 500
# tokens, so its logits buffer takes ~128 MB (16-bit) however long the batch is.
LOSS_CHUNK_ELEMENTS = 2**26
# Bytes of a trained head's logits buffer: its [vocab, hidden] gradient is updated once per chunk of
# this size (4 times for a 1B model at 8k tokens), each update a pass over ~1 GB read and written.
LOSS_GROUP_BYTES = 2**29


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` with the gradients of the hidden states and (when
    it trains) of the weight computed in the same pass: logits are neither kept nor recomputed, and
    backward only scales the gradients made here (by the incoming gradient over ``expected_grad``, the
    one they were computed with: nothing to do when the two are equal).

    Per chunk of rows, the logits go into one buffer in the compute dtype, ``cross_entropy_grad_``
    turns them into their gradient in place (float32 softmax inside), and two matmuls give the rows'
    hidden gradient and add into the weight's."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_rows, grad_enabled, weight_grad_to, expected_grad):
        device = hidden.device.type
        # Autocast's matmul dtype, applied by hand (autocast is off below). ``.to`` is a no-op where the
        # dtype already matches; a float32 master weight gets one low-precision copy for the whole loss.
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        need_h, need_w = (grad_enabled and t.requires_grad for t in (hidden, weight))
        vocab, n = weight.shape[0], labels.numel()
        w = weight.to(dtype)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        # In the compute dtype, updated in place once per chunk: rounded a few times where autograd's
        # full-logits matmul rounds once. A float32 weight gets its float32 copy in backward, after
        # autocast has freed its weight copies, not at the forward's peak.
        grad_w = torch.empty(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        if need_w:
            chunk_rows = max(chunk_rows, LOSS_GROUP_BYTES // (vocab * w.element_size()))
        logits = torch.empty(min(chunk_rows, n), vocab, dtype=dtype, device=hidden.device)
        with torch.autocast(device, enabled=False):
            for i in range(0, n, chunk_rows):
                h, target = hidden[i : i + chunk_rows].to(dtype), labels[i : i + chunk_rows]
                dlogits = torch.mm(h, w.t(), out=logits[: len(h)])
                loss += cross_entropy_grad_(dlogits, target, expected_grad).sum()  # now the logits' gradient
                ignored = (target == -100)[:, None]  # zeroed on [rows, hidden], not [rows, vocab]
                if need_h:
                    grad_h[i : i + chunk_rows] = (dlogits @ w).masked_fill_(ignored, 0)
                if need_w:  # the first chunk writes, the others add: no pass to zero it first
                    grad_w.addmm_(dlogits.t(), h.masked_fill(ignored, 0), beta=int(i > 0))
        # Attributes, not saved tensors: gradients, not activations, so activation offloading leaves them.
        ctx.grads, ctx.dtypes = (grad_h, grad_w), (hidden.dtype, weight.dtype)
        ctx.weight_grad_to, ctx.expected_grad = weight_grad_to, expected_grad
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None
        # In place: they are used once (the trainer never backpropagates this graph twice). Computed
        # times ``expected_grad`` already: when that is the gradient that arrives, the factor is 1.
        factor = grad_loss if ctx.expected_grad is None else grad_loss / ctx.expected_grad
        scaled = [g if g is None else g.to(t) for g, t in zip(grads, ctx.dtypes)]
        for g in scaled:
            if g is not None:
                scale_grad_(g, factor)
        grad_h, grad_w = scaled
        if ctx.weight_grad_to is not None:  # a tied embedding's backward adds its rows and returns it
            ctx.weight_grad_to.append(grad_w)
            grad_w = None
        return grad_h, grad_w, None, None, None, None, None


def scale_grad_(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """``grad *= factor`` (a float32 scalar on its device) in place. On CUDA a Triton kernel that
    skips a factor of 1 (a launch instead of a pass over a 128k-vocabulary head's gradient, ~0.5 ms on
    an H100); elsewhere a foreach kernel, which reads the scalar once per block, not per element."""
    if grad.is_cuda:
        from trainkit.triton_kernels import scale_  # triton loads on the first CUDA call

        scale_(grad, factor)
    else:
        torch._foreach_mul_([grad], factor.to(grad.dtype))


class TiedEmbedding(torch.autograd.Function):
    """The lookup of an embedding shared with a trained output head (``LinearCrossEntropy``): backward
    adds the looked-up rows' gradients into the head's [vocab, hidden] gradient in place and returns it
    as the weight's one gradient. Autograd would instead build a dense embedding gradient (a zero fill
    and a scatter) and add the two: for a 1B model ~0.7 ms a step on an H100."""

    @staticmethod
    def forward(ctx, ids, weight, head_grad: list):
        ctx.save_for_backward(ids)
        ctx.head_grad, ctx.weight_meta = head_grad, (weight.shape, weight.dtype, weight.device)
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        shape, dtype, device = ctx.weight_meta
        # Empty when backward starts from something other than the loss (the head gives no gradient).
        grad_w = ctx.head_grad.pop() if ctx.head_grad else torch.zeros(shape, dtype=dtype, device=device)
        add_rows_(grad_w, ids.flatten(), grad_out.flatten(0, -2))
        return None, grad_w, None


def add_rows_(out: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out[index[i]] += rows[i]`` for every i, the rows of a repeated index summed in float32 and
    added with one rounding, without a host synchronisation: a sort groups equal indices into
    segments, one float32 sum per segment, and every position of a segment stores the same new row
    (plain stores: CUDA's accumulating ``index_put_`` took 0.6 ms for 8k rows of 2048 on an H100)."""
    sorted_index, order = index.sort()
    starts = torch.ones_like(sorted_index, dtype=torch.bool)
    starts[1:] = sorted_index[1:] != sorted_index[:-1]
    segment = starts.cumsum(0) - 1
    sums = rows.new_zeros(rows.shape, dtype=torch.float32).index_add_(0, segment, rows[order].float())
    out[sorted_index] = (out[sorted_index].float() + sums[segment]).to(out.dtype)
    return out


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head: nn.Linear,
    labels: torch.Tensor,
    chunk_elements: int = LOSS_CHUNK_ELEMENTS,
    weight_grad_to: list | None = None,
    expected_grad: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of ``head(hidden)`` against ``labels`` (-100 ignored), a few hundred or
    thousand tokens at a time, so the full [tokens, vocab] logits (and any float32 copy) never exist.
    With ``weight_grad_to`` (a ``TiedEmbedding``'s list) the head's gradient goes there, not to autograd.
    ``expected_grad``: the gradient the caller will backpropagate into the loss (a float32 scalar on the
    device, such as 1 / tokens); the gradients are computed times it, so backward has nothing to
    scale when it arrives. A hint only: any other gradient is still applied exactly."""
    chunk_rows = max(1, chunk_elements // head.out_features)
    return LinearCrossEntropy.apply(
        hidden.flatten(0, -2),
        head.weight,
        labels.flatten(),
        chunk_rows,
        torch.is_grad_enabled(),
        weight_grad_to,
        expected_grad,
    )


class Decoder(nn.Module):
    """Embedding, blocks and final norm: the ``model.`` prefix of HF checkpoints."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.num_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        # Not persistent: derived from the config, recomputed by init_weights after to_empty.
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def tie_weights(self) -> None:
        """Share the embedding with the output head; ``to_empty`` unties them, so call it after."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random init in place; also refills the RoPE buffer, in float32 whatever the weights' dtype."""
        self.register_buffer("inv_freq", rope_inv_freq(self.cfg, device=self.inv_freq.device), persistent=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, Experts):
                for param in module.parameters():
                    nn.init.normal_(param, mean=0.0, std=self.cfg.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        expected_grad: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for ``input_ids`` [batch, seq], or with ``labels`` (same shape, pre-shifted, -100
        ignored) their summed cross-entropy, computed in chunks so full logits never exist
        (``expected_grad``: ``chunked_cross_entropy``'s).

        ``position_ids`` restart at 0 for each packed document; ``document_ids`` (same shape) limit
        attention to tokens of the same document. Without them a row is one causal sequence.
        """
        bsz, seq = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(seq, device=input_ids.device).expand(bsz, seq)
        freqs = position_ids[..., None].float() * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # [batch, 1, seq, head_dim]
        embed = self.model.embed_tokens
        head_grad = [] if labels is not None and self.hands_head_grad_to_embedding() else None
        h = embed(input_ids) if head_grad is None else TiedEmbedding.apply(input_ids, embed.weight, head_grad)
        cos, sin = angles.cos().to(h.dtype), angles.sin().to(h.dtype)
        mask = None if document_ids is None else document_mask(document_ids)
        for block in self.model.layers.values():
            h = block(h, cos, sin, mask)
        h = self.model.norm(h)
        if labels is None:
            return self.lm_head(h)
        return chunked_cross_entropy(h, self.lm_head, labels, weight_grad_to=head_grad, expected_grad=expected_grad)

    def hands_head_grad_to_embedding(self) -> bool:
        """Whether the loss's head gradient goes to a ``TiedEmbedding``: a tied weight that trains, not
        a DTensor (tensor parallelism shards the embedding and the head differently)."""
        weight = self.model.embed_tokens.weight
        return (
            self.lm_head.weight is weight
            and weight.requires_grad
            and torch.is_grad_enabled()
            and not isinstance(weight, DTensor)
        )

    def moe_aux_loss(self) -> torch.Tensor:
        """Mean load-balancing loss of the MoE layers in the last forward (0 without experts); the
        training loss adds ``router_aux_loss_coef`` times it."""
        losses = [m.aux_loss for m in self.modules() if isinstance(m, MoE)]
        return torch.stack(losses).mean() if losses else torch.zeros((), device=self.inv_freq.device)

    def moe_drop_counts(self) -> tuple[int, int]:
        """Token-slots the MoE layers dropped over capacity in the last forward, and all they routed."""
        layers = [m for m in self.modules() if isinstance(m, MoE)]
        return sum(m.dropped for m in layers), sum(m.routed for m in layers)


def build_model(cfg: ModelConfig) -> Transformer:
    """The model on the meta device: no memory is touched until a parallel plan materialises it."""
    with torch.device("meta"):
        return Transformer(cfg)


def set_param_dtypes(model: Transformer, trainable: torch.dtype, frozen: torch.dtype) -> Transformer:
    """Give trained weights (and so optimizer states) ``trainable``'s dtype and frozen ones ``frozen``'s.

    Meant for the meta-device model, before a parallel plan wraps its parameters; QLoRA's packed
    storage already has the frozen dtype and is left alone.
    """
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            dtype = trainable if param.requires_grad else frozen
            if param.dtype != dtype:
                module.register_parameter(name, nn.Parameter(param.to(dtype), requires_grad=param.requires_grad))
    model.tie_weights()
    return model


def materialize(model: Transformer, device: torch.device) -> Transformer:
    model.to_empty(device=device)
    model.tie_weights()
    model.init_weights()
    return model


def num_params(model: nn.Module, exclude_embedding: bool = False) -> int:
    seen = {id(p): p for p in model.parameters()}  # tied weights count once
    total = sum(p.numel() for p in seen.values())
    if exclude_embedding:
        total -= model.model.embed_tokens.weight.numel()
    return total
