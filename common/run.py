"""A stage run's lifecycle, in one object: `with Run(stage, args) as run:` around the stage's body.

Every stage: bad input or settings (a RecordError, a full disk included) end the run with the
message and exit 2, no traceback; the output locks are released however the run ends.

A training stage (bootstrap, apo): Run claims and locks the output folder, keeps the run's settings
(resume refuses other ones), resumes from the last checkpoint, says "nothing to do" for a finished
run, turns SIGTERM / Ctrl-C into a checkpoint and exit 75, stops before a non-finite loss reaches
the weights (exit 1), writes the checkpoints, metrics.jsonl, the final Hugging Face folder and,
last, the summary. The training loop itself stays in the stage; training.py builds what it runs
(accelerator, optimizer, schedule, batches, LoRA).

A journaled stage (collect, consensus, evaluate; `journaled=True`): Run hands out its outputs,
built by journal.py (the output locked and tied to its settings, the journals), and closes the
journals when the run ends. Once a journal given `kept` is open, Ctrl-C exits 130 and a full disk
exits 2 at once: the requests in flight are not waited for.

docs/RELIABILITY.md tells the guarantees.
"""

import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from common.journal import Journal, Output, Settled
from common.records import (DiskFull, OutputLock, RecordError, check_output_paths, disk_full_reported, fail,
                            lazy_import, on_main_process, release_locks, settings_mismatch, write_json_atomic)

torch = lazy_import("torch")  # loaded on first use: the stages' --help answers before torch is loaded


