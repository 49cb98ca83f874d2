"""Turn a training checkpoint (OUT.run/checkpoints/step-N of bootstrap.py or apo.py) into a Hugging
Face model folder that from_pretrained, `pipeline` and vLLM load: the weights of that step on the
run's base model, its tokenizer or processor, and, for a LoRA run, the adapters merged in.

    python export_checkpoint.py --checkpoint runs/apo.run/checkpoints/step-100 --out runs/apo-step-100

A checkpoint is accelerate's save_state (weights with the loop's wrapper prefix, optimizer, RNG)
plus run_state.json (the run's settings and step): it resumes a run exactly, but is not a model
folder. The base model is the run's --model, read from run_state.json; --base names it where
it has moved (its fingerprint must still match). Checkpoints of one file of weights are exported:
FSDP and DeepSpeed write shards in their own formats (use a one-process run, or their tools).
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from common.records import RecordError, fail


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder, OUT.run/checkpoints/step-N")
    parser.add_argument("--out", required=True, help="the model folder to write (must not exist)")
    parser.add_argument("--base", default=None, help="the run's --model where it is now, if it has moved "
                        "(default: the path or hub id recorded in the checkpoint)")
    parser.add_argument("--seed", type=int, default=0, help="unused (the export is deterministic); for the "
                        "common interface of the scripts")
    return parser.parse_args(argv)


def checkpoint_settings(checkpoint):
    """The run's settings recorded in the checkpoint, and its weights file."""
    checkpoint = Path(checkpoint)
    from common.run import CHECKPOINT_STATE, checkpoint_state_file

    state_file = checkpoint_state_file(checkpoint)
    if state_file is None:
        raise RecordError(checkpoint, None, None, f"not a checkpoint (no {CHECKPOINT_STATE})")
    config = json.loads(state_file.read_text()).get("config") or {}
    if "model" not in config:
        raise RecordError(state_file, None, "config", "records no base model")
    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        raise RecordError(checkpoint, None, None, "holds no model.safetensors: FSDP and DeepSpeed checkpoints are "
                                                  "sharded in their own formats; export from a one-process run")
    return config, weights


def base_model(config, base):
    """The base model path or hub id, checked against the fingerprint the run recorded."""
    from common.modeling import model_fingerprint

    path = base or config["model"]
    saved = config.get("model_fingerprint")
    if saved and model_fingerprint(path) != saved:
        fail(f"{path}: the base model has changed since the checkpoint was written (its fingerprint differs); "
             f"name the run's original model with --base")
    return path


def strip_wrapper(state):
    """The loop trains modeling.ResponseLogps (or SharedPromptLogps) around the model: keys are
    model.<the model's own key>."""
    return {k.removeprefix("model."): v for k, v in state.items()}


def load_checkpoint_model(checkpoint, base=None):
    """The checkpoint's model, adapters merged, and its processor: (model, processor)."""
    from safetensors.torch import load_file

    from common import training
    from common.modeling import load_model, load_processor

    config, weights = checkpoint_settings(checkpoint)
    path = base_model(config, base)
    model = load_model(path, dtype=torch.float32)
    state = strip_wrapper(load_file(str(weights)))
    if config.get("lora_rank"):
        import peft

        lora = peft.get_peft_model(model, training.lora_peft_config(
            model, config["lora_rank"], config["lora_alpha"], config["lora_dropout"], config["lora_targets"]))
        # get_peft_model wraps in place: the checkpoint's names are those of the adapted model itself
        _, unexpected = model.load_state_dict(state, strict=False)
        adapters = {name for name, p in model.named_parameters() if p.requires_grad}
        if unexpected or adapters - set(state):
            raise RecordError(weights, None, None, f"does not hold this run's adapters ({len(adapters - set(state))} "
                                                   f"missing, {len(unexpected)} unexpected)")
        model = lora.merge_and_unload()
    else:
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {name for name in missing if model.config.get_text_config().tie_word_embeddings
                and name == "lm_head.weight"}
        if set(missing) - tied or unexpected:
            raise RecordError(weights, None, None, f"does not match {path} ({len(missing)} missing, "
                                                   f"{len(unexpected)} unexpected weights)")
    return model, load_processor(path)


def export(checkpoint, out, base=None):
    """Write the model folder into a temporary folder, then rename it to out."""
    out = Path(out)
    if out.exists():
        raise RecordError(out, None, None, "exists; choose a new folder for the export")
    model, processor = load_checkpoint_model(checkpoint, base)
    model.config.use_cache = True
    tmp = out.with_name(".tmp-" + out.name)
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    tmp.rename(out)
    return out


def main(argv=None):
    args = parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.base)
    except RecordError as e:
        fail(str(e))
    print(f"export_checkpoint: {args.checkpoint} -> {out} (a Hugging Face model folder)", file=sys.stdout)


if __name__ == "__main__":
    main()
