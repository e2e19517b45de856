"""The training engine: transformers' Trainer, with methods plugged in through `methods.base.Method`.

This module never asks which method it runs; it calls the method's hooks.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml
from rich.markup import escape
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from tunelab.assemble import TunedModel, build
from tunelab.config import RunConfig, check_run_source, dump_config, flatten, model_location, validate
from tunelab.data import (
    TokenizedDataset,
    check_held_out,
    check_source,
    collator,
    compare_data,
    data_record,
    eval_dataset,
    holdout_record,
    train_dataset,
)
from tunelab.errors import DataError, ResumeFailed, RunInterrupted, TunelabError, shell_word
from tunelab.evaluate import loss_and_perplexity
from tunelab.loss import causal_lm_loss, supports_head_loss
from tunelab.memory import release_free_memory
from tunelab.methods.base import Method
from tunelab.models import compute_dtype, load_tokenizer, resolve_model
from tunelab.reporting import MetricsWriter, Reporter, console
from tunelab.rundir import (
    CHECKPOINT_PREFIX,
    CONFIG_FILE,
    RunDir,
    atomic_directory,
    checkpoint_step,
    mark_complete,
    write_atomically,
)
from tunelab.signals import handling_stop_signals, stopping_when_reader_gone

# config keys that may differ when a run is resumed: where its folder lives, what it is called, how
# many checkpoints it keeps (a disk filling up mid-run) and which layers recompute their activations
# (memory running out: the same numbers either way)
RESUMABLE_CHANGES = (
    "output_dir",
    "name",
    "train.keep_checkpoints",
    "train.gradient_checkpointing",
    "train.gradient_checkpointing_every",
)


class MethodHooks(TrainerCallback):
    """Forwards the Trainer's optimizer-step events to the method."""

    def __init__(self, method: Method) -> None:
        self.method = method

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.method.on_train_begin(model, state.max_steps)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.method.on_step_begin(model, state.global_step)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.method.on_before_optimizer_step(model, state.global_step, optimizer)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.method.on_after_optimizer_step(model, state.global_step, optimizer)


class NonFiniteLossGuard(TrainerCallback):
    """Stop at the first NaN/inf loss, before that step's checkpoint is written (on every process,
    since the logged loss is the same everywhere)."""

    def __init__(self) -> None:
        self.bad: tuple[int, float] | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self.bad = (state.global_step, loss)
            control.should_training_stop = True
            control.should_save = False
            control.should_evaluate = False


class TruncateOnResume(TrainerCallback):
    """On resume, drop what the steps after the checkpoint left (they are about to be redone): their
    metrics, and checkpoints a stop or a kill left half-written. The Trainer calls this after loading
    the checkpoint, so a checkpoint that does not load leaves the run as it was."""

    def __init__(self, run: RunDir, last_step: int) -> None:
        self.run, self.last_step = run, last_step

    def on_train_begin(self, args, state, control, **kwargs):
        self.run.truncate_metrics(self.last_step)
        removed, left = self.run.remove_incomplete_checkpoints()
        if removed:
            console.print(f"removed {', '.join(removed)}: written in part when the run was stopped")
        if left:
            console.print(
                f"[yellow]left in place, in checkpoints written in part: {escape(', '.join(left))}[/yellow]"
            )


class FirstStep(TrainerCallback):
    """Whether training reached its first step: what failed before it, on resume, is the checkpoint's
    loading (the Trainer loads the RNG state only after on_train_begin)."""

    def __init__(self) -> None:
        self.begun = False

    def on_step_begin(self, args, state, control, **kwargs):
        self.begun = True


