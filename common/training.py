"""What bootstrap.py and apo.py build their loop from: flags, the accelerator, the model in train
mode (LoRA adapters if asked), optimizer and schedule, the optimizer step, and the batch order.

The loop itself stays in each script (it is the method); the run's lifecycle (output folder,
resume, checkpoints, metrics, signals, the final save and summary) is common/run.py's Run.
Multi-GPU and multi-node come from `accelerate launch` (DDP, FSDP, DeepSpeed configs); nothing here
is home-made distribution.
"""

import functools
import json
import logging
import math
import os
import random
import re
import sys
from pathlib import Path

from common.records import RecordError, fail, file_hash, lazy_import
from common.run import ADAPTER, CHECKPOINT_STATE, NonFiniteLoss, ResumeMismatch, checkpoint_state_file, run_folder

torch = lazy_import("torch")  # loaded on first use: the stages' --help answers before torch is loaded


def add_training_args(parser, lr, max_length, batch_size=2, grad_accum=16, warmup=0.05, global_batch=None):
    """The loop flags both training stages take; defaults come from each stage's official recipe.

    With global_batch set, the parser takes --global-batch (examples per optimizer step over all
    processes, so the recipe's effective batch holds on any number of GPUs) and --grad-accum
    defaults to what it implies (resolve_grad_accum); without it, --grad-accum defaults to grad_accum.
    """
    g = parser.add_argument_group("training")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate (default: %(default)s)")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default: %(default)s)")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=batch_size, help="examples per device per micro-batch (default: %(default)s)")
    if global_batch is None:
        g.add_argument("--grad-accum", type=int, default=grad_accum,
                       help="micro-batches per optimizer step; global batch = batch-size x processes x grad-accum (default: %(default)s)")
    else:
        g.add_argument("--global-batch", type=int, default=global_batch,
                       help="examples per optimizer step over all processes; sets --grad-accum to "
                            "global-batch / (batch-size x processes) (default: %(default)s)")
        g.add_argument("--grad-accum", type=int, default=None,
                       help="micro-batches per optimizer step; overrides --global-batch "
                            "(global batch = batch-size x processes x grad-accum)")
    g.add_argument("--mixed-precision", choices=["auto", "bf16", "fp16", "no"], default="auto",
                   help="'auto': the accelerate config's setting, else bf16 on GPU, fp32 on CPU. Weights and "
                        "optimizer state stay fp32 (updates at these learning rates are below bf16 resolution); "
                        "bf16 is the compute dtype (default: %(default)s)")
    g.add_argument("--warmup", type=float, default=warmup, help="share of steps with linear warmup (default: %(default)s)")
    g.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine",
                   help="decay after warmup (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: %(default)s)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm, 0 to disable (default: %(default)s)")
    g.add_argument("--max-length", type=int, default=max_length, help="tokens per prompt+response; responses are cut, prompts never (default: %(default)s)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward to save memory")
    g.add_argument("--freeze-vision", action="store_true", help="VLMs: keep the vision tower frozen")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N optimizer steps (0: only at the end, and when SIGTERM / "
                        "Ctrl-C stops the run)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept on disk (default: %(default)s)")
    g.add_argument("--log-every", type=int, default=1, help="write metrics every N optimizer steps (default: %(default)s)")
    g.add_argument("--report-to", default=None,
                   help="accelerate trackers, e.g. tensorboard,wandb (metrics.jsonl is always written); metrics "
                        "go under train/ and eval/ with TRL's names; TensorBoard writes to OUT.run/logs/PROJECT")
    g.add_argument("--project", default=None,
                   help="the trackers' project (wandb, trackio, mlflow experiment; TensorBoard's subfolder) "
                        "(default: the stage's name)")
    g.add_argument("--run-name", default=None,
                   help="the run's name in wandb, trackio and mlflow (default: the --out folder's name)")
    g.add_argument("--init-from", metavar="CHECKPOINT", default=None,
                   help="start from the weights of another run's checkpoint (OUT.run/checkpoints/step-N of the same "
                        "--model) with a fresh optimizer and schedule, e.g. with another --lr; recorded in the "
                        "run's settings. apo.py's reference stays --model's")
    g.add_argument("--eval-data", default=None,
                   help="held-out data in the --data format: evaluated every --eval-every steps and at the end, "
                        "written as eval_* lines of metrics.jsonl and eval/* in the trackers (TRL's eval_strategy)")
    g.add_argument("--eval-every", type=int, default=0,
                   help="with --eval-data: evaluate every N optimizer steps (0: at the end only) (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed for data order and initialisation (default: %(default)s)")
    return g


