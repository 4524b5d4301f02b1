"""The training loop: spec → tokenizer and data → model → parallelize → weights → steps.

The loss of a step is the mean over every label token of the global batch (all ranks, all
micro-batches), so any split of the same global batch over ranks and accumulation steps gives the
same gradients as one process.

Faults: a step whose loss or gradients are not finite is skipped (no update) or stops the run, per
``train.on_nonfinite``; SIGTERM or SIGUSR1 (Slurm's pre-emption warning) on any rank makes every rank
save a checkpoint at the end of the current step and return.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

from parallel.engine import build_engine
from parallel.mesh import World, all_reduce_sum, barrier, close_world, init_world
from parallel.parallelize import activation_offload, loss_context, parallelize, unwrap
from trainkit.checkpoint import Checkpointer, latest_checkpoint, remove_run
from trainkit.config import ConfigError
from trainkit.data import StepSampler, build_datasets
from trainkit.metrics import (
    MetricsLog,
    PhaseTimer,
    StepProfiler,
    adapter_matmul_params,
    cuda_memory,
    flops_per_token,
    matmul_tflops,
    peak_flops,
    phase_postfix,
)
from trainkit.model import build_model
from trainkit.spec import CUDA_GRAPH_MODES, JobSpec
from trainkit.weights import check_model_matches, load_hf_weights, load_tokenizer, prepare_hf_folder, save_hf_state_dict

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class QueuedStep:
    """A step whose work is queued on the device; ``values`` hold its sums once ``arrived`` has fired."""

    values: torch.Tensor  # CE and aux loss sums, dropped and routed slots, stop flag, label tokens[, norm]
    arrived: torch.cuda.Event | None  # None: values are already there (the CPU)
    lr: float
    has_norm: bool
    updated: bool  # the engine's update is queued too (``skips_on_device``); else the host applies it


class NonFiniteError(ConfigError):
    """A non-finite loss or gradient norm under ``train.on_nonfinite=stop``; the message names the step."""


class Trainer:
    def __init__(self, spec: JobSpec):
        self.spec = spec
        cfg = spec.cfg
        self.world: World = init_world(spec.device_type, spec.dims)
        # Before anything else holds GPU memory; logged with the first record.
        self.first_record: dict = {}
        if cfg.logging.measure_matmul and spec.device_type == "cuda" and self.world.is_main:
            self.first_record = {"matmul_tflops": matmul_tflops(self.world.device)}
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
        if len(self.tokenizer) > cfg.model.vocab_size:  # ids past the embedding: a device-side assert on CUDA
            raise ConfigError(
                f"the tokenizer has {len(self.tokenizer)} tokens, more than model.vocab_size={cfg.model.vocab_size}: "
                "set model.tokenizer to this model's tokenizer, or model.vocab_size to at least that"
            )
        self.train_rows, self.eval_rows = build_datasets(cfg.data, self.tokenizer, cfg.cache_dir)
        if self.world.is_main:
            barrier()
        self.sampler = StepSampler(len(self.train_rows), spec.global_batch_size, cfg.data.seed)

        torch.manual_seed(cfg.train.seed)  # identical random init on every rank and world size
        model = build_model(cfg.model)
        self.adapters = cfg.peft.method != "none"
        adapter_params = None  # a full fine-tune: every weight gets a weight gradient
        if self.adapters:
            # peft and bitsandbytes take ~2 s to import (on every rank): only adapter jobs pay it.
            from lora import apply_adapters, init_adapters, load_weights

            apply_adapters(model, spec)  # before the parallel plan, so it shards them with their blocks
            adapter_params = adapter_matmul_params(model)
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len, adapter_params)
        model = parallelize(model, spec, self.world)
        if self.adapters:
            # Without weights (model.source=null) QLoRA still quantizes a random base.
            load_weights(unwrap(model), weights_dir, spec, self.world.device)
            torch.manual_seed(cfg.train.seed)  # the same adapter init on every rank
            init_adapters(unwrap(model), cfg.peft)
        elif weights_dir is not None:
            load_hf_weights(unwrap(model), weights_dir)
        self.weights_dir = weights_dir
        self.engine = build_engine(model, spec, self.world)
        # Queue each step before the previous one's values are read (``_may_run_ahead``): on CUDA, where
        # the host would otherwise leave the GPU idle while it reads them and launches the next forward.
        self.runs_ahead = spec.device_type == "cuda" and self.engine.skips_on_device
        self.checkpointer = Checkpointer(cfg, spec.dims, self.world)
        self.step = 0
        self.skipped_steps = 0  # steps skipped for a non-finite loss or gradient norm
        self._prefetched: tuple[int, tuple] | None = None  # (step, _step_batches(step)) made ahead of time
        self.stop_signal: str | None = None  # the name of a stop signal this rank received
        self.stopping = False  # some rank received one: save at the end of this step and return
        if cfg.train.resume and (latest := latest_checkpoint(self.out)) is not None:
            saved = self.checkpointer.load(latest, self.engine)
            self.step, self.skipped_steps = saved["step"], saved["skipped_steps"]
        self.peak_flops = peak_flops(self.world.device, cfg.logging)
        if self.first_record and self.peak_flops is not None:
            self.first_record["peak_tflops"] = self.peak_flops / 1e12
        self.timer = PhaseTimer(self.world.device)
        self.profiler = StepProfiler(cfg.logging, self.out, self.world.rank, self.world.device)
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

    def _loss_sum(self, batch: dict[str, torch.Tensor], expected_grad: torch.Tensor | None = None) -> torch.Tensor:
        """Summed cross-entropy of one micro-batch; labels come pre-shifted from the data pipeline.
        ``expected_grad``: what backward will bring to it, for the model to compute its gradients with."""
        packed = self.spec.cfg.data.pack
        inputs = {"position_ids": batch["position_ids"], "document_ids": batch["document_ids"] if packed else None}
        with self._autocast():
            if self.spec.dims.tp == 1:  # the model computes the loss in chunks: no full logits
                return self.engine.model(
                    batch["input_ids"], labels=batch["labels"], expected_grad=expected_grad, **inputs
                )
            logits = self.engine.model(batch["input_ids"], **inputs)
        # Vocabulary-sharded logits under tensor parallelism: loss_parallel gives a replicated DTensor.
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100, reduction="sum"
        )
        return loss.full_tensor()

    def _copy_to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device, the copy queued like a kernel: from page-locked memory on CUDA,
        since a copy from pageable memory (``torch.tensor(..., device="cuda")`` too) waits for all the
        GPU work queued before it."""
        pinned = tensor.pin_memory() if self.world.device.type == "cuda" else tensor
        return pinned.to(self.world.device, non_blocking=True)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: self._copy_to_device(v) for k, v in batch.items()}

    def _host_values(self, values: list[float]) -> torch.Tensor:
        return self._copy_to_device(torch.tensor(values, dtype=torch.float64))

    def _copy_to_host(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """A device tensor's copy on the host, queued like a kernel, and on CUDA the event after which
        the copy holds the values."""
        if self.world.device.type != "cuda":
            return tensor, None
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        arrived = torch.cuda.Event()
        arrived.record()
        return host, arrived

    def _step_batches(self, step: int) -> tuple[int, list[dict[str, torch.Tensor]]]:
        """Step ``step``'s label-token count on this rank and its micro-batches on the device; taken from
        ``_prefetched`` when the previous step prepared them."""
        if self._prefetched is not None and self._prefetched[0] == step:
            return self._prefetched[1]
        t = self.spec.cfg.train
        micro = self.sampler.micro_batches(step, self.world.dp_rank, self.spec.dp_size, t.grad_accum_steps)
        rows = [self.train_rows.batch(idx) for idx in micro]
        local_tokens = sum(int((r["labels"] != -100).sum()) for r in rows)  # on the host: no wait for the GPU
        return local_tokens, [self._to_device(r) for r in rows]

    def train_step(self) -> dict:
        """One whole step, its values read back: the record of step ``self.step + 1``."""
        return self._finish_step(self._queue_step(self.step))

    def _queue_step(self, step: int) -> QueuedStep:
        """Queue step ``step`` (0-based) on the device: forward, backward, clipping, and the update too
        where the engine ``skips_on_device``; its values (losses, counts, norm) start on their way to
        the host, which ``_finish_step`` reads."""
        t, world, timer = self.spec.cfg.train, self.world, self.timer
        timer.begin_step()
        with timer.phase("data"):
            local_tokens, batches = self._step_batches(step)
        label_tokens = self._host_values([local_tokens])
        label_tokens = all_reduce_sum(label_tokens, world.dp_mesh)
        # Data-parallel backends average gradients over dp ranks; scaling by dp makes that a mean
        # over every label token of the global batch. TP ranks share a batch and a loss. A device
        # tensor, so that the step reads nothing back before its end.
        scale = (self.spec.dp_size / label_tokens[0]).float()
        # The loss computes its gradients times ``scale`` (backward then has no pass of its own to make),
        # but not in float16, where the logits' gradient so scaled would underflow (a GradScaler's job).
        expected_grad = None if self.spec.compute_dtype == torch.float16 else scale
        losses = torch.zeros(2, dtype=torch.float64, device=world.device)  # CE and MoE aux, summed
        slots = [0, 0]  # MoE token-slots dropped over capacity, and routed
        aux_weight = self.spec.cfg.model.router_aux_loss_coef / t.grad_accum_steps
        model = unwrap(self.engine.model)
        for i, batch in enumerate(batches):
            self.engine.set_gradient_sync(i == len(batches) - 1)
            with loss_context(self.spec), activation_offload(self.spec.cfg.ac, world.device):
                with timer.phase("forward"):
                    loss = self._loss_sum(batch, expected_grad)
                    aux = model.moe_aux_loss()  # the load balance of this micro-batch's routing; 0 if dense
                with timer.phase("backward"):
                    self.engine.backward(loss * scale + aux * aux_weight)
            losses += torch.stack([loss.detach(), aux.detach()])
            slots = [total + n for total, n in zip(slots, model.moe_drop_counts())]
        if step + 1 < t.steps:
            with timer.phase("data"):  # the host prepares the next step while the GPU works through this one
                self._prefetched = (step + 1, self._step_batches(step + 1))
        lr = self.engine.lr
        with timer.phase("optimizer"):
            norm = self.engine.clip_grads()  # global, before clipping; None under DeepSpeed (known after its step)
        totals = torch.cat([losses, self._host_values(slots)])
        totals = all_reduce_sum(totals, world.dp_mesh)
        # Any rank's stop signal stops every rank: summed over the whole world, not only data-parallel ranks.
        stop = self._host_values([float(self.stop_signal is not None)])
        parts = [totals, all_reduce_sum(stop), label_tokens]
        parts += [] if norm is None else [norm.detach().to(totals).view(1)]
        on_device = self.engine.skips_on_device  # the update goes in before the host has seen the values
        if on_device:
            with timer.phase("optimizer"):
                self.engine.step(skip_if=~(torch.isfinite(totals[0]) & torch.isfinite(norm)))
        values, arrived = self._copy_to_host(torch.cat(parts))
        return QueuedStep(values, arrived, lr, has_norm=norm is not None, updated=on_device)

    def _finish_step(self, queued: QueuedStep) -> dict:
        """Read a queued step's values (waiting for them), act on a non-finite loss or gradient, apply
        the update where the engine needs the host to decide it, and return the step's record."""
        t, timer = self.spec.cfg.train, self.timer
        if queued.arrived is not None:
            queued.arrived.synchronize()
        values = queued.values.tolist()
        loss, aux, dropped, routed, stop, label_tokens = values[:6]
        grad_norm = values[6] if queued.has_norm else None
        loss /= label_tokens
        self.stopping = self.stopping or stop > 0
        scaled = self.spec.cfg.precision.grad_scaler  # an overflow is the scaler's to skip and its scale to lower
        if not math.isfinite(loss) or not (grad_norm is None or math.isfinite(grad_norm) or scaled):
            self._skip_or_stop("the loss" if not math.isfinite(loss) else "a gradient", loss, dropped=queued.updated)
            grad_norm = None
        elif not queued.updated:
            with timer.phase("optimizer"):
                after = self.engine.step()
            grad_norm = grad_norm if after is None else after
            if not (math.isfinite(grad_norm) or scaled):
                # DeepSpeed keeps its gradients out of reach until its step, so only its norm tells, after the update.
                raise NonFiniteError(
                    f"step {self.step + 1}: the gradient norm is {grad_norm}: stopped after the update, nothing "
                    "saved; resume from the last checkpoint with a lower optim.lr"
                )
        record = {"loss": loss, "grad_norm": grad_norm, "lr": queued.lr, "label_tokens": int(label_tokens)}
        if routed:
            record["moe_aux_loss"] = aux / (t.grad_accum_steps * self.spec.dp_size)
            record["moe_dropped_fraction"] = dropped / routed
        return record

    def _skip_or_stop(self, what: str, loss: float, dropped: bool) -> None:
        """Handle a non-finite step before any update (``dropped``: the engine's step already left the
        weights as they were): every rank agrees, so every rank decides alike."""
        step, t = self.step + 1, self.spec.cfg.train
        if t.on_nonfinite == "stop":
            raise NonFiniteError(
                f"step {step}: {what} is not finite (loss {loss}): stopped before the update, nothing saved "
                "(train.on_nonfinite=stop); resume from the last checkpoint with a lower optim.lr, or set "
                "train.on_nonfinite=skip"
            )
        if not dropped:
            self.engine.skip()
        self.skipped_steps += 1
        if self.world.is_main:
            print(
                f"trainkit: step {step}: {what} is not finite (loss {loss}): skipped, no update "
                f"({self.skipped_steps} skipped so far; train.on_nonfinite=skip)",
                file=sys.stderr,
            )

    def _eval_stance(self):
        """Eager blocks for eval under CUDA-graph compile modes: without autograd to tell the calls
        apart, each replay of the blocks' one shared graph would overwrite the previous block's output."""
        if self.spec.cfg.compile_mode in CUDA_GRAPH_MODES:
            return torch.compiler.set_stance("force_eager")
        return contextlib.nullcontext()

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
                batch = self._to_device(self.eval_rows.batch(mine[m : m + t.micro_batch_size]))
                with loss_context(self.spec), self._eval_stance():
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
            "skipped_steps": self.skipped_steps,
            "step_time_s": step_time,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu,
            **self.timer.times(step_time),
            **cuda_memory(self.world.device),
        }

    def _write(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write({**record, **self.first_record})
            self.first_record = {}

    def _is_due(self, every: int, step: int | None = None) -> bool:
        step = self.step if step is None else step
        return step == self.spec.cfg.train.steps or (every > 0 and step % every == 0)

    def _may_run_ahead(self, stop_at: int) -> bool:
        """Whether the step after the one in flight may be queued before the host reads the values of
        the one in flight: only where the engine applies updates on the device (the host decides nothing
        for it), and not past a step whose weights something reads (eval, checkpoint, the run's end, a
        stop signal) nor across a profiler window's edge (each window holds its own steps' work)."""
        t, finishing = self.spec.cfg.train, self.step + 1
        return (
            self.runs_ahead
            and finishing < stop_at
            and not self.stopping
            and not self._is_due(t.eval_every, finishing)
            and not self._is_due(t.checkpoint_every, finishing)
            and not self.profiler.window_edge(finishing)
        )

    def _synchronize(self) -> None:
        if self.spec.device_type == "cuda":
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def _stop_signals(self):
        """While training, SIGTERM / SIGUSR1 only note themselves: the step in flight finishes first."""

        def note(signum, frame):
            self.stop_signal = signal.Signals(signum).name

        self.stop_signal, self.stopping = None, False
        previous = {s: signal.signal(s, note) for s in STOP_SIGNALS}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def fit(self, stop_at: int | None = None) -> dict:
        """Train to ``train.steps``; ``stop_at`` ends early after checkpointing that step (for tests),
        and so does a stop signal reaching any rank (pre-emption), leaving the rest to a resumed run."""
        t = self.spec.cfg.train
        stop_at = t.steps if stop_at is None else stop_at
        if self.step == 0:
            baseline = self.evaluate()  # the eval loss to fall from
            if baseline is not None:
                self._write({"step": 0, "eval_loss": baseline})
        self.engine.model.train()
        bar = tqdm(
            total=t.steps,
            initial=self.step,
            disable=not (self.world.is_main and self.spec.cfg.logging.progress_bar),
            dynamic_ncols=True,
        )
        record: dict = {}
        queued = None  # a step on the device whose values the host has not read yet
        with self._stop_signals():
            while queued is not None or (self.step < stop_at and not self.stopping):
                with self.profiler.step(self.step + 1):  # starting and exporting traces stay out of the step time
                    if queued is None:
                        self._synchronize()
                        start = time.perf_counter()
                        queued = self._queue_step(self.step)
                    # The next step goes onto the device before this one's values are read: the host's
                    # bookkeeping and the next forward's launches then overlap this step's GPU work.
                    ahead = self._queue_step(self.step + 1) if self._may_run_ahead(stop_at) else None
                    stats = self._finish_step(queued)
                    if ahead is None:
                        self._synchronize()
                    end = time.perf_counter()
                    step_time, start = end - start, end  # overlapped steps: from one's values to the next's
                queued = ahead
                self.step += 1
                record = self._record(stats, step_time)
                if self._is_due(t.eval_every):
                    record["eval_loss"] = self.evaluate()
                if self._is_due(t.log_every) or "eval_loss" in record:
                    self._write(record)
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}",
                    lr=f"{record['lr']:.2e}",
                    tok_s=f"{record['tokens_per_s']:.0f}",
                    ms=phase_postfix(record),
                )
                bar.update(1)
                if queued is None and (self._is_due(t.checkpoint_every) or self.step == stop_at or self.stopping):
                    saved = self.checkpointer.save(self.engine, self.step, self.skipped_steps)
        bar.close()
        self.profiler.finish()
        if self.stopping and self.world.is_main:
            print(
                f"trainkit: {self.stop_signal or 'a stop signal on another rank'}: stopped after step {self.step}, "
                f"saved {saved}; continue with train.resume=true",
                file=sys.stderr,
            )
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