class StopOnSignal(TrainerCallback):
    """Ctrl-C / SIGTERM (or the output's reader gone): finish the current optimizer step, save a
    resumable checkpoint, stop.

    A second Ctrl-C stops at once (nothing more is saved; resume starts from the last checkpoint). A
    second SIGTERM does not: schedulers follow theirs with SIGKILL, and a trial of a sweep stopped by
    SIGTERM may get one from the sweep as well as its own."""

    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: int | None = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.requested = True
        console.print(
            "[yellow]stopping after this step (saving a checkpoint); press Ctrl-C again to abort[/yellow]"
        )

    @contextmanager
    def installed(self) -> Iterator[None]:
        # a reader of the output gone (`| head` exited) stops the run as Ctrl-C does, checkpoint saved
        with (
            handling_stop_signals(self._handle),
            stopping_when_reader_gone(lambda: self._handle(signal.SIGPIPE, None)),
        ):
            yield

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length-grouped order, drawn from (seed, epoch) instead of the global random state
    at the epoch's start: a resumed run, and every process of a distributed one, gets the same batches
    (the plain random order gets this from accelerate's seedable sampler)."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


class TunelabTrainer(Trainer):
    """Trainer that drives its method's hooks, and whose checkpoints hold only what the method
    trains (plus the method's state)."""

    def __init__(
        self,
        *args,
        method: Method,
        chunked_loss: bool = True,
        keep_checkpoints: int = 0,
        grouped_lengths: bool = False,
        **kwargs,
    ) -> None:
        self.method = method
        self.chunked_loss = chunked_loss
        self.keep_checkpoints = keep_checkpoints
        self.nonfinite_step: int | None = None
        self.last_batch_length = 0
        # not optional: without them DyLoRA draws no rank and SpIEL never reselects
        kwargs["callbacks"] = [MethodHooks(method), *(kwargs.get("callbacks") or [])]
        super().__init__(*args, **kwargs)
        self.release_memory = grouped_lengths and self.args.device.type == "cpu"

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Token-weighted mean loss over the labelled tokens: the number `tunelab eval` reports (the
        Trainer's own eval loss weights every batch equally, whatever its count of labelled tokens)."""
        dataset = eval_dataset or self.eval_dataset
        tokenizer = self.data_collator.tokenizer
        scores = loss_and_perplexity(self.model, dataset, tokenizer, self.args.per_device_eval_batch_size)
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in scores.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):  # its order comes from the global random state
            seed = self.args.seed if self.args.data_seed is None else self.args.data_seed
            return SeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, seed)
        return sampler

    def training_step(self, model, inputs, num_items_in_batch=None):
        # grouped lengths fall within a group of batches and jump at the next: release before the jump,
        # a few times an epoch (every step cost ~20% of the step in page faults, BENCHMARKS.md change 9;
        # random order jumps every other step, and is not measured)
        length = inputs["input_ids"].shape[-1] if "input_ids" in inputs else 0
        if self.release_memory and length > self.last_batch_length:
            release_free_memory()
        self.last_batch_length = length
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # a wrapped model (DDP) must be called through its wrapper for gradient sync
        if (
            not self.chunked_loss
            or return_outputs
            or model is not self.model
            or not supports_head_loss(model)
        ):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # accelerate puts autocast around model.forward; this calls the decoder itself, so it puts
        # its own (without it, fp32 weights, as full fine-tuning keeps them, compute in fp32)
        with self.accelerator.autocast():
            return causal_lm_loss(model, inputs, num_items_in_batch)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.args.should_save:
            self.method.save(self.model, Path(output_dir or self.args.output_dir))

    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        # an update can leave inf/NaN weights behind a finite loss: such a checkpoint is not "good"
        if not all(torch.isfinite(t).all() for t in self.method.checkpoint_tensors(model).values()):
            self.nonfinite_step = self.state.global_step
            self.control.should_training_stop = True
            return
        super()._save_checkpoint(model, trial)
        # every process writes its own RNG state into the checkpoint: complete once all have
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            checkpoint = Path(self.args.output_dir) / f"{CHECKPOINT_PREFIX}{self.state.global_step}"
            mark_complete(checkpoint)
            if self.keep_checkpoints:
                left = RunDir(checkpoint.parent.parent).remove_old_checkpoints(self.keep_checkpoints)
                if left:
                    console.print(
                        f"[yellow]train.keep_checkpoints: left in place, not known to be tunelab's: "
                        f"{escape(', '.join(left))}[/yellow]"
                    )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        self.method.load(model or self.model, Path(resume_from_checkpoint))


