"""`layerwise train`: resumable pretraining with per-layer depth telemetry, single process or torchrun."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..config import ModelConfig
from ..errors import UserError
from ..model import LayerwiseForCausalLM
from ..nn.block import refresh_attention_gains
from ..nn.schedule import set_training_step
from ..runs import TOKENIZER, sha256_of
from . import distributed as dist_infra
from .card import checkpoint_card
from .checkpoint import (CorruptCheckpoint, latest_valid_checkpoint, list_checkpoints, load_checkpoint, move_aside,
                         save_checkpoint, verify_checkpoint)
from .config import TrainConfig, with_current_names
from .init_from import (InitModel, check_vocabulary, described, open_init_model, same_model, with_lora,
                        write_record)
from .metrics import MetricsLog, wandb_module
from .optim import build_optimizer, lr_at
from .run_folder import check_out_path, claim_run_folder, clean_temporary_checkpoints
from .telemetry import layer_grad_norms, measure_depth

# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment, most specific first (torchtitan's table).
PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
              ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12)]


class TrainingDiverged(UserError):
    """The loss or gradients stayed non-finite: a setting (usually lr) is wrong, not the code."""


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for fragment, peak in PEAK_FLOPS if fragment in name), None)


def flops_per_token(n_layers: int, d_model: int, n_params: int, seq_len: int) -> float:
    """6 N for the matmuls of forward + backward, plus attention scores (nanoGPT / PaLM appendix B)."""
    return 6 * n_params + 12 * n_layers * d_model * seq_len


def default_corpus_dir(vocab_size: int | None = None, tokenizer: Path | None = None) -> Path:
    """Where the embedded Shakespeare is cached, tokenized by a BPE of `vocab_size` or by `tokenizer`."""
    name = f"bpe{vocab_size}" if tokenizer is None else f"tokenizer-{sha256_of(tokenizer)[:12]}"
    return Path.home() / ".cache" / "layerwise" / f"shakespeare-{name}"


def open_data(cfg: TrainConfig, console: Console, tokenizer: Path | None = None):
    """The training data; text (the embedded Shakespeare by default) is tokenized with `tokenizer` (a
    tokenizer.json) when given, else with a BPE of cfg.tokenizer_vocab_size trained on it."""
    from ..data.build import build_corpus, open_token_data

    if cfg.data is not None:
        return open_token_data(cfg.data, tokenizer_path=tokenizer)
    if tokenizer is None:
        path, what = default_corpus_dir(cfg.tokenizer_vocab_size), f"BPE {cfg.tokenizer_vocab_size}"
    else:
        path, what = default_corpus_dir(tokenizer=tokenizer), f"tokenizer {tokenizer}"
    if not (path / "manifest.json").exists():
        console.print(f"building the embedded Shakespeare corpus ({what}) in {path}")
        build_corpus(["shakespeare"], path, vocab_size=cfg.tokenizer_vocab_size, tokenizer_path=tokenizer)
    return open_token_data(path)


def build_model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    """cfg.model resolved: its preset at its size, its fields on top, and the data's vocabulary."""
    overrides = dict(cfg.model)
    preset, size = overrides.pop("preset"), overrides.pop("size")
    overrides.setdefault("vocab_size", 64 * -(-vocab_size // 64))  # padded: faster matmuls
    if overrides["vocab_size"] < vocab_size:
        raise UserError(f"TrainConfig.model.vocab_size={overrides['vocab_size']} is smaller than the data's "
                        f"{vocab_size} tokens; leave it out (the data's vocabulary is used) or raise it")
    overrides.setdefault("max_seq_len", max(cfg.seq_len, 256))
    return ModelConfig.from_preset(preset, size, **overrides)


def _has_known_layers(model) -> bool:
    from ..arch import SUPPORTED_FAMILIES

    return getattr(model.config, "model_type", None) in SUPPORTED_FAMILIES


def attention_gain_refresh_every(total_steps: int) -> int:
    """BHyT's c is recomputed every total_steps // 50 steps, at least 1 and at most 1000, as the released code's
    `UpdateScalerCallback` does; a function of the run length only, so a resumed run refreshes on the same steps."""
    return max(1, min(1000, total_steps // 50))


def windows(tokens, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets for windows starting at `starts`."""
    chunk = np.stack([np.asarray(tokens[s: s + seq_len + 1], dtype=np.int64) for s in starts.tolist()])
    chunk = torch.from_numpy(chunk)
    return chunk[:, :-1], chunk[:, 1:]


def step_starts(step: int, cfg: TrainConfig, n_tokens: int) -> torch.Tensor:
    """The global batch of step `step`: a function of (seed, step) only, so resuming needs no data state
    and every world size sees the same batch."""
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    return torch.randint(0, n_tokens - cfg.seq_len - 1, (cfg.batch_size,), generator=generator)


class TrainerCallback:
    """A hook into a run, for procedures that change the model as it trains (`layerwise.train.norm_removal`).

    `prepare(model, cfg)` returns the model to train (it may build another), before the optimizer is built and a
    checkpoint is resumed into it. `on_step_start(step, model)` runs before each training step, and once with
    the starting step before the run's first evaluation; whatever it sets must be a function of the step, so a
    resumed run sets the same."""

    def prepare(self, model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
        return model

    def on_step_start(self, step: int, model: torch.nn.Module) -> None:
        pass


def batch_statistics_note(model: torch.nn.Module, micro_batch: int, batch_size: int, ddp: bool = False) -> str | None:
    """Why this run is not what one process on the whole batch would compute, or None: norms with batch
    statistics normalise each rank's micro-batch by its own, like nn.BatchNorm1d without SyncBatchNorm."""
    names = sorted({type(m).__name__ for m in model.modules() if getattr(m, "batch_statistics", False)})
    if not names or micro_batch >= batch_size:
        return None
    note = (f"{', '.join(names)} normalise each micro-batch of {micro_batch} sequences by its own batch statistics, "
            f"not the global batch of {batch_size}: this run differs from one process on whole batches")
    return note + (" (the running statistics are rank 0's: DDP broadcasts its buffers each forward)" if ddp else "")


def batch_statistics_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """The buffers of every batch-statistics norm: a skipped step's forward and backward have already moved
    them (one NaN batch would leave NaN running statistics for good), so a skip puts them back."""
    return [b for m in model.modules() if getattr(m, "batch_statistics", False) for b in m.buffers(recurse=False)]


class ModelStepSchedule(TrainerCallback):
    """Drives the model's own step schedules (`layerwise.nn.schedule`: PRepBN's decay, running-statistics
    warm-ups); every run has it, and it does nothing for a model without one."""

    def prepare(self, model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
        self.total_steps = cfg.total_steps
        return model

    def on_step_start(self, step: int, model: torch.nn.Module) -> None:
        set_training_step(model, step, self.total_steps)


class Trainer:
    def __init__(self, cfg: TrainConfig, console: Console | None = None,
                 callbacks: list[TrainerCallback] | tuple = ()):
        self.cfg = cfg
        self.callbacks = [ModelStepSchedule(), *callbacks]
        self.console = console or Console()
        self.rt = dist_infra.setup(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        per_rank, rem = divmod(cfg.batch_size, self.rt.world_size)
        if rem:
            raise ValueError(f"TrainConfig.batch_size={cfg.batch_size} is not divisible by the {self.rt.world_size} "
                             "processes; the global batch must split evenly")
        self.micro = cfg.micro_batch_size or per_rank
        if per_rank % self.micro:
            raise ValueError(f"TrainConfig.micro_batch_size={self.micro} must divide the {per_rank} sequences "
                             "each process handles per step")
        self.accum = per_rank // self.micro
        self.run_dir = Path(cfg.out)
        self.lock = None
        self.init: InitModel | None = None
        self.scratch: tempfile.TemporaryDirectory | None = None  # the init model's tokenizer.json, for the data
        self.measured: tuple[int | None, float | None] = (None, None)  # (step, held-out loss) of the last eval
        self.eval_windows = 0
        self.use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and self.rt.device.type == "cuda")

    def autocast(self):
        if self.use_bf16:
            return torch.autocast(self.rt.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # ---- the run ------------------------------------------------------------------------------------------

    def run(self) -> dict:
        cfg, rt, console = self.cfg, self.rt, self.console
        # Everything that can be refused is checked before the run folder is touched.
        check_out_path(self.run_dir)
        if cfg.wandb != "off" and rt.is_main:
            wandb_module()  # a missing extra fails before the folder is claimed or the data read
        if cfg.resume not in ("none", "auto") and not Path(cfg.resume).is_dir():
            raise UserError(f"TrainConfig.resume={cfg.resume!r} is not none, auto or an existing checkpoint folder")
        torch.manual_seed(cfg.seed)
        tokenizer = self._open_init_model() if cfg.init_from is not None else None
        data = open_data(cfg, console, tokenizer)
        for split, tokens in (("train", data.train), ("validation", data.val)):
            if len(tokens) < cfg.seq_len + 2:
                raise UserError(f"the {split} split has {len(tokens)} tokens, fewer than seq_len={cfg.seq_len} + 2")
        if self.init is not None:
            check_vocabulary(self.init, data.vocab_size, cfg.data or "the embedded Shakespeare")
            model_cfg = self.init.model.config
        else:
            model_cfg = build_model_config(cfg, data.vocab_size)
        model = (self.init.model if self.init is not None else LayerwiseForCausalLM(model_cfg)).to(rt.device)
        for callback in self.callbacks:  # before the folder is claimed: a callback may refuse the model
            model = callback.prepare(model, cfg).to(rt.device)
        model_cfg = model.config
        if rt.is_main:  # under torchrun rank 0 owns the folder for all ranks
            self._claim_run_folder()
        dist_infra.barrier(rt)
        n_params = sum(p.numel() for p in model.parameters())
        # Depth telemetry beyond per-layer gradient norms needs layerwise hook points.
        self.observed = model
        self.telemetry_layers = _has_known_layers(model)
        self.hooked = isinstance(model, LayerwiseForCausalLM)
        if cfg.lora_rank:
            model = with_lora(model, cfg.lora_rank)
            self.hooked = False  # the adapted linears are peft's, not the modules the hook points sit on
        # FSDP2 shards parameters in place, so the optimizer is built after wrapping.
        wrapped = dist_infra.wrap(model, rt, cfg.fsdp)
        optimizer = build_optimizer(model, cfg, rt.device)

        start_step, resume_from = 0, self._resume_path()
        if resume_from is not None:
            self._check_same_run(resume_from, model_cfg)
            state = load_checkpoint(resume_from, model, optimizer)
            start_step = state["step"]
            self.bad_total = state["bad_steps_total"]
            if rt.is_main:
                console.print(f"resumed from {resume_from} at step {start_step}")
        else:
            self.bad_total = 0
            refresh_attention_gains(model, cfg.seq_len)  # a resumed run keeps the checkpoint's c
        if rt.is_main:
            if resume_from is None and (self.run_dir / "metrics.jsonl").exists():
                # resume=auto found no valid checkpoint: the fresh run's log must not erase the old one's.
                aside = self.run_dir / f"metrics.jsonl.old-{time.strftime('%Y%m%d-%H%M%S')}"
                (self.run_dir / "metrics.jsonl").rename(aside)
                console.print(f"[yellow]the previous metrics.jsonl (no valid checkpoint left) moved to {aside}")
            cfg.save_yaml(self.run_dir / "train.yaml")
            model_cfg.to_json_file(self.run_dir / "model_config.json")
            run_tokenizer = tokenizer or data.tokenizer_path
            if run_tokenizer is not None:  # diagnose/eval of the run then find its tokenizer
                shutil.copyfile(run_tokenizer, self.run_dir / TOKENIZER)
            if self.init is not None:
                write_record(self.run_dir, self.init)
        dist_infra.barrier(rt)
        log = MetricsLog(self.run_dir, start_step if resume_from else None, cfg.tensorboard, cfg.wandb,
                         cfg.to_dict()) if rt.is_main else None

        forward = torch.compile(wrapped) if cfg.compile else wrapped
        total = cfg.total_steps
        refresh_every = attention_gain_refresh_every(total)
        peak = peak_flops(rt.device)
        embed = model.get_input_embeddings().weight
        fpt = flops_per_token(model_cfg.num_hidden_layers, embed.shape[1], n_params, cfg.seq_len)
        if rt.is_main:
            name = getattr(model_cfg, "preset", None) or (cfg.init_from and f"{cfg.init_from} ({model_cfg.model_type})")
            console.print(f"{name or 'model'} ({n_params / 1e6:.2f}M params) on {rt.device} x{rt.world_size}; "
                          f"{total} steps x {cfg.tokens_per_step:,} tokens = {total * cfg.tokens_per_step:,} tokens; "
                          f"data {data.vocab_size} vocab, {len(data.train):,} train tokens")
            note = batch_statistics_note(model, self.micro, cfg.batch_size, ddp=rt.distributed and not cfg.fsdp)
            if note:
                console.print(f"[yellow]{note}")
            if rt.device.type == "cuda" and peak is None:
                console.print(f"[yellow]unknown peak FLOP/s for {torch.cuda.get_device_name()}: MFU not reported")

        consecutive_bad, last_val = 0, None
        t_last, tokens_last = time.perf_counter(), start_step * cfg.tokens_per_step
        self.data_seconds = 0.0
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=console,
                            disable=not rt.is_main)
        for callback in self.callbacks:
            callback.on_step_start(start_step, model)
        if start_step == 0:  # the untrained model's loss anchors every curve
            last_val = self._evaluate(forward, data)
            if rt.is_main:
                log.write({"step": 0, "tokens": 0, "val_loss": last_val, "val_ppl": math.exp(min(last_val, 50))})
        statistics = batch_statistics_buffers(model)
        with progress:
            task = progress.add_task("train", total=total, completed=start_step, stats="")
            for step in range(start_step, total):
                for callback in self.callbacks:
                    callback.on_step_start(step, model)
                lr = lr_at(step, cfg, total)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                statistics_before = [b.clone() for b in statistics]
                loss, grad_norm, first_x = self._train_step(step, forward, wrapped, model, optimizer, data)
                tokens = (step + 1) * cfg.tokens_per_step
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    consecutive_bad += 1
                    self.bad_total += 1
                    optimizer.zero_grad(set_to_none=True)
                    with torch.no_grad():
                        for buffer, saved in zip(statistics, statistics_before):
                            buffer.copy_(saved)
                    if rt.is_main:
                        console.print(f"[yellow]step {step}: non-finite loss or gradient; step skipped "
                                      f"({consecutive_bad} in a row)")
                        log.write({"step": step + 1, "tokens": tokens, "skipped_nonfinite": True})
                    if consecutive_bad >= cfg.max_bad_steps:
                        raise TrainingDiverged(
                            f"{consecutive_bad} consecutive steps had non-finite loss or gradients (at step {step}); "
                            f"stopping. {self._last_good()} Lower TrainConfig.lr={cfg.lr} and start again (--overwrite "
                            "moves this run aside), or raise max_bad_steps")
                    continue
                consecutive_bad = 0
                telemetry = None
                if self.telemetry_layers and ((step + 1) % cfg.telemetry_every == 0 or step + 1 == total):
                    telemetry = {"grad_norm_layers": layer_grad_norms(self.observed)}
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if (step + 1) % refresh_every == 0:  # after the update, like the callback's on_step_end
                    refresh_attention_gains(model, cfg.seq_len)
                pause = time.perf_counter()  # telemetry, evaluation and checkpoints do not count as training time
                if telemetry is not None and not cfg.fsdp and self.hooked:
                    telemetry.update(measure_depth(model, first_x[:4], self.autocast()))
                record = {"step": step + 1, "tokens": tokens}
                if rt.is_main and ((step + 1) % cfg.log_every == 0 or step + 1 == total):
                    now = pause
                    elapsed = now - t_last
                    tok_s = (tokens - tokens_last) / elapsed
                    mfu = tok_s * fpt / (peak * rt.world_size) if peak else None
                    # Host time spent assembling batches, as a share of wall time since the last record.
                    data_fraction = self.data_seconds / elapsed
                    t_last, tokens_last, self.data_seconds = now, tokens, 0.0
                    log.write({**record, "train_loss": loss, "lr": lr, "grad_norm": grad_norm,
                               "tokens_per_s": tok_s, "data_fraction": data_fraction,
                               **({"mfu": mfu} if mfu is not None else {})})
                    stats = f"loss {loss:.3f}  {tok_s:,.0f} tok/s" + (f"  MFU {mfu:.1%}" if mfu else "")
                    progress.update(task, completed=step + 1, stats=stats)
                if (step + 1) % cfg.eval_every == 0 or step + 1 == total:
                    last_val = self._evaluate(forward, data)
                    self.measured = (step + 1, last_val)
                    if rt.is_main:
                        log.write({**record, "val_loss": last_val, "val_ppl": math.exp(min(last_val, 50))})
                if telemetry is not None and rt.is_main:
                    log.write({**record, "telemetry": telemetry})
                if (step + 1) % cfg.ckpt_every == 0 or step + 1 == total:
                    self._checkpoint(step + 1, model, optimizer)
                t_last += time.perf_counter() - pause
        if last_val is None:  # resumed from the final checkpoint: nothing left to train
            last_val = self._evaluate(forward, data)
        if rt.is_main:
            log.close()
            console.print(f"done: {total} steps, val loss {last_val:.4f}; run folder {self.run_dir} "
                          f"(metrics.jsonl, tensorboard/, checkpoints/)")
        dist_infra.barrier(rt)
        return {"val_loss": last_val, "params": n_params, "steps": total, "bad_steps": self.bad_total}

    # ---- pieces ----------------------------------------------------------------------------------------------

    def _claim_run_folder(self) -> None:
        cfg = self.cfg
        # Resuming another run's checkpoint starts a new run here as surely as resume=none does.
        continues_here = cfg.resume == "auto" or (
            cfg.resume != "none" and self.run_dir.resolve() in Path(cfg.resume).resolve().parents)
        self.lock = claim_run_folder(self.run_dir, fresh=not continues_here, overwrite=cfg.overwrite)
        if self.lock.moved_aside is not None:
            self.console.print(f"moved the previous run in {self.run_dir} aside to {self.lock.moved_aside}")
        clean_temporary_checkpoints(self.run_dir)
        if cfg.resume == "auto":
            # Corrupt checkpoints newer than the one resumed would sort first in every later listing.
            for path in reversed(list_checkpoints(self.run_dir)):
                try:
                    verify_checkpoint(path)
                    break
                except CorruptCheckpoint as err:
                    move_aside(path, err)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.scratch is not None:
            self.scratch.cleanup()
            self.scratch = None

    def _open_init_model(self) -> Path | None:
        """Load cfg.init_from into self.init; the path of its tokenizer as a tokenizer.json (None if it has
        none), which the data is tokenized with."""
        self.init = open_init_model(self.cfg.init_from)
        check_vocabulary(self.init)  # before any tokenizing
        if self.init.tokenizer is None:
            if self.cfg.data is None:
                raise UserError(f"TrainConfig.init_from={self.cfg.init_from!r} has no tokenizer to tokenize the "
                                "embedded Shakespeare with; pass --data as a corpus folder or token shards made "
                                "for this model")
            return None
        self.scratch = tempfile.TemporaryDirectory(prefix="layerwise-init-tokenizer-")
        path = Path(self.scratch.name) / TOKENIZER
        self.init.tokenizer.save(str(path))
        return path

    def _resume_path(self) -> Path | None:
        cfg = self.cfg
        if cfg.resume == "none":
            return None
        if cfg.resume == "auto":
            path = latest_valid_checkpoint(self.run_dir)
            if path is None and self.rt.is_main:
                self.console.print(f"no valid checkpoint in {self.run_dir}/checkpoints; starting fresh")
            return path
        path = Path(cfg.resume)
        try:
            verify_checkpoint(path)
        except CorruptCheckpoint as err:
            raise UserError(f"TrainConfig.resume={cfg.resume!r} is not a usable checkpoint: {err}") from None
        return path

    def _check_same_run(self, checkpoint: Path, model_cfg) -> None:
        """Resuming (or reusing a finished run in `compare`) continues the checkpoint's run, so every setting
        that changes the result must be the one it was trained with, and an init_from run the same model."""
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        saved_train = with_current_names(state.get("train_config", {}))
        saved_model = type(model_cfg).from_json_file(checkpoint / "config.json").to_dict()
        ignored = {"transformers_version", "architectures", "torch_dtype", "dtype", "_name_or_path"}
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        # A field the checkpoint predates had its default then.
        differ = [f"{k}: {saved_train.get(k, defaults[k])!r} in the checkpoint, {v!r} now"
                  for k, v in self.cfg.result_fields().items() if saved_train.get(k, defaults[k]) != v]
        now_model = model_cfg.to_dict()
        differ += [f"model.{k}: {saved_model.get(k)!r} in the checkpoint, {now_model.get(k)!r} now"
                   for k in sorted((set(saved_model) | set(now_model)) - ignored)
                   if saved_model.get(k) != now_model.get(k)]
        saved_init, now_init = state.get("init_from"), self.init and self.init.fingerprint
        if not same_model(saved_init, now_init):
            differ.append(f"init_from: {described(saved_init)} in the checkpoint, {described(now_init)} now")
        if differ:
            raise UserError(f"{checkpoint} was trained with other settings ({'; '.join(differ)}); continuing it "
                            "would mix two runs. Use its settings, or a new --out (train --overwrite moves the old "
                            "run aside)")

    def _last_good(self) -> str:
        checkpoints = list_checkpoints(self.run_dir)
        if not checkpoints:
            return "No checkpoint was written before it diverged."
        return f"The last good checkpoint is {checkpoints[-1]}."

    def _train_step(self, step, forward, wrapped, model, optimizer, data):
        cfg, rt = self.cfg, self.rt
        starts = step_starts(step, cfg, len(data.train))
        per_rank = cfg.batch_size // rt.world_size
        mine = starts[rt.rank * per_rank:(rt.rank + 1) * per_rank]
        loss_sum = torch.zeros((), device=rt.device)
        first_x = None
        for m in range(self.accum):
            t0 = time.perf_counter()
            x, y = windows(data.train, mine[m * self.micro:(m + 1) * self.micro], cfg.seq_len)
            x = x.pin_memory().to(rt.device, non_blocking=True) if rt.device.type == "cuda" else x
            y = y.pin_memory().to(rt.device, non_blocking=True) if rt.device.type == "cuda" else y
            self.data_seconds += time.perf_counter() - t0
            first_x = x if first_x is None else first_x
            last = m == self.accum - 1
            if cfg.fsdp and rt.distributed:
                wrapped.set_requires_gradient_sync(last)
                sync = nullcontext()
            else:
                sync = wrapped.no_sync() if rt.distributed and not last else nullcontext()
            with sync, self.autocast():
                out = forward(input_ids=x, use_cache=False)
                loss = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten()) / self.accum
                # A residual scheme's own term (Delta AttnRes's entropy bonus) is trained on; the logged loss
                # stays the cross-entropy, comparable across schemes.
                extra = getattr(out, "residual_loss", None)
            (loss if extra is None else loss + extra / self.accum).backward()
            loss_sum += loss.detach()
        loss_mean = dist_infra.mean_over_processes(loss_sum, rt)
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        return loss_mean.item(), grad_norm.item(), first_x

    @torch.no_grad()
    def _evaluate(self, forward, data) -> float:
        cfg, rt = self.cfg, self.rt
        n_windows = min(cfg.eval_batches * cfg.batch_size, (len(data.val) - 1) // cfg.seq_len)
        n_windows -= n_windows % rt.world_size
        self.eval_windows = n_windows
        starts = torch.arange(n_windows) * cfg.seq_len  # fixed, non-overlapping held-out windows
        mine = starts[rt.rank::rt.world_size]
        total = torch.zeros((), device=rt.device)
        model = getattr(forward, "module", forward)
        was_training = model.training
        model.eval()
        for i in range(0, len(mine), self.micro):
            x, y = windows(data.val, mine[i:i + self.micro], cfg.seq_len)
            x, y = x.to(rt.device), y.to(rt.device)
            with self.autocast():
                logits = forward(input_ids=x, use_cache=False).logits
            total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum") / cfg.seq_len
        model.train(was_training)
        return (dist_infra.mean_over_processes(total, rt) / len(mine)).item()

    def _checkpoint(self, step, model, optimizer):
        state = {"step": step, "tokens": step * self.cfg.tokens_per_step, "bad_steps_total": self.bad_total,
                 "train_config": self.cfg.to_dict(),
                 **({"init_from": self.init.fingerprint} if self.init is not None else {})}
        # The card reports the held-out loss only when it was measured at this very step.
        measured_step, val_loss = self.measured
        card = checkpoint_card(self.cfg, self.observed, step, val_loss if measured_step == step else None,
                               self.eval_windows) if self.rt.is_main else None
        save_checkpoint(self.run_dir, step, model, optimizer, state, self.cfg.keep_checkpoints, self.rt.is_main,
                        card)
        dist_infra.barrier(self.rt)


def train(cfg: TrainConfig, console: Console | None = None, callbacks: list[TrainerCallback] | tuple = ()) -> dict:
    trainer = None
    try:
        trainer = Trainer(cfg, console, callbacks)
        return trainer.run()
    finally:
        if trainer is not None:
            trainer.release()
        dist_infra.teardown()