def eval_due(args, done, total):
    """Whether the held-out data is evaluated after optimizer step `done`."""
    return bool(args.eval_data) and (done == total or (args.eval_every > 0 and done % args.eval_every == 0))


def held_out_batches(n, batch_size, accelerator):
    """This process's share of the held-out batches (rows 0..n-1 in order), each with whether it
    counts: every process runs the same number of forwards (FSDP's are collective), so the list
    is padded with repeats of the last batch, which count nothing."""
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    real = len(batches)
    batches += batches[-1:] * (-len(batches) % accelerator.num_processes)
    return [(batches[i], i < real) for i in range(accelerator.process_index, len(batches), accelerator.num_processes)]


def parse_with_config(parser, argv=None):
    """parser's arguments, with --config FILE.yaml read first: its keys are the flags (`lr: 1.0e-5`,
    `lora-rank: 8`, `share-prompt: true`), so the command line, read after it, overrides it."""
    import argparse

    parser.add_argument("--config", metavar="FILE.yaml", help="a YAML file whose keys are this script's flags "
                        "(e.g. configs/apo-paper-recipe.yaml); flags given on the command line override it")
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    return parser.parse_args(config_flags(parser, known.config) + argv if known.config else argv)


def config_flags(parser, path):
    """The flags a YAML config stands for, as command-line tokens; unknown keys and values that are
    not a scalar name their file and line."""
    try:
        import yaml
    except ImportError:
        fail("--config needs the pyyaml package: pip install pyyaml")
    try:
        root = yaml.compose(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise SystemExit(f"error: {path}: cannot read the config ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise SystemExit(f"error: {path}: not YAML ({e})") from None
    if root is None:
        return []
    if not isinstance(root, yaml.MappingNode):
        raise SystemExit(f"error: {path}: expected a mapping of flag: value")
    flags = {option: action for action in parser._actions for option in action.option_strings}
    tokens = []
    for key_node, value_node in root.value:
        line, key = key_node.start_mark.line + 1, str(key_node.value)
        option = "--" + key.removeprefix("--").replace("_", "-")
        action = flags.get(option)
        if action is None or option == "--config":
            raise SystemExit(f"error: {path}:{line}: field '{key}': not a flag of {parser.prog}")
        if not isinstance(value_node, yaml.ScalarNode):
            raise SystemExit(f"error: {path}:{line}: field '{key}': expected a single value")
        value = yaml.safe_load(yaml.serialize(value_node))
        if action.nargs == 0:  # a switch: true turns it on, false leaves it off
            if not isinstance(value, bool):
                raise SystemExit(f"error: {path}:{line}: field '{key}': expected true or false")
            tokens += [option] if value else []
        elif value is not None:
            tokens += [option, str(value_node.value)]
    return tokens


# ---------------------------------------------------------------------------------------------
# What both stages build, in the order they build it: config, model, optimizer and schedule, step


def run_config(args, accelerator, settings):
    """The settings that decide a run's trained weights, so a checkpoint resumes only under the same
    ones: the model and its fingerprint, the data's hash, the stage's own `settings` (names of args)
    and the loop's."""
    from common.modeling import model_fingerprint

    model = Path(args.model)
    return {
        "model": str(model.resolve()) if model.exists() else args.model,
        "model_fingerprint": model_fingerprint(args.model), "data_sha256": file_hash(args.data),
        **{name: getattr(args, name) for name in settings}, **loop_config(args, accelerator),
    }


def loop_config(args, accelerator):
    """The loop settings of a run's resume config (training_args and LoRA), common to both stages."""
    return {
        "micro_batch": args.batch_size * accelerator.num_processes,  # global, so the GPU count may change
        "grad_accum": args.grad_accum, "lr": args.lr, "epochs": args.epochs, "max_steps": args.max_steps,
        "warmup": args.warmup, "schedule": args.schedule, "weight_decay": args.weight_decay,
        "max_grad_norm": args.max_grad_norm, "freeze_vision": args.freeze_vision, "seed": args.seed,
        **lora_config(args), **({"init_from": init_from_record(args.init_from)} if args.init_from else {}),
    }


def init_from_record(checkpoint):
    """Where a run's weights start (--init-from): the checkpoint, its step and the settings it was
    trained with, so the run's settings and summary say what it grew from."""
    path = Path(checkpoint)
    if checkpoint_state_file(path) is None or not (path / "model.safetensors").is_file():
        raise RecordError(path, None, None, "--init-from: not a checkpoint with one file of weights "
                                            f"({CHECKPOINT_STATE} and model.safetensors)")
    state = json.loads(checkpoint_state_file(path).read_text())
    saved = state.get("config") or {}
    return {"checkpoint": str(path.resolve()), "step": state.get("step"),
            **{k: saved.get(k) for k in ("model_fingerprint", "data_sha256", "lr", "max_steps", "epochs")}}


def no_grad(fn):
    """@torch.no_grad() for the stages' functions, without loading torch when they are defined."""
    @functools.wraps(fn)
    def without_gradients(*args, **kwargs):
        with torch.no_grad():
            return fn(*args, **kwargs)

    return without_gradients


def load_trainable_model(args, accelerator, dropout=True):
    """--model in the dtype the run trains in, in train mode, with LoRA adapters if asked:
    (model, the PeftModel for the final save or None).

    Dropout is switched off before the adapters are added, so --lora-dropout still holds.
    """
    from common.modeling import load_model

    model = prepare_model_for_training(load_model(args.model, dtype=weights_dtype(args, accelerator.device)), args)
    if model.config.get_text_config().tie_word_embeddings:
        logging.getLogger("accelerate.utils.other").addFilter(drop_tied_head_warning)
    if not dropout:
        disable_dropout(model)
    lora = add_lora(model, args, accelerator)
    model.train()
    return model, lora


def drop_tied_head_warning(record):
    """A logging filter: accelerate's save_state warns "Removed shared tensor {'model.lm_head.weight'}"
    at every checkpoint of a model whose output head is tied to its embeddings by its config. That
    tie is restored by from_pretrained and by load_state, so the warning is dropped; a shared tensor
    other than the head is still reported."""
    message = record.getMessage()  # "[RANK 0] Removed shared tensor {...}" when several processes run
    if "Removed shared tensor {" not in message:
        return True
    names = re.findall(r"'([^']+)'", message)
    return not (names and all(name.split(".")[-2:] == ["lm_head", "weight"] for name in names))


def disable_dropout(model):
    """Rewards compare the policy with the reference on the same weights at step 0: dropout noise
    would make them differ, so it is switched off (as TRL's DPO does by default)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def prepare_training(accelerator, module, args, total):
    """The optimizer and schedule of module's trainable weights, all three prepared by accelerate."""
    optimizer = build_optimizer(module, args.lr, args.weight_decay)
    scheduler = build_scheduler(optimizer, args, total)
    return accelerator.prepare(module, optimizer, scheduler)


def describe_steps(accelerator, args, total, start, unit=""):
    micro_global = args.batch_size * accelerator.num_processes
    return (f"{total} steps of {micro_global * args.grad_accum}{unit} "
            f"({args.batch_size} x {accelerator.num_processes} processes x {args.grad_accum} accumulation), "
            f"mixed precision {accelerator.mixed_precision}" + (f", resuming from step {start}" if start else ""))


def optimizer_step(accelerator, module, optimizer, scheduler, args, step):
    """Clip, update, advance the schedule: (the lr used, the gradient norm before clipping, a float
    or None when --max-grad-norm is 0).

    A non-finite gradient with a finite loss stops the run before the update. Under fp16 the
    gradient scaler owns that case: it skips the update and lowers its scale.
    """
    grad_norm = clip_gradients(accelerator, module, args.max_grad_norm)
    if grad_norm is not None and not torch.isfinite(grad_norm) and accelerator.scaler is None:
        raise NonFiniteLoss(f"gradient norm is {grad_norm.item()} at step {step}; stopping before the update, "
                            f"nothing is saved after it: check the data, or lower --lr in a new output folder.")
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr, None if grad_norm is None else float(grad_norm)


# ---------------------------------------------------------------------------------------------
# Accelerator


def resolve_grad_accum(args, num_processes):
    """Fill in args.grad_accum from args.global_batch when --grad-accum was not given."""
    if getattr(args, "grad_accum", None) is not None:
        return args.grad_accum
    per_micro = args.batch_size * num_processes
    args.grad_accum = max(1, round(args.global_batch / per_micro))
    if args.grad_accum * per_micro != args.global_batch:
        print(f"warning: --global-batch {args.global_batch} is not a multiple of batch-size {args.batch_size} x "
              f"{num_processes} processes; using {args.grad_accum * per_micro} (grad-accum {args.grad_accum})")
    return args.grad_accum


def mixed_precision_for(device, requested="auto"):
    """'auto': what `accelerate launch`'s config asks for, else bf16 on a GPU that has it, else fp32.

    Mixed precision (fp32 master weights and optimizer state, bf16 compute) rather than a bf16
    model: with full fine-tuning at lr 1e-5, an update is below bf16's resolution for most
    weights and would be lost.
    """
    if requested != "auto":
        return requested
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched != "no":
        return launched
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def trackers(report_to):
    """--report-to as a list of accelerate trackers; an unknown or uninstalled one ends the run
    with a message (accelerate would drop an uninstalled tracker silently)."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    names = [t.strip() for t in (report_to or "").split(",") if t.strip()]
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in LoggerType.list():
            fail(f"--report-to: unknown tracker {name!r} (accelerate knows {', '.join(LoggerType.list())})")
        if name != "all" and name not in available:
            fail(f"--report-to: {name} is not installed: pip install {name}, or run without --report-to "
                 f"{name} (metrics.jsonl is written either way); nothing was run")
    return names or None


def build_accelerator(args, out_dir, find_unused_parameters=False):
    """The Accelerator of a training stage: gradient accumulation, mixed precision, trackers.

    The scheduler is stepped by hand once per optimizer step (step_scheduler_with_optimizer=False):
    accelerate would otherwise step it once per process, and our schedules count optimizer steps
    of the global batch. find_unused_parameters is for DDP when some parameters get no gradient
    in a step (a VLM's vision tower on a text-only batch).
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, parse_flag_from_env

    # The process count decides --grad-accum, which the Accelerator needs at construction. cpu=
    # as AcceleratorState would read it, or a CPU launch would be taken for a single process.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    check_world_size(state)
    resolve_grad_accum(args, state.num_processes)
    report_to = trackers(args.report_to)
    if os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS") == "auto":
        # A config's `gradient_accumulation_steps: auto` means "the script decides"; accelerate 1.15
        # would call int() on it in Accelerator.__init__.
        os.environ["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] = str(args.grad_accum)
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else []
    accelerator = Accelerator(
        gradient_accumulation_steps=args.grad_accum,
        mixed_precision=mixed_precision_for(state.device, getattr(args, "mixed_precision", "auto")),
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(run_folder(out_dir) / "logs")),
        step_scheduler_with_optimizer=False,
        kwargs_handlers=handlers,
    )
    # An accelerate config may fix its own accumulation (ACCELERATE_GRADIENT_ACCUMULATION_STEPS, a
    # DeepSpeed config), which would win silently and change the global batch and the loss scale.
    configured = {accelerator.gradient_accumulation_steps}
    deepspeed = getattr(accelerator.state, "deepspeed_plugin", None)
    if deepspeed is not None and deepspeed.deepspeed_config.get("gradient_accumulation_steps") not in (None, "auto"):
        configured.add(int(deepspeed.deepspeed_config["gradient_accumulation_steps"]))
    if configured != {args.grad_accum}:
        fail(f"the accelerate config sets gradient accumulation to {sorted(configured)}, but this run needs "
             f"{args.grad_accum} (--global-batch / --grad-accum); set gradient_accumulation_steps to 'auto' "
             f"or {args.grad_accum} in the config")
    if deepspeed is not None:
        configure_deepspeed(deepspeed.deepspeed_config, args, accelerator.num_processes)
    if accelerator.is_fsdp2:
        keep_fsdp2_reductions_in_fp32(accelerator.state.fsdp_plugin)
    return accelerator


def check_world_size(state):
    """Refuse a launch whose processes did not join one group (e.g. a multi-GPU config on a
    machine where accelerate falls back to one process each): N independent trainings would
    write to one --out and each exit 0."""
    launched = os.environ.get("WORLD_SIZE")
    if launched is not None and int(launched) != state.num_processes:
        fail(f"the launcher started {launched} processes (WORLD_SIZE) but accelerate runs this one as "
             f"{state.num_processes} of {state.num_processes} ({state.distributed_type}); on a machine without "
             f"GPUs set ACCELERATE_USE_CPU=1 for gloo, or launch with --num_processes {state.num_processes}")


def configure_deepspeed(config, args, num_processes):
    """Fill what DeepSpeed needs from the run's flags: no dataloader goes through prepare, so
    accelerate cannot infer the micro-batch; the clipping norm is DeepSpeed's, so it must be the run's."""
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = args.batch_size
    if config.get("train_batch_size", "auto") == "auto":
        config["train_batch_size"] = args.batch_size * args.grad_accum * num_processes
    clipping = config.get("gradient_clipping", "auto")
    if clipping == "auto":
        config["gradient_clipping"] = args.max_grad_norm
    elif float(clipping) != args.max_grad_norm:
        fail(f"the DeepSpeed config clips gradients at {clipping}, but this run asks --max-grad-norm "
             f"{args.max_grad_norm}; set gradient_clipping to 'auto' or {args.max_grad_norm} in the config")


def keep_fsdp2_reductions_in_fp32(plugin):
    """accelerate's FSDP2 policy for bf16 casts every unit's outputs and the gradient reduction to
    bf16. The root unit is modeling.ResponseLogps, whose outputs are summed log-probs (bf16 would
    round -149.71 to -150.0 and quantise rewards to steps of 1/16): outputs are left as computed
    (bf16 from the decoder and vision blocks, fp32 from the log-prob sum; an fp32 output_dtype
    would feed fp32 into the VLM's bf16 patch merger) and gradients are reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = plugin.mixed_precision_policy
    if policy is None or policy.param_dtype in (None, torch.float32):
        return
    plugin.mixed_precision_policy = MixedPrecisionPolicy(
        param_dtype=policy.param_dtype, reduce_dtype=torch.float32, output_dtype=None,
        cast_forward_inputs=policy.cast_forward_inputs)


# ---------------------------------------------------------------------------------------------
# Batch order: deterministic from (seed, epoch), so a resumed run sees the same batches


def batch_order(lengths, global_batch, seed, epoch, group=64):
    """Lists of example indices, one per global micro-batch.

    Length-grouped: shuffle, then sort inside windows of `group` global batches by length, so a
    batch holds similar lengths and pads little while the order stays random across windows.
    The last partial batch is dropped so every process always gets the same number of rows.
    """
    rng = random.Random(seed * 1000003 + epoch)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    window = global_batch * group
    ordered = []
    for start in range(0, len(idx), window):
        ordered += sorted(idx[start : start + window], key=lambda i: -lengths[i])
    batches = [ordered[i : i + global_batch] for i in range(0, len(ordered) - global_batch + 1, global_batch)]
    rng.shuffle(batches)
    return batches


class MicroBatches:
    """Global micro-batch m of a run, for any m: epochs repeat the data in a new seeded order.

    Indexing by the run's micro-batch counter (not iterating) is what makes resume exact: a
    resumed run asks for micro-batch step * grad_accum and gets the batch it would have had.
    """

    def __init__(self, lengths, global_batch, seed):
        self.lengths, self.global_batch, self.seed = lengths, global_batch, seed
        self.per_epoch = len(lengths) // global_batch
        self.epoch, self.order = None, None

    def __call__(self, m):
        epoch, position = divmod(m, self.per_epoch)
        if epoch != self.epoch:
            self.epoch, self.order = epoch, batch_order(self.lengths, self.global_batch, self.seed, epoch)
        return self.order[position]


def shard(batch, accelerator):
    """This process's share of a global micro-batch (interleaved so lengths stay balanced)."""
    return batch[accelerator.process_index :: accelerator.num_processes]


def global_count(accelerator, count):
    """Sum of a per-process count over all processes (e.g. response tokens in a step).

    Losses are divided by the global count and multiplied by the number of processes, because
    DDP averages gradients: then 2 processes give exactly the loss and update of 1 process with
    the same global batch, whatever each process's share of tokens.
    """
    t = torch.tensor(float(count), device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").item()


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule


def build_optimizer(model, lr, weight_decay):
    params = [p for p in model.parameters() if p.requires_grad]
    # ZeRO-3 init leaves every parameter a 1-D shard; ds_shape is its real shape.
    decay = [p for p in params if len(getattr(p, "ds_shape", p.shape)) >= 2]
    no_decay = [p for p in params if len(getattr(p, "ds_shape", p.shape)) < 2]  # biases and norms
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # DeepSpeed drops an empty group, and a scheduler built on the optimizer then has one lr too many.
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def clip_gradients(accelerator, module, max_norm):
    """accelerator.clip_grad_norm_ as a float tensor whatever the backend: DeepSpeed, which clips
    inside its own step, returns a Python float (or None when it has no norm to report)."""
    norm = accelerator.clip_grad_norm_(module.parameters(), max_norm or float("inf"))
    return None if norm is None else torch.as_tensor(norm, dtype=torch.float32)


# --schedule names -> transformers' schedules, the curves the Trainer and TRL draw
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def warmup_steps(warmup, total_steps):
    """--warmup as a share of the steps, rounded up as the Trainer rounds warmup_ratio."""
    return math.ceil(warmup * total_steps)


def build_scheduler(optimizer, args, total_steps):
    """transformers.get_scheduler: linear warmup from 0 (the first step's lr is 0 when there is
    warmup, as in the Trainer), then cosine or linear decay to 0, or constant."""
    from transformers import get_scheduler

    return get_scheduler(SCHEDULES[args.schedule], optimizer, num_warmup_steps=warmup_steps(args.warmup, total_steps),
                         num_training_steps=total_steps)


def total_steps(num_examples, micro_global, args, warn):
    """Optimizer steps of the run: --max-steps if given (the data repeats as needed), else epochs.

    A schedule too short for what was asked is run, with a warning (warn: the main process's
    print) that gives the numbers: data that makes less than one optimizer step is repeated, and a
    warmup that lasts the whole run never reaches the lr."""
    if args.max_steps is not None:
        total = args.max_steps
    else:
        micro_per_epoch = num_examples // micro_global
        if micro_per_epoch == 0:
            raise SystemExit(f"error: {num_examples} examples are fewer than one micro-batch over all processes "
                             f"({micro_global})")
        total = int(micro_per_epoch * args.epochs) // args.grad_accum
        if total == 0:
            total = 1
            step = micro_global * args.grad_accum
            warn(f"warning: {num_examples} examples x {args.epochs:g} epochs are less than one optimizer step of "
                 f"{step}: running 1 step, which sees the data {step / num_examples:.1f} times; lower "
                 f"--global-batch (or --grad-accum) to at most {num_examples}, or set --max-steps", file=sys.stderr)
    warm = warmup_steps(args.warmup, total)
    if warm >= total > 0 and args.warmup > 0:
        warn(f"warning: --warmup {args.warmup:g} of {total} steps is {warm} warmup steps: the run never reaches "
             f"its lr {args.lr:g} (the first step is at lr 0); lower --warmup or train more steps", file=sys.stderr)
    return total


def vision_tower(model):
    """A VLM's vision tower (with its merger), None for a text model."""
    return getattr(getattr(model, "model", model), "visual", None) or getattr(model, "visual", None)


def prepare_model_for_training(model, args):
    if args.freeze_vision:
        tower = vision_tower(model)
        if tower is None:
            raise SystemExit("error: --freeze-vision given but the model has no vision tower")
        tower.requires_grad_(False)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


# ---------------------------------------------------------------------------------------------
# LoRA adapters through peft (the official recipe trains both stages this way)


def add_lora_args(parser, dropout):
    """--lora-rank and its companions; dropout is the stage's default --lora-dropout."""
    g = parser.add_argument_group("LoRA (peft)")
    g.add_argument("--lora-rank", type=_lora_rank, default=None,
                   help="train LoRA adapters of this rank (the official recipe: 8) instead of every weight; the "
                        "base weights and the vision tower stay frozen. OUT then holds the merged model and "
                        f"OUT.run/{ADAPTER} the adapters alone (peft). Default: full fine-tuning")
    g.add_argument("--lora-alpha", type=_positive_int, default=32,
                   help="LoRA scale numerator: the update is (alpha / rank) * B @ A (default: %(default)s)")
    g.add_argument("--lora-dropout", type=_probability, default=dropout,
                   help="dropout on the adapters' input (default: %(default)s)")
    g.add_argument("--lora-targets", default="all-linear",
                   help="comma-separated names of the language model's linear layers to adapt (e.g. "
                        "q_proj,v_proj), or all-linear: every linear layer of the language model but the "
                        "output head, as the official recipe (default: %(default)s)")
    return g


def _positive_int(text):
    import argparse

    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _lora_rank(text):
    """A positive rank, and peft installed: checked while parsing, before any data or model is loaded."""
    import argparse
    import importlib.util

    value = _positive_int(text)
    if importlib.util.find_spec("peft") is None:
        raise argparse.ArgumentTypeError("needs the peft package, which is not installed: pip install peft")
    return value


def _probability(text):
    import argparse

    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def lora_config(args):
    """The LoRA settings for a run's resume config; {} for full fine-tuning, so a full run's
    checkpoints written before these flags existed still resume."""
    if not args.lora_rank:
        return {}
    return {"lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
            "lora_targets": args.lora_targets}


def weights_dtype(args, device):
    """fp32 weights for full fine-tuning (updates are below bf16 resolution). With LoRA the base is
    frozen, so it is bf16 on a GPU that has it (half the memory: what lets a 7B train on one GPU);
    peft keeps the adapters themselves in fp32."""
    if args.lora_rank and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def language_linear_layers(model):
    """Names of the language model's linear layers: every nn.Linear but the vision tower's and the
    output head."""
    head = model.get_output_embeddings()
    tower = vision_tower(model)
    vision = set(tower.modules()) if tower is not None else set()
    return [name for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head and m not in vision]


def add_lora(model, args, accelerator):
    """peft LoRA adapters on the language model's linear layers (--lora-targets), everything else
    frozen; None without --lora-rank.

    The adapters are injected into `model` in place, so the loop trains `model` as it would a full
    fine-tune; the returned PeftModel is for save_hf_folder (adapter folder and merge). lora_B starts
    at zero, so the model computes exactly what the base computes until the first update (apo.py's
    reference log-probs are those of the base).
    """
    if not args.lora_rank:
        return None
    import peft  # its absence was reported while parsing --lora-rank

    state = accelerator.state
    deepspeed = getattr(state, "deepspeed_plugin", None)
    if str(state.distributed_type).endswith("FSDP") or (deepspeed is not None and deepspeed.zero_stage == 3):
        fail("--lora-rank runs on one GPU, DDP or DeepSpeed ZeRO-2 (configs/deepspeed_zero2_8gpu.yaml): FSDP and "
             "ZeRO-3 shard the base weights the adapters are merged into at the end")
    lora = peft.get_peft_model(model, lora_peft_config(model, args.lora_rank, args.lora_alpha, args.lora_dropout,
                                                       args.lora_targets))
    checkpoint_trainable_only(accelerator)
    return lora


def lora_peft_config(model, rank, alpha, dropout, targets):
    """peft's LoraConfig for --lora-targets on model's language linear layers (export_checkpoint.py
    rebuilds a run's adapters with it)."""
    import peft

    layers = language_linear_layers(model)
    if targets.strip() != "all-linear":
        wanted = {t.strip() for t in targets.split(",") if t.strip()}
        known = {name.rsplit(".", 1)[-1] for name in layers}
        if not wanted or wanted - known:
            fail(f"--lora-targets: {', '.join(sorted(wanted - known)) or 'no name given'} is not a linear layer of "
                 f"the language model; its linear layers are {', '.join(sorted(known))} (or all-linear)")
        layers = [name for name in layers if name.rsplit(".", 1)[-1] in wanted]
    # Full module names, not suffixes: a VLM's vision tower has layers of the same short names.
    return peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=layers, bias="none")


def checkpoint_trainable_only(accelerator):
    """Checkpoints hold the trainable weights alone: the adapters are megabytes, the frozen base is
    gigabytes that a resumed run loads from --model anyway. (DeepSpeed writes its own format.)"""
    def trainable(model):
        return {name for name, p in model.named_parameters() if p.requires_grad}

    def on_save(models, weights, output_dir):
        for model, state in zip(models, weights):
            keep = trainable(model)
            for key in [k for k in state if k not in keep]:
                del state[key]

    def on_load(models, input_dir):
        from safetensors.torch import load_file

        for i, model in enumerate(models):
            path = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            state = load_file(str(path))
            _, unexpected = model.load_state_dict(state, strict=False)
            missing = trainable(model) - set(state)
            if unexpected or missing:
                raise ResumeMismatch(f"{path} does not hold this run's adapters ({len(missing)} missing, "
                                     f"{len(unexpected)} unexpected); use another output folder")
        models.clear()  # loaded here: accelerate's own strict load would ask for the frozen base too

    accelerator.register_save_state_pre_hook(on_save)
    accelerator.register_load_state_pre_hook(on_load)