def training_arguments(config: RunConfig, run_dir: Path, has_eval: bool) -> TrainingArguments:
    t = config.train
    bf16 = compute_dtype(t.precision) == torch.bfloat16
    on_gpu_4bit = config.quantization == "nf4" and torch.cuda.is_available()
    checkpointing = config.gradient_checkpointing
    # transformers 5 renamed the argument (the old name warns); older versions only know the old one
    fields = TrainingArguments.__dataclass_fields__
    checkpointing_arg = (
        "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    )
    every = t.gradient_checkpointing_every  # > 1 only with checkpointing on (config.validate)
    sampling = (
        {"train_sampling_strategy": "group_by_length" if t.group_by_length else "random"}
        if "train_sampling_strategy" in fields
        else {"group_by_length": t.group_by_length}
    )
    return TrainingArguments(
        output_dir=str(RunDir(run_dir).checkpoints_dir),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=1,  # every step goes to metrics.jsonl; the console shows every log_steps
        logging_nan_inf_filter=False,  # a NaN loss must reach NonFiniteLossGuard, not be averaged away
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        eval_strategy="steps" if (t.eval_steps and has_eval) else "no",
        eval_steps=t.eval_steps or None,
        bf16=bf16,
        # the fused kernel, also on CPU: SmolLM2's full AdamW step 57 ms instead of 210 (BENCHMARKS.md 16)
        optim="paged_adamw_32bit" if on_gpu_4bit else "adamw_torch_fused",
        **{checkpointing_arg: checkpointing},
        **({f"{checkpointing_arg}_kwargs": {"every_n_layers": every}} if every > 1 else {}),
        **sampling,
        dataloader_pin_memory=torch.cuda.is_available(),
        # on a machine without a GPU this is also what lets a distributed launch use gloo on CPU
        use_cpu=not torch.cuda.is_available(),
        # tensorboard goes through our own callback (make_trainer): into the run's logs/ folder
        report_to=[name for name in t.report_to if name != "tensorboard"] or "none",
        run_name=config.name,
        include_num_input_tokens_seen="non_padding",  # the progress line's tokens/s
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )


def make_trainer(
    config: RunConfig,
    built: TunedModel,
    run_dir: Path,
    train_set: torch.utils.data.Dataset,
    eval_set: torch.utils.data.Dataset | None = None,
    callbacks: list[TrainerCallback] | None = None,
    data_collator: Any = None,
) -> TunelabTrainer:
    """The one way a Trainer is assembled for a config (train() and the benchmarks): arguments from
    the config, the method's optimizer and hooks, tunelab's loss, no transformers console output.
    Creating the arguments joins the other processes of a distributed run."""
    optimizer = built.method.create_optimizer(built.model, config.train.lr, config.train.weight_decay)
    trainer = TunelabTrainer(
        model=built.model,
        args=training_arguments(config, run_dir, eval_set is not None),
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=data_collator or collator(built.tokenizer),
        optimizers=(optimizer, None),
        callbacks=callbacks,
        method=built.method,
        chunked_loss=config.train.chunked_loss,
        keep_checkpoints=config.train.keep_checkpoints,
        grouped_lengths=config.train.group_by_length,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if "tensorboard" in config.train.report_to:
        from transformers.integrations import TensorBoardCallback

        tensorboard = TensorBoardCallback()
        tensorboard.logging_dir = str(RunDir(run_dir).logs_dir)
        trainer.add_callback(tensorboard)
    return trainer


def _check_resumable(config: RunConfig, run: RunDir, option: str = "--resume") -> dict[str, tuple]:
    """Resume only a run that exists, with the run's own config (wherever the folder now lives);
    `option`: the command-line option the errors name. Returns the settings of RESUMABLE_CHANGES that
    differ from the run's, as {key: (the run's, now)}, but where the folder lives and its name."""
    if not run.config_file.is_file():
        raise TunelabError(f"{option}: {run} holds no run to resume (no {CONFIG_FILE}); drop {option}")
    # through the schema: a key that a newer tunelab added (with its default) is not a change, and an
    # edited file's mistake is named by its line
    text = run.config_file.read_text()
    saved = flatten(validate(yaml.safe_load(text) or {}, str(run.config_file), text).model_dump(mode="json"))
    current = flatten(config.model_dump(mode="json"))
    saved["model"], current["model"] = model_location(saved["model"]), model_location(current["model"])
    differing = [key for key in sorted(set(saved) | set(current)) if current.get(key) != saved.get(key)]
    changed = [key for key in differing if key not in RESUMABLE_CHANGES]
    moved, not_moved = _moved_data(config, run, changed)
    changed = [key for key in changed if key not in moved]
    listed = ", ".join(
        f"{key} {current.get(key)} here, {saved.get(key)} in the run"
        + (f" ({not_moved[key]})" if key in not_moved else "")
        for key in changed
    )
    if changed and run.is_finished():  # nothing left to resume: this config is another run
        raise TunelabError(
            f"{option}: this config differs from {run.config_file}, a finished run ({listed}); train it "
            f"into another output_dir, or replace that run with --overwrite in place of {option}"
        )
    if not_moved:  # its own config names data that is gone or other: no command would resume it
        raise TunelabError(
            f"{option}: this config differs from {run.config_file} ({listed}); resume with the run's data "
            "where it had it, or train anew (another output_dir, or --overwrite)"
        )
    if changed:
        raise TunelabError(
            f"{option}: this config differs from {run.config_file} ({listed}); resume with the run's own "
            f"config: tunelab train {shell_word(run.config_file)} --resume"
        )
    return {key: (saved.get(key), current.get(key)) for key in differing if key not in ("output_dir", "name")}


def _moved_data(config: RunConfig, run: RunDir, keys: list[str]) -> tuple[list[str], dict[str, str]]:
    """Of the data keys among `keys`: those naming files whose rows are the ones the run recorded (moved,
    not changed), and why each other local file given in place of the run's is not."""
    data_keys = [key for key in keys if key in ("data.train", "data.eval")]
    given = {key: getattr(config.data, key.removeprefix("data.")) for key in data_keys}
    # check_source says a mistyped path, with the file it may mean; None: a built-in or a hub id
    local = [key for key, value in given.items() if value and check_source(value) is not None]
    if not local:
        return [], {}
    if not run.data_file.is_file():
        unchecked = "the run, older than data.json, keeps no sha256 of its rows to check a moved file by"
        return [], dict.fromkeys(local, unchecked)
    try:
        compared = compare_data(config.data, run.data_file)
    except DataError as unreadable:  # another file's shape (the run's data.columns name no column of it)
        return [], dict.fromkeys(local, f"other data: {unreadable}")
    moved = [key for key in local if key in compared and compared[key] is None]
    return moved, {key: f"other rows: {compared[key]}" for key in local if compared.get(key)}


def _record_moved_data(run: RunDir, config: RunConfig, keys: list[str]) -> None:
    """The run's config.yaml names its moved data files (`keys`) where they are now, so that later
    resumes and `tunelab eval` of the run find them."""
    text = run.config_file.read_text()
    saved = validate(yaml.safe_load(text) or {}, str(run.config_file), text)
    moved = {key.removeprefix("data."): getattr(config.data, key.removeprefix("data.")) for key in keys}
    data = saved.data.model_copy(update=moved)
    write_atomically(run.config_file, dump_config(saved.model_copy(update={"data": data})))


def can_resume(config: RunConfig) -> bool:
    """Whether `config`'s output_dir holds a run of this same config that `train(config, resume=True)`
    takes up: stopped with a complete checkpoint, or finished."""
    run = RunDir(config.resolved_output_dir())
    if not (run.is_finished() or run.latest_checkpoint()):
        return False
    try:
        _check_resumable(config, run)
    except Exception:  # another config, or a config.yaml that does not read: not this run to resume
        return False
    return True


def end_process_group() -> None:
    """Shut down a distributed run's process group before the process exits, as PyTorch asks: left to
    the interpreter's exit, gloo's threads were once torn down mid-flight in a finished 2-process run
    (a non-main process aborted with 'terminate called without an active exception')."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """Before the Trainer starts, the launcher's environment says which process this is."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class TrainedRun:
    """What train() hands back: the run folder, and the trained model in eval mode, so a caller
    evaluates it without loading it again (None when a finished run was resumed: nothing trained)."""

    run_dir: Path
    tuned: TunedModel | None


def _checkpointing_note(config: RunConfig, layers: int | None) -> str:
    """', gradient checkpointing (layers 0, 2, 4, ..., 28 of 30)' for the training line: which of the
    model's `layers` decoder layers recompute their activations."""
    if not config.gradient_checkpointing:
        return ""
    every = config.train.gradient_checkpointing_every
    if every == 1:
        return ", gradient checkpointing"
    if layers is None:
        return f", gradient checkpointing (layers 0, {every}, {2 * every}, ...)"
    recomputed = [str(layer) for layer in range(0, layers, every)]
    if len(recomputed) == 1:  # every >= layers: nearly off, which a typo in N may not have meant
        return f", gradient checkpointing (layer 0 of {layers} only)"
    shown = recomputed if len(recomputed) <= 4 else [*recomputed[:3], "...", recomputed[-1]]
    return f", gradient checkpointing (layers {', '.join(shown)} of {layers})"


def _check_checkpointing_support(config: RunConfig) -> None:
    """Before the model loads: train.gradient_checkpointing_every needs transformers' every_n_layers."""
    every = config.train.gradient_checkpointing_every
    takes = inspect.signature(PreTrainedModel._set_gradient_checkpointing).parameters
    if every > 1 and "every_n_layers" not in takes:
        raise TunelabError(
            f"train.gradient_checkpointing_every: {every} needs a transformers whose checkpointing takes "
            f"every_n_layers (5.23 does; this is {transformers.__version__}): upgrade it or drop the key"
        )


def train(
    config: RunConfig,
    resume: bool = False,
    overwrite: bool = False,
    untrained: TunedModel | None = None,
    resume_option: str = "--resume",
) -> TrainedRun:
    """Train `config` end to end; `untrained`: the model `build(config)` gives, when the caller has it
    already (the quickstart evaluates it first), so the base is not loaded twice; `resume_option`: the
    command-line option that asked to resume, as messages name it.

    The run folder is locked for the whole training (main process), so a second `tunelab train` into
    it fails at once; a finished run resumed is left as it is."""
    run = RunDir(config.resolved_output_dir())
    if not is_main_process():  # under accelerate launch: one process tells what all of them do
        console.quiet = True
    if resume:
        settings = _check_resumable(config, run, resume_option)
        if run.is_finished():
            console.print(
                f"{run} is finished ({run.final_dir} exists); nothing to resume, nothing changed. "
                "To train longer, start a new run with a higher train.max_steps or train.epochs."
            )
            return TrainedRun(run.path, None)
        for key, spec in (("data.train", config.data.train), ("data.eval", config.data.eval)):
            if spec:  # moved since the run started: the error says how to give its new place
                check_run_source(key, spec, f" on the command line with {resume_option}")
        check_held_out(
            config.data,
            run.holdout_file,
            "put the file back as it was, or train anew (another output_dir, or --overwrite)",
        )
        for key, (before, now) in settings.items():  # applied from here on; config.yaml keeps the run's
            if key.startswith("data."):  # moved, the same rows (_check_resumable): config.yaml follows it
                console.print(
                    f"resuming with {key} {now}: the rows the run started with, moved from {before} "
                    f"({run.config_file} now names it there)",
                    highlight=False,
                )
            else:
                console.print(f"resuming with {key} {now} ({before} in {run.config_file})", highlight=False)
        for key, how in compare_data(config.data, run.data_file).items():
            if how:
                source = getattr(config.data, key.removeprefix("data."))
                console.print(
                    f"[yellow]warning:[/] {key} ({escape(source)}) has changed since the run started "
                    f"({how}); the resumed steps read it as it is now"
                )
    _check_checkpointing_support(config)
    # a mistyped model or data path is the error to see first, before any about the output folder
    resolve_model(config.model)
    config = config.model_copy(update={"model": model_location(config.model)})
    if not resume:  # (checked above when resuming)
        for spec in filter(None, (config.data.train, config.data.eval)):
            check_source(spec)
    lock = run.lock() if is_main_process() else nullcontext()
    with lock:
        if not resume:
            run.check_can_start(overwrite)
        elif moved := [key for key in settings if key.startswith("data.")]:
            if is_main_process():
                _record_moved_data(run, config, moved)
        return _train_locked(config, run, resume, overwrite, untrained, resume_option)


def _train_locked(
    config: RunConfig,
    run: RunDir,
    resume: bool,
    overwrite: bool,
    untrained: TunedModel | None,
    resume_option: str,
) -> TrainedRun:
    # the data first: a bad row is found in seconds, not after the model has loaded
    tokenizer = load_tokenizer(resolve_model(config.model), config.data.chat_template)
    train_set = train_dataset(config.data, tokenizer)
    eval_set: TokenizedDataset | None = None
    if config.data.eval_name:
        # built even when no step evaluates: `tunelab eval` of this run reads it, and a bad row or an
        # unknown format is found now, not after the training
        checked = eval_dataset(
            config.data, tokenizer, limit=config.data.eval_limit, quiet=not config.train.eval_steps
        )
        eval_set = checked if config.train.eval_steps else None
    if untrained is None:
        # a spinner on a terminal, nothing in a log: the training line below follows the loading
        nf4 = " (4-bit nf4)" if config.quantization == "nf4" else ""
        with console.status(f"loading {escape(config.model)}{nf4} ..."):
            untrained = build(config, tokenizer)
    built = untrained

    # Making the trainer joins the other processes of a distributed run, each of which has already
    # checked the run directory above; only the main process writes to it, from here on.
    guard = NonFiniteLossGuard()
    stop_request = StopOnSignal()
    reporter = Reporter(built.method, MetricsWriter(run.metrics_file), config.train.log_steps)
    trainer = make_trainer(config, built, run.path, train_set, eval_set, [reporter, guard, stop_request])
    args = trainer.args
    with args.main_process_first(desc="run directory"):
        if args.should_save and not resume:  # a resumed run keeps its own config as it is
            if overwrite:
                run.clear()  # only now: everything above validated and loaded
            write_atomically(run.config_file, dump_config(config))
            if config.data.holdout is not None:  # `tunelab eval` checks that it reads these rows again
                write_atomically(run.holdout_file, json.dumps(holdout_record(config.data)))
            if record := data_record(config.data):  # resume knows the files again if they move
                write_atomically(run.data_file, json.dumps(record))
    checkpoint = run.latest_checkpoint() if resume else None
    if resume and checkpoint is None:
        what = f"{resume_option}: no complete checkpoint in {run.checkpoints_dir}; starting over"
        console.print(f"[yellow]{escape(what)}[/yellow]")
    elif resume:
        console.print(f"resuming from {escape(str(checkpoint))}")
    if resume and args.should_save:
        # once the checkpoint has loaded (a damaged one stops the run before anything changes)
        trainer.add_callback(TruncateOnResume(run, checkpoint_step(checkpoint) if checkpoint else 0))
    first_step = FirstStep()
    trainer.add_callback(first_step)
    console.print(
        f"training [bold]{config.method.name}[/bold] on {escape(config.model)} ({len(train_set)} examples"
        f"{f', {train_set.held_out} rows held out for eval' if train_set.held_out else ''}, "
        f"{'bf16' if args.bf16 else 'fp32'}{', base in 4-bit nf4' if config.quantization == 'nf4' else ''}"
        f"{_checkpointing_note(config, getattr(built.model.config, 'num_hidden_layers', None))}) -> "
        f"{escape(str(run))}"
    )
    with stop_request.installed():
        try:
            if checkpoint is not None and _is_last_step(checkpoint):
                # stopped after the last step's checkpoint, before final/: the Trainer would train a step
                # past max_steps (it checks only after a step), so the checkpoint's tensors are the result
                console.print(f"{checkpoint.name} holds the last step: writing the final weights")
                trainer._load_from_checkpoint(str(checkpoint))
            else:
                trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, without a checkpoint of this step
            last = run.latest_checkpoint()
            raise RunInterrupted(
                f"aborted; the steps after {f'the last checkpoint ({last.name})' if last else 'the start'} "
                f"are lost; resume with: tunelab train {shell_word(run.config_file)} --resume"
            ) from None
        except Exception as exc:
            if checkpoint is not None and not first_step.begun:
                raise _resume_failed(checkpoint, exc, resume_option) from exc
            raise
        finally:
            reporter.close()
    if guard.bad or trainer.nonfinite_step:
        what = f"the loss became {guard.bad[1]}" if guard.bad else "the weights became inf/NaN"
        step = guard.bad[0] if guard.bad else trainer.nonfinite_step
        raise TunelabError(
            f"training stopped: {what} at step {step}; nothing after the last good checkpoint "
            f"({run.latest_checkpoint() or 'none saved'}) was kept; lower train.lr, set "
            "train.max_grad_norm, or check the data"
        )
    if stop_request.stopped_at is not None:
        raise RunInterrupted(
            f"interrupted at step {stop_request.stopped_at}; resume with: "
            f"tunelab train {shell_word(run.config_file)} --resume"
        )
    if args.world_size > 1:
        check_replicas(built.method.checkpoint_tensors(built.model))
    if args.should_save:
        with atomic_directory(run.final_dir) as tmp:
            built.method.save(built.model, tmp)
    built.model.eval()
    return TrainedRun(run.path, built)


def _is_last_step(checkpoint: Path) -> bool:
    """Whether a checkpoint was saved at its run's last optimizer step (its Trainer state says so)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state["global_step"] >= state["max_steps"] > 0


def _resume_failed(checkpoint: Path, exc: Exception, option: str) -> ResumeFailed:
    """What failed before the first step of a resumed run, said as the checkpoint's fault."""
    if isinstance(exc, TunelabError):  # already says which file and how to fix it
        return ResumeFailed(str(exc))
    # its first sentence: what torch advises after it (to load untrusted pickles) is not for a damaged file
    reason = (str(exc).strip().splitlines() or [""])[0].split(". ")[0]
    return ResumeFailed(
        f"{option}: {checkpoint} did not load ({type(exc).__name__}: {reason}); remove that folder to "
        "resume from the checkpoint before it, or start over with --overwrite"
    )


def check_replicas(tensors: dict[str, torch.Tensor]) -> None:
    """Every process of a distributed run must end with the same trained tensors (same DyLoRA ranks,
    same SpIEL selections): compare one checksum per tensor across processes."""
    import torch.distributed as dist

    checksums = torch.tensor(
        [t.detach().double().sum().item() for t in tensors.values()], dtype=torch.float64
    )
    gathered = [torch.zeros_like(checksums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksums)
    if any(not torch.equal(other, gathered[0]) for other in gathered[1:]):
        raise TunelabError(
            "the processes of this distributed run ended with different weights; please report it"
        )
    if dist.get_rank() == 0:
        console.print(f"replicas agree: {dist.get_world_size()} processes hold the same trained tensors")
