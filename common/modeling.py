"""Models: loading text LMs and VLMs alike, chat formatting with images, encoding a prompt and its
responses with a loss mask, batched generation, and response log-probs without full logits.

Text models go through AutoModelForCausalLM + AutoTokenizer, VLMs (Qwen2.5-VL …) through
AutoModelForImageTextToText + AutoProcessor; every stage calls the same few functions, so a stage
never asks which kind it has.
"""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from apo_loss import sequence_logps
from common.records import resolve_image

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------
# Loading


def is_vision_model(path):
    """A folder whose config has a vision tower is loaded as a VLM with its processor."""
    config_file = Path(path) / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
    else:  # a hub id: let transformers fetch the config
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path).to_dict()
    return "vision_config" in config


NOT_THE_MODEL = ("training_summary.json",)  # and its .tmp


def model_fingerprint(path):
    """Hash of a model folder's config and its files' names, sizes and modification times.

    Cheap (hashing many GB of weights would take minutes) and it changes whenever a run rewrites
    the weights, so cached reference log-probs and stored predictions never outlive their model.
    """
    folder = Path(path)
    if not folder.is_dir():
        return f"hub:{path}"
    h = hashlib.sha256()
    if (folder / "config.json").is_file():
        h.update((folder / "config.json").read_bytes())
    # the training summary is the run's report, not the model: it is renamed into place last
    for f in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(NOT_THE_MODEL)):
        stat = f.stat()
        h.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()


def load_processor(path):
    """The processor of a VLM or the tokenizer of a text model, padded on the left for generation;
    checked against the model (check_tokenizer), RecordError naming the folder when it is unusable."""
    from common.records import RecordError

    try:
        if is_vision_model(path):
            from transformers import AutoProcessor  # imports the image stack (torchvision, ~5 s CPU): VLMs only

            processor = AutoProcessor.from_pretrained(path)
        else:
            from transformers import AutoTokenizer

            processor = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:  # no tokenizer file at all: transformers cannot tell what to build
        raise RecordError(path, None, None, f"cannot load the model's tokenizer ({' '.join(str(e).split())[:300]}); "
                                            "a model folder needs its tokenizer files (tokenizer.json, "
                                            "tokenizer_config.json)") from None
    check_tokenizer(processor, path)
    tok = tokenizer_of(processor)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return processor


def check_tokenizer(processor, path):
    """A tokenizer that cannot be this model's is refused: with tokenizer.json missing, transformers
    builds a near-empty one from the other files, and a run would train and write a "finished" model
    on text it cannot see. Its vocabulary must fit the model's embeddings and be most of them
    (models pad their embedding rows a little past the vocabulary, never to twice its size), and it
    must have the chat template every stage formats with."""
    from common.records import RecordError

    tok = tokenizer_of(processor)
    rows = _embedding_rows(path)
    if rows is not None and not rows / 2 < len(tok) <= rows:
        raise RecordError(path, None, None, f"the tokenizer has {len(tok)} tokens but the model has {rows} embedding "
                                            "rows: it is not this model's tokenizer (is tokenizer.json missing or "
                                            "from another model?)")
    if not (getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None)):
        raise RecordError(path, None, None, "the tokenizer has no chat template (chat_template.jinja or "
                                            "tokenizer_config.json's chat_template); every stage formats prompts "
                                            "with it")


def _embedding_rows(path):
    """vocab_size of the (text) model's config, None where it does not say."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(path).get_text_config(), "vocab_size", None)


def load_model(path, dtype=None, device_map=None):
    """device_map="auto" spreads a model over all visible GPUs (generation with a 72B source)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if is_vision_model(path) else AutoModelForCausalLM
    return auto.from_pretrained(path, dtype=dtype or torch.float32, device_map=device_map)


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def default_dtype(accelerator):
    """bf16 on GPU (as the paper trains), fp32 on CPU where bf16 matmuls are slow and lossy."""
    return torch.bfloat16 if accelerator.device.type == "cuda" else torch.float32


# ---------------------------------------------------------------------------------------------
# Chat formatting


def messages_for(record, response=None):
    """The chat of one instance: optional system, the user turn with its images, the answer."""
    messages = []
    if record.get("system"):
        messages.append({"role": "system", "content": record["system"]})
    if record.get("images"):
        content = [{"type": "image"} for _ in record["images"]] + [{"type": "text", "text": record["prompt"]}]
    else:
        content = record["prompt"]
    messages.append({"role": "user", "content": content})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def prompt_text(processor, record):
    return processor.apply_chat_template(messages_for(record), tokenize=False, add_generation_prompt=True)