class Run:
    """A stage's run. Enter it around the whole stage (data reading included). A training stage:

        with Run("apo", args) as run:
            accelerator = run.start(vision, text_only_rows)
            if run.finished(config):
                return
            run.resume(module, total, what=f"{n} examples")
            for step in run.steps():               # a progress bar; checkpoints and signal stops after each
                ... run.check_finite(loss, step + 1) ... run.log(step + 1, metrics)
            run.save(module, processor, lora)
            run.summary(f"{n} examples", examples=n)

    A journaled stage:

        with Run("collect", args, journaled=True) as run:
            output = run.output(out)               # locked; output.tie(...) writes <out>.run.json
            parts = run.journal(path, kept="finished answers")
            done = parts.complete()                # what an earlier run journaled
            ... parts.open().append(record) ...

    project: the trackers' default project (default: the stage's name). journaled: the stage
    resumes from journals, not checkpoints: Run installs no signal handling, so Ctrl-C is Python's
    KeyboardInterrupt. bad_input: exceptions besides RecordError that end the run as bad input
    does (the message, exit 2).
    """

    def __init__(self, stage, args, project=None, journaled=False, bad_input=()):
        self.stage, self.args, self.project = stage, args, project or stage
        self.journaled, self.bad_input = journaled, (RecordError, ResumeMismatch, *bad_input)
        self.out = Path(args.out)
        self.accelerator = self.config = self.metrics = self.total = self.signals = self.progress = None
        self.start_step = 0
        self.journals = []
        self.says_errors = True  # False on the processes that leave the message to the main one

    def __enter__(self):
        if not self.journaled:
            self.signals = SignalStop()
        return self

    def __exit__(self, kind, error, traceback):
        """Bad input or settings end the run with the message and exit 2, a non-finite loss with
        exit 1 (its message names the intact checkpoint), a signal's stop with STOPPED_EXIT after
        its checkpoint; Ctrl-C and a full disk may end it at once (stop_at_once). The journals are
        closed, the signal handlers and the output locks released in every case."""
        try:
            for lines in self.journals:
                lines.close()
            if isinstance(error, (KeyboardInterrupt, DiskFull)):
                self.stop_at_once(error)
            if isinstance(error, self.bad_input):
                if not self.says_errors:
                    raise SystemExit(2)
                fail(str(error))
            if isinstance(error, NonFiniteLoss):
                print(f"error: {error}", file=sys.stderr)
                raise SystemExit(1)
            if isinstance(error, Stopped):
                raise SystemExit(STOPPED_EXIT) from None
        finally:
            if self.signals is not None:
                self.signals.restore()
            release_locks()
        return False

    # -----------------------------------------------------------------------------------------
    # A journaled stage

    def output(self, out, folder=False):
        """The stage's output (a file, or a folder), locked against a second writer until the run
        ends; .tie(...) records what decides it in <out>.run.json (journal.Output)."""
        return Output(out, f"{self.stage}.py", folder=folder)

    def journal(self, path, kept=None):
        """A JSONL journal (journal.Journal) that the run closes. kept, what it keeps ("finished
        answers"): once the journal is opened, Ctrl-C and a full disk stop the run at once, and
        Ctrl-C's message names it (stop_at_once)."""
        lines = Journal(path, kept)
        self.journals.append(lines)
        return lines

    def settled(self, out, instances, kind, kept=None):
        """The written and skipped instances of a stage that settles each once (journal.Settled),
        its two journals closed by the run; kept, what OUT keeps, as for journal()."""
        settled = Settled(out, instances, kind, kept)
        self.journals += [settled.written, settled.skipped]
        return settled

    def accelerate(self):
        """The Accelerator of a journaled stage whose processes all read the same input (evaluate):
        bad input then ends every process, and only the main one says why."""
        from accelerate import Accelerator

        self.accelerator = Accelerator()
        self.says_errors = self.accelerator.is_main_process
        return self.accelerator

    def stop_at_once(self, error):
        """Ctrl-C ends the process at once with exit 130, a full disk with exit 2, once a journal
        given `kept` has been opened: a normal exit would wait for the requests still in flight.
        What the journal holds is kept for the same command to resume. Without one this returns."""
        kept = [lines for lines in self.journals if lines.kept and lines.opened]
        if not kept:
            return
        if isinstance(error, KeyboardInterrupt):
            for lines in kept:
                print(f"\ninterrupted: {lines.kept} are kept in {lines.path}; run the same command again to "
                      "continue", file=sys.stderr, flush=True)
        else:
            print(f"error: {error}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130 if isinstance(error, KeyboardInterrupt) else 2)

    # -----------------------------------------------------------------------------------------
    # A training stage

    def start(self, vision, text_only_rows):
        """The Accelerator of the run, the output folder checked and locked, the seeds set.

        DDP must be told about parameters that get no gradient in a step: a VLM's trainable vision
        tower on a micro-batch without images.
        """
        from accelerate.utils import set_seed
        from transformers.utils import logging as hf_logging

        from common import training  # training.py imports this module's folder layout

        args = self.args
        hf_logging.disable_progress_bar()
        unused = vision and text_only_rows and not (args.freeze_vision or args.lora_rank)
        self.accelerator = training.build_accelerator(args, args.out, find_unused_parameters=unused)
        claim_output(self.accelerator, args.out, f"{self.stage}.py", inputs={"--data": args.data},
                     model_dirs={"--model": args.model})
        set_seed(args.seed)  # Python, NumPy and torch (CPU and every GPU), as evaluate.py seeds
        return self.accelerator

    def finished(self, config, say=True):
        """Whether OUT already holds this run, finished (said so when say); config, the settings
        that decide the result, is the run's from here on. A folder holding another run's
        checkpoints or finished model is refused now (ResumeMismatch), before any long work."""
        self.config = config
        done = finished_run(self.out, config)
        if done is not None and say:
            self.accelerator.print(f"{self.stage}: nothing to do, {self.out} already holds the finished model "
                                   f"({done['steps']} steps, final loss {loss_text(done['final_loss'])})")
        return done is not None

    def resume(self, module, total, what, unit=""):
        """The step to start from: the last checkpoint's (loaded), or 0 (with --init-from, that
        checkpoint's weights). Opens the metrics and trackers, arms the signals for the loop and
        says what it trains: "<stage>: <what>, <total> steps of <global batch><unit> (...)"."""
        from common.training import describe_steps

        accelerator, args, out, config = self.accelerator, self.args, self.out, self.config
        state = resume_from_checkpoint(accelerator, out, config) or {}
        start = state.get("step", 0)
        if total is not None and start > total:
            raise ResumeMismatch(f"{out} has {start} steps done, more than this run's {total}: a run continues to "
                                 f"more steps, never fewer (the checkpoints are in {run_folder(out) / CHECKPOINTS})")
        saved = state.get("config") or {}
        if saved and any(saved.get(k) != config.get(k) for k in LENGTH_SETTINGS) and accelerator.is_main_process:
            record_provenance(out, {"event": "continued", "from_step": start,
                                    **{k: [saved.get(k), config.get(k)] for k in LENGTH_SETTINGS}})
            accelerator.print(f"continuing the run from step {start} with " + ", ".join(
                f"{k} {saved.get(k)} -> {config.get(k)}" for k in LENGTH_SETTINGS if saved.get(k) != config.get(k)))
        self.metrics = Metrics(accelerator, out, resumed_step=start)
        if args.report_to:
            name = args.run_name or run_folder(out).name.removesuffix(".run")
            accelerator.init_trackers(args.project or self.project,
                                      config={k: v for k, v in config.items() if v is not None},
                                      init_kwargs={"wandb": {"name": name}, "trackio": {"name": name},
                                                   "mlflow": {"run_name": name}})
        init_weights(accelerator, module, config, start)
        self.start_step, self.total = start, total
        self.signals.armed = True
        accelerator.print(f"{self.stage}: {what}, " + describe_steps(accelerator, args, total, start, unit), flush=True)
        return start

    def check_finite(self, loss, step, instances=()):
        """Stop before a non-finite loss reaches the weights; nothing is saved after it. loss is
        reduced over all processes, so every process stops at the same step; instances (ids) are
        named so the data can be looked at."""
        if torch.isfinite(loss).all():
            return
        found = checkpoint_dirs(self.out)
        where = (f"The last checkpoint ({found[-1]}) is intact and the same command resumes from it"
                 if found else "No checkpoint was written yet")
        message = (f"loss is {loss.item()} at step {step}; stopping. {where}, but the same data and settings give "
                   f"the same loss: check the data, or lower --lr in a new output folder.")
        if instances:
            ids = sorted(instances)
            message += f" Instances in this step: {', '.join(ids[:10])}" + (" …" if len(ids) > 10 else "")
        raise NonFiniteLoss(message)

    def steps(self):
        """The loop's optimizer steps, from the resumed one to the last, on a progress bar. After
        each step's body: end_of_step (a checkpoint when due, a signal's stop)."""
        from tqdm.auto import tqdm

        self.progress = tqdm(total=self.total, initial=self.start_step, desc=self.stage,
                             disable=not self.accelerator.is_local_main_process)
        try:
            for step in range(self.start_step, self.total):
                yield step
                self.progress.update(1)
                self.end_of_step(step + 1)
        finally:
            self.progress.close()

    def log(self, step, values, shown=("loss",)):
        """A training step's metrics: `shown` on the progress bar; every --log-every steps and at the
        last, metrics.jsonl and the trackers' train/."""
        self.progress.set_postfix({name: f"{values[name]:.4f}" for name in shown})
        if step % self.args.log_every == 0 or step == self.total:
            self.metrics.log(step, values)

    def log_eval(self, step, values):
        """The held-out metrics at a step: eval_<name> in metrics.jsonl, eval/<name> in the trackers."""
        self.metrics.log_eval(step, values)

    def end_of_step(self, done):
        """After optimizer step `done`: checkpoint when --save-every is due or a signal asked to
        stop; a stop then ends the run (Stopped, exit STOPPED_EXIT) with the message to rerun."""
        accelerator, args, total = self.accelerator, self.args, self.total
        stopping = done < total and self.signals.requested(accelerator)
        due = args.save_every and done % args.save_every == 0 and done < total
        if not (due or stopping):
            return
        path = save_checkpoint(accelerator, self.out, done, {"config": self.config}, keep=args.keep_checkpoints)
        if stopping:
            accelerator.print(f"stopped by a signal after step {done} of {total}; checkpoint {path}. Run the same "
                              f"command again to resume from it (exit status {STOPPED_EXIT}).", file=sys.stderr,
                              flush=True)
            raise Stopped()

    def save(self, module, processor, lora=None):
        """The last checkpoint (unless a resumed run had nothing left to train) and the model folder."""
        if self.start_step < self.total or not checkpoint_dirs(self.out):
            save_checkpoint(self.accelerator, self.out, self.total, {"config": self.config},
                            keep=self.args.keep_checkpoints)
        save_hf_folder(self.accelerator, module, processor, self.out, lora=lora)

    def summary(self, what, **fields):
        """training_summary.json, written last (its presence means "finished"): the settings, the
        steps, fields, the first and final loss and the run's history; then the trackers end and
        the closing line says "<stage>: <total> steps on <what>; loss <first> -> <final>; model in <out>"."""
        summary = write_summary(self.accelerator, self.out, {"config": self.config, "steps": self.total, **fields},
                                stage=self.stage)
        self.accelerator.end_training()
        first, final = loss_text(summary["first_loss"]), loss_text(summary["final_loss"])
        self.accelerator.print(f"{self.stage}: {self.total} steps on {what}; loss {first} -> {final}; model in {self.out}")
        return summary


# ---------------------------------------------------------------------------------------------
# Where a run writes: the model folder OUT, and the run folder OUT.run beside it


CHECKPOINTS = "checkpoints"

METRICS = "metrics.jsonl"

# A checkpoint's step and settings. Not "trainer_state.json": that is the HF Trainer's file, with
# other content; checkpoints written under that name are still read.
CHECKPOINT_STATE = "run_state.json"

OLD_CHECKPOINT_STATE = "trainer_state.json"


def checkpoint_state_file(folder):
    """A checkpoint folder's state file (the older name where only that exists), or None."""
    for name in (CHECKPOINT_STATE, OLD_CHECKPOINT_STATE):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


# What a run writes besides the model: it lives in the run folder beside the model folder, so the
# model folder holds only what from_pretrained and vLLM read (vLLM's default loader takes every
# *.safetensors of a folder without an index as weights).
RUN_FILES = (METRICS, "training_summary.json", CHECKPOINTS, "reference_logps.safetensors", "logs", "adapter")


def run_folder(out_dir):
    """Where a training stage keeps everything but the model: <out>.run beside the model folder <out>
    (checkpoints/, metrics.jsonl, training_summary.json, logs/, adapter/, the lock, apo.py's cache)."""
    out_dir = Path(out_dir)
    if out_dir.name in ("", ".", ".."):
        out_dir = out_dir.resolve()
    if not out_dir.name:  # the root of the file system has no name to put .run after
        raise RecordError(out_dir, None, None, "is the root of the file system; choose an output folder of its own")
    return out_dir.with_name(out_dir.name + ".run")


def migrate_old_layout(out_dir):
    """Move a run written with the model folder holding the run's files (metrics, summary,
    checkpoints, cache, adapters, lock) into the run folder, saying so; returns what moved. A file
    already in both places is refused: the two runs cannot be told apart."""
    out_dir, run = Path(out_dir), run_folder(out_dir)
    moved = []
    for name in RUN_FILES:
        old = out_dir / name
        if not old.exists():
            continue
        if (run / name).exists():
            raise RecordError(old, None, None, f"an older layout put this in the model folder, and {run / name} "
                                               "exists too; move one of them away")
        run.mkdir(parents=True, exist_ok=True)
        os.replace(old, run / name)
        moved.append(name)
    if (out_dir / ".lock").is_file():
        (out_dir / ".lock").unlink()
    if moved:
        print(f"note: {out_dir} was written with the run's files inside the model folder; moved "
              f"{', '.join(moved)} to {run} (the model folder now holds only the model)", file=sys.stderr, flush=True)
    return moved


def claim_output(accelerator, out_dir, stage, inputs, model_dirs):
    """Before any model work: the output folder overwrites no input and is not the model folder
    read, is writable, and is locked (main process) against a second run on it; the lock is held
    until the process ends."""
    check_output_paths(folders=[out_dir, run_folder(out_dir)], inputs=inputs, model_dirs=model_dirs)

    def lock_and_migrate():
        lock = OutputLock(run_folder(out_dir), stage, folder=True)
        migrate_old_layout(out_dir)
        return lock

    return on_main_process(accelerator, lock_and_migrate)


class NonFiniteLoss(RuntimeError):
    pass


class ResumeMismatch(ValueError):
    """The output folder holds a run with other settings; resuming it would mix two runs."""


class Stopped(Exception):
    """A signal stopped the run after a checkpoint (the message is already printed)."""


config_mismatch = settings_mismatch  # 'key: saved -> now' for each setting that differs


# ---------------------------------------------------------------------------------------------
# A finished run, and what a resumed run continues


SUMMARY = "training_summary.json"


def finished_run(out_dir, config):
    """The summary of a finished run in out_dir with these settings; None if there is none.

    Called before any long work: a folder holding another run's checkpoints or finished model is
    refused (ResumeMismatch) rather than mixed into. A rerun of a finished run does nothing: saving
    the model again would change its folder's fingerprint, and evaluate.py would then refuse the
    predictions already made with it.
    """
    checkpoint_state(out_dir, config)
    path = run_folder(out_dir) / SUMMARY
    if not path.is_file() and not finish_summary_rename(path):
        return None
    summary = json.loads(path.read_text())
    diff = config_mismatch(summary.get("config") or {}, config)
    if diff and not run_mismatch(summary.get("config") or {}, config):
        return None  # a longer run: it continues from the last checkpoint (Run.resume records it)
    if diff:
        raise ResumeMismatch(f"{out_dir} holds a finished run with other settings ({diff}); use another --out, "
                             f"or --init-from one of its checkpoints to start a new run from its weights")
    return summary


def finish_summary_rename(path):
    """A run killed between writing its summary and renaming it has saved everything before (the
    summary is written last): the rename is finished, so the rerun does not save the model again
    (new modification times, a new fingerprint, predictions refused). A torn summary is dropped and
    the run finishes the usual way. Returns whether the summary is now in place."""
    tmp = path.with_name(path.name + ".tmp")
    # every process may get here at once: each check ends by looking again, since the rename of
    # another process is atomic (the .tmp is gone only once the summary is there)
    if not tmp.is_file():
        return path.is_file()
    try:
        json.loads(tmp.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        tmp.unlink(missing_ok=True)
        return path.is_file()
    try:
        os.replace(tmp, path)
    except FileNotFoundError:
        pass
    return path.is_file()


# A run continues under a larger --max-steps or --epochs: the settings that only say how long it is.
LENGTH_SETTINGS = ("max_steps", "epochs")


def run_mismatch(saved, now):
    """The settings that differ between two runs' configs, their length left aside."""
    return config_mismatch({k: v for k, v in saved.items() if k not in LENGTH_SETTINGS},
                           {k: v for k, v in now.items() if k not in LENGTH_SETTINGS})


def init_weights(accelerator, module, config, start):
    """A new run (start 0) with --init-from: load that checkpoint's weights into the prepared module.
    The checkpoint must come from the same --model (its fingerprint), and hold every weight this
    run trains (the adapters alone for LoRA)."""
    record = config.get("init_from")
    if not record or start > 0:
        return
    from safetensors.torch import load_file

    if record["model_fingerprint"] != config["model_fingerprint"]:
        raise ResumeMismatch(f"--init-from {record['checkpoint']}: that run trained another --model (its fingerprint "
                             f"differs); start from a checkpoint of a run on {config['model']}")
    state = load_file(str(Path(record["checkpoint"]) / "model.safetensors"))
    unwrapped = accelerator.unwrap_model(module)
    _, unexpected = unwrapped.load_state_dict(state, strict=False)
    trained = {name for name, p in unwrapped.named_parameters() if p.requires_grad}
    if unexpected or trained - set(state):
        raise ResumeMismatch(f"--init-from {record['checkpoint']}: its weights do not fit this run "
                             f"({len(trained - set(state))} missing, {len(unexpected)} unexpected; LoRA settings "
                             "must match)")
    accelerator.print(f"weights from {record['checkpoint']} (step {record['step']})", flush=True)


PROVENANCE = "provenance.jsonl"


def record_provenance(out_dir, event):
    """One line of the run's history (continued longer, started from another run's checkpoint);
    write_summary copies the history into training_summary.json."""
    path = run_folder(out_dir) / PROVENANCE
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(dict(event, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))) + "\n")


