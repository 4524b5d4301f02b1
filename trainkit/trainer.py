"""The training loop: spec → tokenizer and data → model → parallelize → weights → steps.

The loss of a step is the mean over every label token of the global batch (all ranks, all
micro-batches), so any split of the same global batch over ranks and accumulation steps gives the
same gradients as one process.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

from parallel.engine import build_engine
from parallel.mesh import World, all_reduce_sum, barrier, close_world, init_world
from parallel.parallelize import activation_offload, loss_context, parallelize, unwrap
from trainkit.checkpoint import Checkpointer
from trainkit.data import StepSampler, TokenRows, build_datasets
from trainkit.metrics import MetricsLog, cuda_memory, flops_per_token, peak_flops
from trainkit.model import build_model
from trainkit.spec import JobSpec
from trainkit.weights import check_model_matches, load_hf_weights, load_tokenizer, prepare_hf_folder, save_hf_state_dict


def remove_run(out: Path, metrics_file: str) -> None:
    """What an earlier run wrote into ``out`` (and only that: the folder may hold the user's files)."""
    for name in ("checkpoints", "hf", "adapter", "wandb"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (metrics_file, "config.yaml"):
        (out / name).unlink(missing_ok=True)


class Trainer:
    def __init__(self, spec: JobSpec):
        self.spec = spec
        cfg = spec.cfg
        self.world: World = init_world(spec.device_type, spec.dims)
        self.out: Path = spec.output_dir
        # Rank 0 converts weights and tokenizes first; the others wait, then read its caches.
        if not self.world.is_main:
            barrier()
        weights_dir = None
        if cfg.model.source is not None:
            weights_dir = prepare_hf_folder(cfg.model.source, cfg.cache_dir, field="model.source")
            check_model_matches(cfg.model, weights_dir)
        self.tokenizer_dir = weights_dir
        if cfg.model.tokenizer is not None:
            self.tokenizer_dir = prepare_hf_folder(cfg.model.tokenizer, cfg.cache_dir, field="model.tokenizer")
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        self.train_rows, self.eval_rows = build_datasets(cfg.data, self.tokenizer, cfg.cache_dir)
        if self.world.is_main:
            barrier()
        self.sampler = StepSampler(len(self.train_rows), spec.global_batch_size, cfg.data.seed)

        torch.manual_seed(cfg.train.seed)  # identical random init on every rank and world size
        model = build_model(cfg.model)
        self.adapters = cfg.peft.method != "none"
        if self.adapters:
            # peft and bitsandbytes take ~2 s to import (on every rank): only adapter jobs pay it.
            from lora import apply_adapters, init_adapters, load_weights

            apply_adapters(model, spec)  # before the parallel plan, so it shards them with their blocks
        model = parallelize(model, spec, self.world)
        if self.adapters:  # without weights: QLoRA still quantizes a random base
            load_weights(unwrap(model), weights_dir, spec, self.world.device)
        elif weights_dir is not None:
            load_hf_weights(unwrap(model), weights_dir)
        if self.adapters:
            torch.manual_seed(cfg.train.seed)  # the same adapter init on every rank
            init_adapters(unwrap(model), cfg.peft)
        self.weights_dir = weights_dir
        self.engine = build_engine(model, spec, self.world)
        self.checkpointer = Checkpointer(self.out, self.world)
        self.step = 0
        if cfg.train.resume and (latest := self.checkpointer.latest()) is not None:
            self.step = self.checkpointer.load(latest, self.engine)
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_flops = peak_flops(self.world.device, cfg.logging)
        self.metrics = None
        if self.world.is_main:
            if cfg.train.overwrite and self.step == 0:
                remove_run(self.out, cfg.logging.metrics_file)
            self.out.mkdir(parents=True, exist_ok=True)
            resolved = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
            OmegaConf.save(OmegaConf.create(resolved), self.out / "config.yaml")
            self.metrics = MetricsLog(self.out, cfg.logging, resolved)

    def _autocast(self):
        dtype = self.spec.compute_dtype
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.spec.device_type, dtype=dtype)

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed cross-entropy of one micro-batch; labels come pre-shifted from the data pipeline."""
        packed = self.spec.cfg.data.pack
        inputs = {"position_ids": batch["position_ids"], "document_ids": batch["document_ids"] if packed else None}
        with self._autocast():
            if self.spec.dims.tp == 1:  # the model computes the loss in chunks: no full logits
                return self.engine.model(batch["input_ids"], labels=batch["labels"], **inputs)
            logits = self.engine.model(batch["input_ids"], **inputs)
        # Vocabulary-sharded logits under tensor parallelism: loss_parallel gives a replicated DTensor.
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100, reduction="sum"
        )
        return loss.full_tensor()

    def _to_device(self, rows: TokenRows, indices: list[int]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.world.device, non_blocking=True) for k, v in rows.batch(indices).items()}

    def train_step(self) -> dict:
        t, world = self.spec.cfg.train, self.world
        micro = self.sampler.micro_batches(self.step, world.dp_rank, self.spec.dp_size, t.grad_accum_steps)
        batches = [self._to_device(self.train_rows, idx) for idx in micro]
        local_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
        label_tokens = torch.tensor([local_tokens], dtype=torch.float64, device=world.device)
        label_tokens = all_reduce_sum(label_tokens, world.dp_mesh).item()
        # Data-parallel backends average gradients over dp ranks; scaling by dp makes that a mean
        # over every label token of the global batch. TP ranks share a batch and a loss.
        scale = self.spec.dp_size / label_tokens
        losses = torch.zeros(2, dtype=torch.float64, device=world.device)  # CE and MoE aux, summed
        slots = [0, 0]  # MoE token-slots dropped over capacity, and routed
        aux_weight = self.spec.cfg.model.router_aux_loss_coef / t.grad_accum_steps
        model = unwrap(self.engine.model)
        for i, batch in enumerate(batches):
            self.engine.set_gradient_sync(i == len(batches) - 1)
            with loss_context(self.spec), activation_offload(self.spec.cfg.ac, world.device):
                loss = self._loss_sum(batch)
                aux = model.moe_aux_loss()  # the load balance of this micro-batch's routing; 0 if dense
                self.engine.backward(loss * scale + aux * aux_weight)
            losses += torch.stack([loss.detach(), aux.detach()])
            slots = [total + n for total, n in zip(slots, model.moe_drop_counts())]
        lr = self.engine.lr
        grad_norm = self.engine.step()
        totals = torch.cat([losses, torch.tensor(slots, dtype=torch.float64, device=world.device)])
        loss, aux, dropped, routed = all_reduce_sum(totals, world.dp_mesh).tolist()
        record = {"loss": loss / label_tokens, "grad_norm": grad_norm, "lr": lr, "label_tokens": int(label_tokens)}
        if routed:
            record["moe_aux_loss"] = aux / (t.grad_accum_steps * self.spec.dp_size)
            record["moe_dropped_fraction"] = dropped / routed
        return record

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean token loss over the first ``eval_batches`` global batches of eval rows, in order.

        Sized by the global batch, so every split over ranks and micro-batches sees the same rows.
        """
        t = self.spec.cfg.train
        n = len(self.eval_rows)
        if n == 0:
            return None
        self.engine.model.eval()
        per_rank = self.spec.global_batch_size // self.spec.dp_size
        totals = torch.zeros(2, dtype=torch.float64, device=self.world.device)
        for b in range(t.eval_batches):
            start = b * self.spec.global_batch_size + self.world.dp_rank * per_rank
            mine = [i % n for i in range(start, start + per_rank)]
            for m in range(0, per_rank, t.micro_batch_size):
                batch = self._to_device(self.eval_rows, mine[m : m + t.micro_batch_size])
                with loss_context(self.spec):
                    totals[0] += self._loss_sum(batch).double()
                totals[1] += (batch["labels"] != -100).sum()
        self.engine.model.train()
        all_reduce_sum(totals, self.world.dp_mesh)
        return (totals[0] / totals[1]).item()

    def _record(self, stats: dict, step_time: float) -> dict:
        tokens_per_s = self.spec.tokens_per_step / step_time
        mfu = None
        if self.peak_flops is not None:
            mfu = self.flops_per_token * tokens_per_s / (self.peak_flops * self.world.size)
        return {
            "step": self.step,
            **stats,
            "step_time_s": step_time,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu,
            **cuda_memory(self.world.device),
        }

    def _is_due(self, every: int) -> bool:
        return self.step == self.spec.cfg.train.steps or (every > 0 and self.step % every == 0)

    def fit(self, stop_at: int | None = None) -> dict:
        """Train to ``train.steps``; ``stop_at`` ends early after checkpointing that step (for tests
        and pre-emption), leaving the rest to a resumed run."""
        t = self.spec.cfg.train
        stop_at = t.steps if stop_at is None else stop_at
        if self.step == 0:
            baseline = self.evaluate()  # the eval loss to fall from
            if self.metrics is not None and baseline is not None:
                self.metrics.write({"step": 0, "eval_loss": baseline})
        self.engine.model.train()
        bar = tqdm(
            total=t.steps,
            initial=self.step,
            disable=not (self.world.is_main and self.spec.cfg.logging.progress_bar),
            dynamic_ncols=True,
        )
        record: dict = {}
        while self.step < stop_at:
            if self.spec.device_type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            stats = self.train_step()
            if self.spec.device_type == "cuda":
                torch.cuda.synchronize()
            self.step += 1
            record = self._record(stats, time.perf_counter() - start)
            if self._is_due(t.eval_every):
                record["eval_loss"] = self.evaluate()
            if self.metrics is not None and (self._is_due(t.log_every) or "eval_loss" in record):
                self.metrics.write(record)
            bar.set_postfix(
                loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}"
            )
            bar.update(1)
            if self._is_due(t.checkpoint_every) or self.step == stop_at:
                self.checkpointer.save(self.engine, self.step)
        bar.close()
        if self.step < t.steps:
            return record
        if self.adapters:  # peft's format; lora.merge_adapters gives the merged model
            from lora import save_adapter

            save_adapter(unwrap(self.engine.model), self.out / "adapter", self.weights_dir)  # a collective
        elif t.export_hf:
            weights = self.engine.full_state_dict()  # a collective: every rank gathers
            if self.world.is_main:
                save_hf_state_dict(weights, self.spec.cfg.model, self.out / "hf", tokenizer_folder=self.tokenizer_dir)
        barrier()
        return record

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


def train(spec: JobSpec) -> dict:
    """Run the job the spec describes; returns the last step's record."""
    try:
        trainer = Trainer(spec)
        try:
            return trainer.fit()
        finally:
            trainer.close()
    finally:
        close_world()