def turn_end(processor):
    """What the template appends after an assistant message ("<|im_end|>" for Qwen, SmolLM …).

    The response is trained up to and including this marker so the model learns to stop.
    """
    cached = getattr(processor, "_apo_turn_end", None)
    if cached is None:
        probe = {"prompt": "q"}
        head = prompt_text(processor, probe)
        full = processor.apply_chat_template(messages_for(probe, "\x00"), tokenize=False)
        cached = full[len(head):].split("\x00", 1)[1].rstrip() if full.startswith(head) else ""
        if not cached:
            cached = tokenizer_of(processor).eos_token or ""
        processor._apo_turn_end = cached
    return cached


def load_images(record, data_path):
    from PIL import Image

    return [Image.open(resolve_image(data_path, p)).convert("RGB") for p in record.get("images") or []]


# ---------------------------------------------------------------------------------------------
# Encoding for training: one prompt, one or more responses


@dataclass
class Encoded:
    """One prompt (with its images' tensors) and the token ids of its responses."""

    prompt_ids: list
    responses: list  # list of lists of token ids
    vision: dict = field(default_factory=dict)  # pixel_values, image_grid_thw for VLMs
    truncated: int = 0  # responses cut at max_length


class PromptTooLong(ValueError):
    """characters: the prompt was measured by its characters, not tokenized; prompt_tokens is then
    a lower bound (fewest_tokens)."""

    def __init__(self, prompt_tokens, max_length, characters=None):
        measured = f"at least {prompt_tokens} tokens ({characters} characters)" if characters else f"{prompt_tokens} tokens"
        super().__init__(f"prompt is {measured}, max length {max_length}")
        self.prompt_tokens, self.max_length = prompt_tokens, max_length


def fewest_tokens(processor, text):
    """A lower bound on the tokens of text, without tokenizing it: no token covers more characters
    than the longest string in the vocabulary (byte-level vocabularies spell each byte as one
    character, and a character is at least one byte)."""
    tok = tokenizer_of(processor)
    longest = getattr(tok, "_apo_longest_token", None)
    if longest is None:
        longest = tok._apo_longest_token = max(1, max(map(len, tok.get_vocab()), default=1))
    return len(text) // longest


def encode_prompt(processor, record, data_path=None, max_length=None):
    """Token ids of the chat prompt (image placeholders expanded) and the images' tensors.

    With max_length, a prompt that cannot fit by its characters alone raises PromptTooLong before
    it is tokenized: a 50 MB prompt would otherwise take minutes and gigabytes (and the tokenizer,
    running outside Python, would hold off a SIGTERM all that time) only to be skipped.
    """
    text = prompt_text(processor, record)
    if max_length is not None and fewest_tokens(processor, text) > max_length:
        raise PromptTooLong(fewest_tokens(processor, text), max_length, characters=len(text))
    if record.get("images"):
        inputs = processor(text=[text], images=load_images(record, data_path), return_tensors="pt")
        vision = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}
        return inputs["input_ids"][0].tolist(), vision
    return tokenizer_of(processor)(text, add_special_tokens=False)["input_ids"], {}


def max_positions(model):
    """The context length of a text model or of a VLM's language model (None if unstated)."""
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


def encode(processor, record, responses, max_length, data_path=None):
    """Token ids of the prompt and of each response (with the turn-end marker).

    Truncation cuts the end of a response, never the prompt: a prompt that leaves no room raises
    PromptTooLong, so image tokens are never cut.
    """
    prompt_ids, vision = encode_prompt(processor, record, data_path, max_length)
    room = max_length - len(prompt_ids)
    if room < 2:
        raise PromptTooLong(len(prompt_ids), max_length)
    tok = tokenizer_of(processor)
    end = turn_end(processor)
    out, truncated = [], 0
    for response in responses:
        ids = tok(response + end, add_special_tokens=False)["input_ids"]
        if len(ids) > room:
            ids, truncated = ids[:room], truncated + 1
        out.append(ids)
    return Encoded(prompt_ids, out, vision, truncated)