def read_provenance(out_dir):
    path = run_folder(out_dir) / PROVENANCE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


# ---------------------------------------------------------------------------------------------
# Checkpoints: accelerate's save_state (model, optimizer, scheduler, RNG) plus the run's step


def checkpoint_dirs(out_dir):
    root = run_folder(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and checkpoint_state_file(p) is not None]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(accelerator, out_dir, step, state, keep=2):
    """Write to a temporary folder, then rename: a kill mid-write never spoils the last checkpoint.

    run_state.json is written last, so a folder without it is never taken for a checkpoint.
    """
    root = run_folder(out_dir) / CHECKPOINTS
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    previous = checkpoint_dirs(out_dir)
    resumes = (f"the same command resumes from {previous[-1]}" if previous
               else "no checkpoint was complete yet, so the same command starts from step 0")
    with disk_full_reported(final, leftovers=[tmp], resumes=resumes):
        accelerator.save_state(str(tmp), safe_serialization=True)
        # Every rank writes its own shards and RNG state: rename only once all of them are done.
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json_atomic(tmp / CHECKPOINT_STATE, dict(state, step=step, saved_at=time.time()))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        for old in checkpoint_dirs(out_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.print(f"checkpoint: step {step} -> {final}", flush=True)
    return final


def resume_from_checkpoint(accelerator, out_dir, config=None):
    """Restore the latest checkpoint in out_dir; returns its trainer state, or None to start fresh.

    With config (the settings that decide the result: data hash, model, batch, schedule …), a
    checkpoint saved under other settings raises ResumeMismatch before anything is loaded. The
    checkpoint must then carry the config in its state (save_checkpoint(..., dict(config=config))).
    """
    state = checkpoint_state(out_dir, config)
    if state is not None:
        accelerator.load_state(str(checkpoint_dirs(out_dir)[-1]))
    return state


def checkpoint_state(out_dir, config=None):
    """The latest checkpoint's trainer state (None if there is none), checked against config as
    resume_from_checkpoint checks it, without loading anything: a stage can refuse a mismatched
    folder before long work (apo.py's reference pass) rather than after."""
    found = checkpoint_dirs(out_dir)
    if not found:
        return None
    state = json.loads(checkpoint_state_file(found[-1]).read_text())
    if config is not None:
        diff = run_mismatch(state.get("config") or {}, config)
        if diff:
            raise ResumeMismatch(f"{found[-1]} was saved by a run with other settings ({diff}); rerun with the same "
                                 f"settings to resume (a larger --max-steps or --epochs continues it), or start a "
                                 f"new run from its weights in another output folder: --init-from {found[-1]}")
    return state


# A full disk at the final save: the last checkpoint is the finished run's, so nothing is trained again.
RESUMES_FROM_LAST_CHECKPOINT = "the same command resumes from the last checkpoint"


# ---------------------------------------------------------------------------------------------
# Metrics


class Metrics:
    """metrics.jsonl on the main process (appended, so a resumed run continues the curve), plus
    accelerate's trackers when --report-to names any.

    Names are TRL's: a line of metrics.jsonl is what TRL's log_history holds (`loss`,
    `learning_rate`, `grad_norm`, `epoch`, `rewards/chosen` …; evaluation lines `eval_loss`,
    `eval_rewards/chosen` …), and the trackers get them under `train/` and `eval/`, as the
    Trainer's TensorBoard and wandb callbacks write them. Values are written unrounded: a
    learning rate of 5e-7 is not 0.
    """

    def __init__(self, accelerator, out_dir, resumed_step=0):
        self.accelerator = accelerator
        self.path = run_folder(out_dir) / METRICS
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if accelerator.is_main_process and self.path.exists():
            # Lines after the checkpoint we resume from belong to steps that will be redone.
            kept = [l for l in self.path.read_text().splitlines() if l.strip() and _step_of(l) <= resumed_step]
            self.path.write_text("".join(l + "\n" for l in kept))

    def log(self, step, values):
        """A training step's metrics."""
        self._write(step, values)
        self.accelerator.log({f"train/{k}": v for k, v in values.items() if v is not None}, step=step)

    def log_eval(self, step, values):
        """Metrics on the held-out data at a step: eval_<name> in metrics.jsonl, eval/<name> in the trackers."""
        self._write(step, {f"eval_{k}": v for k, v in values.items()})
        self.accelerator.log({f"eval/{k}": v for k, v in values.items() if v is not None}, step=step)

    def _write(self, step, values):
        if self.accelerator.is_main_process:
            # a line torn by a full disk is dropped on resume (_step_of), with the steps it follows
            with disk_full_reported(self.path, resumes=RESUMES_FROM_LAST_CHECKPOINT), open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")


def _step_of(line):
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return math.inf  # a torn line is dropped


def read_losses(out_dir):
    path = run_folder(out_dir) / METRICS
    if not path.is_file():
        return []
    lines = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [line["loss"] for line in lines if "loss" in line]  # training lines, not evaluation ones


def last_metrics(out_dir):
    """The last training line and the last evaluation line of metrics.jsonl ({} when none)."""
    path = run_folder(out_dir) / METRICS
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    train = [line for line in lines if "loss" in line]
    held_out = [line for line in lines if "eval_loss" in line]
    return (train[-1] if train else {}), (held_out[-1] if held_out else {})


# ---------------------------------------------------------------------------------------------
# The final model folder and the summary


def without_tied_copies(model, state):
    """The state dict without the second name of a tied parameter (lm_head.weight of tied
    embeddings). FSDP and DeepSpeed gather every name into its own tensor, so save_pretrained
    would write both, and the folder would differ from a one-process run's."""
    first = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(param), name)
    copies = {name for name, param in model.named_parameters(remove_duplicate=False) if first[id(param)] != name}
    return {k: v for k, v in state.items() if k not in copies}