def pad_batch(sequences, pad_id, mask_lengths):
    """Right-pad [prompt + response] rows; labels are IGNORE_INDEX on the first mask_lengths tokens."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (seq, masked) in enumerate(zip(sequences, mask_lengths)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention[i, : len(seq)] = 1
        labels[i, masked : len(seq)] = torch.tensor(seq[masked:])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def collate(encoded_items, pad_id):
    """Every (prompt, response) of the items as one right-padded batch, rows in item order.

    Vision tensors are concatenated in the same order, repeated once per response, because the
    model expects one block of pixels per image placeholder in input_ids.
    """
    sequences, masks, pixel_values, grids = [], [], [], []
    for item in encoded_items:
        for ids in item.responses:
            sequences.append(item.prompt_ids + ids)
            masks.append(len(item.prompt_ids))
            if item.vision:
                pixel_values.append(item.vision["pixel_values"])
                grids.append(item.vision["image_grid_thw"])
    batch = pad_batch(sequences, pad_id, masks)
    if pixel_values:
        batch["pixel_values"] = torch.cat(pixel_values)
        batch["image_grid_thw"] = torch.cat(grids)
    return batch


# ---------------------------------------------------------------------------------------------
# Log-probs of responses


class ResponseLogps(nn.Module):
    """Summed log-probs of the labelled tokens of each row, from hidden states in chunks.

    A module of its own so that accelerate's DDP/FSDP wrapper sees the whole computation: the
    output projection is used inside this forward, never the [rows, tokens, vocab] logits.
    """

    def __init__(self, model, chunk_size=1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        # FSDP's auto-wrap policy reads the layer classes to shard from the module it wraps: without
        # this, a wrapped ResponseLogps would be one unsharded unit.
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def tie_weights(self, *args, **kwargs):
        # accelerate's FSDP2 cpu_ram_efficient_loading moves the model to meta, which unties tied
        # embeddings, and calls the wrapped module's tie_weights to tie them again.
        return self.model.tie_weights(*args, **kwargs)

    def forward(self, input_ids, attention_mask, labels, **vision):
        base = getattr(self.model, self.model.base_model_prefix)
        hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **vision).last_hidden_state
        head = self.model.get_output_embeddings()
        targets = labels[:, 1:]
        logps = sequence_logps(hidden[:, :-1], head.weight, targets, chunk_size=self.chunk_size,
                               lm_head_bias=head.bias)
        return logps, (targets != IGNORE_INDEX).sum(-1)


# ---------------------------------------------------------------------------------------------
# Generation


@torch.no_grad()
def generate(model, processor, records, data_path=None, batch_size=8, max_new_tokens=256, temperature=0.0,
             top_p=1.0, prompt_fn=None, progress=None, repetition_penalty=1.0, return_ended=False):
    """Answers for records, batched with left padding; greedy when temperature is 0.

    Prompts are sorted by length so each batch pads little; results come back in input order.
    prompt_fn(record) may replace the record used for the chat (consensus.py's long prompt).
    repetition_penalty > 1 divides the logit of every token already in the prompt or the answer
    (transformers' CTRL-style penalty). return_ended: also return, per answer, whether it ended
    with an end-of-turn token rather than at max_new_tokens.
    """
    tok = tokenizer_of(processor)
    chats = [prompt_fn(r) if prompt_fn else r for r in records]
    texts = [prompt_text(processor, c) for c in chats]
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out, ended = [None] * len(texts), [None] * len(texts)
    device = next(model.parameters()).device
    sampling = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    if temperature > 0:
        sampling.update(temperature=temperature, top_p=top_p)
    else:  # silence generation_config's sampling defaults, which greedy decoding ignores
        sampling.update(temperature=None, top_p=None, top_k=None)
    if repetition_penalty != 1.0:
        sampling.update(repetition_penalty=repetition_penalty)
    stop_ids = end_token_ids(model, tok)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch_texts = [texts[i] for i in idx]
        images = [img for i in idx for img in load_images(chats[i], data_path)]
        if images:
            inputs = processor(text=batch_texts, images=images, padding=True, return_tensors="pt")
        else:
            inputs = tok(batch_texts, padding=True, add_special_tokens=False, return_tensors="pt")
        inputs = {k: v.to(device) for k, v in inputs.items()}
        generated = model.generate(**inputs, **sampling)
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]
        for i, row, text in zip(idx, new_tokens.tolist(), tok.batch_decode(new_tokens, skip_special_tokens=True)):
            out[i] = text.strip()
            ended[i] = any(t in stop_ids for t in row)
        if progress is not None:
            progress.update(len(idx))
    return (out, ended) if return_ended else out


def end_token_ids(model, tok):
    """The token ids that end an answer: generation_config's eos ids, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tok.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