def save_hf_folder(accelerator, model, processor, out_dir, lora=None):
    """The final model as a folder from_pretrained loads: safetensors, config, tokenizer/processor.

    With lora (add_lora's PeftModel) the folder holds the merged weights, and the run folder's
    adapter/ the adapters alone, so a user can keep either.

    get_state_dict gathers FSDP / DeepSpeed shards; weights are written into a temporary folder
    and renamed, so an interrupted save never leaves a half model where a good one was.
    """
    out_dir = Path(out_dir)
    if lora is not None:
        save_adapter(accelerator, lora, run_folder(out_dir) / ADAPTER)
        model = lora.merge_and_unload()  # the adapters folded into the base weights, in place
    tmp = run_folder(out_dir) / ".tmp-model"  # outside the model folder, which holds only the model
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        unwrapped = accelerator.unwrap_model(model)
        if not hasattr(unwrapped, "save_pretrained"):  # a wrapper such as modeling.ResponseLogps
            unwrapped = unwrapped.model
            state = {k.removeprefix("model."): v for k, v in state.items()}
        state = without_tied_copies(unwrapped, state)
        unwrapped.config.use_cache = True
        with disk_full_reported(out_dir, leftovers=[tmp], resumes=RESUMES_FROM_LAST_CHECKPOINT):
            unwrapped.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            processor.save_pretrained(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for item in tmp.iterdir():
            os.replace(item, out_dir / item.name)
        tmp.rmdir()
    accelerator.wait_for_everyone()


ADAPTER = "adapter"


def save_adapter(accelerator, lora, folder):
    """The adapters alone as peft's folder (PeftModel.from_pretrained(base, folder) loads it),
    written into a temporary folder and renamed like every output."""
    folder = Path(folder)
    if accelerator.is_main_process:
        tmp = folder.with_name(".tmp-" + folder.name)
        if tmp.exists():
            shutil.rmtree(tmp)
        with disk_full_reported(folder, leftovers=[tmp], resumes=RESUMES_FROM_LAST_CHECKPOINT):
            lora.save_pretrained(tmp, safe_serialization=True)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    accelerator.wait_for_everyone()


def loss_text(loss):
    """A loss as the closing lines print it: four decimals, "none" when no step was logged."""
    return "none" if loss is None else f"{loss:.4f}"


def write_summary(accelerator, out_dir, summary, stage=None):
    """training_summary.json, written last: its presence means "finished". first_loss and
    final_loss come from metrics.jsonl, so a resumed run reports its whole curve. With stage, the
    model folder's card (README.md) is written just before it."""
    losses = read_losses(out_dir) if accelerator.is_main_process else []
    summary = dict(summary, first_loss=losses[0] if losses else None, final_loss=losses[-1] if losses else None)
    if accelerator.is_main_process:
        summary["provenance"] = read_provenance(out_dir)
        if stage:
            write_model_card(out_dir, stage, summary)
        write_json_atomic(run_folder(out_dir) / SUMMARY, summary)
    accelerator.wait_for_everyone()
    return summary


CITATION = """@inproceedings{yang2026apo,
  title     = {Turning Drift into Constraint: Robust Reasoning Alignment in Non-Stationary Multi-Stream Environments},
  author    = {Yang and Yu and Duan and Lu},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2026},
  eprint    = {2510.04142},
  archivePrefix = {arXiv}
}"""


STAGES = {"bootstrap": "supervised bootstrapping on the union of the source trajectories (bootstrap.py)",
          "apo": "constraint-aware preference optimisation, APO (apo.py)"}


def write_model_card(out_dir, stage, summary):
    """README.md of the model folder, as the Hub shows it: base model, stage, data, settings, final
    metrics and the paper to cite. The data is named by its hash: the card travels with the model."""
    config = summary["config"]
    train, held_out = last_metrics(out_dir)
    settings = "\n".join(f"| {k} | {v} |" for k, v in config.items()
                         if k not in ("model", "model_fingerprint", "data_sha256") and v is not None)
    metrics = "\n".join(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |"
                        for k, v in {**train, **held_out}.items())
    first, final = loss_text(summary.get("first_loss")), loss_text(summary.get("final_loss"))
    card = f"""---
base_model: {json.dumps(config["model"])}
library_name: transformers
tags: [apo, {"sft" if stage == "bootstrap" else "preference-optimization"}]
---

# {Path(out_dir).resolve().name}

{STAGES[stage]}, with the reference implementation of Autonomous Preference Optimization
(arXiv 2510.04142). Load it with `AutoModelForCausalLM.from_pretrained` (a VLM:
`AutoModelForImageTextToText`), `pipeline`, or `vllm serve`.

- Base model: `{config["model"]}`
- Training data: sha256 `{config["data_sha256"]}`
- Steps: {summary.get("steps")}; first loss {first}, final loss {final}

## Settings

| setting | value |
|---|---|
{settings}

## Final metrics (TRL's names; eval_ on the held-out data)

| metric | value |
|---|---|
{metrics}

## Citation

```bibtex
{CITATION}
```
"""
    tmp = Path(out_dir) / ".README.md.tmp"
    tmp.write_text(card, encoding="utf-8")
    os.replace(tmp, Path(out_dir) / "README.md")


# ---------------------------------------------------------------------------------------------
# Signals: a checkpoint, then exit 75


# Exit status of a stage stopped by SIGTERM / SIGINT after writing a checkpoint: EX_TEMPFAIL,
# "try again", because the same command resumes exactly where it stopped.
STOPPED_EXIT = 75


class SignalStop:
    """SIGTERM (a cluster's preemption) and SIGINT (Ctrl-C) stop a training stage cleanly once its
    loop runs (armed): the current optimizer step finishes, a checkpoint is written, and the stage
    exits STOPPED_EXIT. Before the loop there is nothing to save and the signal ends the run at
    once, as does a second signal (status 128 + signal number, no traceback)."""

    def __init__(self):
        self.signum, self.armed = 0, False
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        self.wakeup = self._count_deliveries()

    def _count_deliveries(self):
        """Python runs a handler once for signals that arrive while the main thread is inside one
        long C call (a forward, a backward), so two SIGTERMs 0.05 s apart would count as one. The
        interpreter also writes a byte per delivery to the wakeup fd: a thread counts those and ends
        the run at the second one. Returns (previous wakeup fd, write end), or None off the main thread."""
        import threading

        read, write = os.pipe()
        os.set_blocking(write, False)
        try:
            previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        except ValueError:  # not the main thread: the handler alone counts
            os.close(read)
            os.close(write)
            return None
        threading.Thread(target=self._second_delivery_stops, args=(read,), daemon=True).start()
        return previous, write

    def _second_delivery_stops(self, read):
        stops = {int(signal.SIGTERM), int(signal.SIGINT)}
        seen = []
        with os.fdopen(read, "rb", buffering=0) as pipe:
            while data := pipe.read(64):
                seen += [signal.Signals(signum).name for signum in data if signum in stops]
                if len(seen) >= 2:
                    print(f"\n{seen[0]}, then {seen[1]}: stopping at once; run the same command again to resume "
                          "from the last checkpoint", file=sys.stderr, flush=True)
                    os._exit(128 + getattr(signal, seen[1]))

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum or not self.armed:
            print(f"\n{name}: stopping at once" + ("" if self.signum else " (no training step was done yet)")
                  + "; run the same command again to resume from the last checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(f"\n{name}: finishing this optimizer step, then writing a checkpoint (send it again to stop at once)",
              file=sys.stderr, flush=True)

    def requested(self, accelerator):
        """Whether any process got a signal: reduced, so every process stops after the same step."""
        if accelerator.num_processes == 1:
            return bool(self.signum)
        from common.training import global_count

        return global_count(accelerator, bool(self.signum)) > 0

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if self.wakeup is not None:
            previous, write = self.wakeup
            signal.set_wakeup_fd(previous)
            os.close(write)  # the counting thread reads the end of the pipe and stops
            self.wakeup = None
