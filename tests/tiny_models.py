"""Tiny Qwen2 and Qwen2.5-VL folders built offline, for tests and benchmarks.

No hub: the tokenizer is a byte-level BPE trained on the spot (so any text encodes), the weights
are random, and each folder is an ordinary Hugging Face folder that `from_pretrained` loads, with
the Qwen chat template. Building both takes a few seconds.

    python tiny_models.py --out /tmp/tiny     # writes /tmp/tiny/qwen2 and /tmp/tiny/qwen2_5_vl
"""

import argparse
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

# The Qwen2-VL template, trimmed: strings or lists of {type: image|text} parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = """Answer: Atelectasis, Cardiomegaly, Consolidation, Edema, Enlarged Cardiomediastinum, Fracture,
Lung Lesion, Lung Opacity, Pleural Effusion, Pneumonia, Pneumothorax, Pleural Other, Support Devices,
No Finding. improving stable worsening. The chest radiograph shows blunting of the costophrenic angle.
The cardiac silhouette is enlarged. There is a retrocardiac opacity. No pneumothorax is seen.
Reasoning step by step: the findings suggest a moderate effusion. Final answer below.
You are a careful radiologist. Describe the study and give your reasoning, then the answer.
""" * 4


def train_tokenizer(vocab_size=400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:])
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"  # decoder-only generation pads on the left
    return fast


def build_text_model(out, hidden=32, layers=2, seed=0):
    """A random Qwen2 causal LM with the trained tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = train_tokenizer()
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, tie_word_embeddings=True,
                         eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tok.pad_token_id, bos_token_id=None)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    out = Path(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_scripted_model(out, text, seed=0):
    """A tiny Qwen2 that answers every chat prompt with `text` under greedy decoding.

    For tests that need a model's answer known in advance. Its layers are switched off (zero output
    projections), so the next token depends on the current one alone, and the output head maps the
    last token of the generation prompt to the first of `text`, each token of `text` to the next,
    and the last to the end-of-turn token: a bigram chain, so `text` must tokenize to distinct
    tokens (ValueError otherwise; a bare answer line such as "Answer: Edema" does).
    """
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    out = build_text_model(out, seed=seed)
    tok = AutoTokenizer.from_pretrained(out)
    model = Qwen2ForCausalLM.from_pretrained(out)
    prompt = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False)
    chain = tok(prompt, add_special_tokens=False)["input_ids"][-1:] + tok(text, add_special_tokens=False)["input_ids"]
    if len(set(chain)) != len(chain) or len(chain) > model.config.hidden_size:
        raise ValueError(f"{text!r}: its tokens must be distinct (and fewer than the hidden size)")
    chain.append(model.config.eos_token_id)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight
        head = torch.zeros_like(embed)
        for i, (token, following) in enumerate(zip(chain, chain[1:])):
            embed[token] = 0.0
            embed[token, i] = 1.0  # one axis per link, so links never interfere
            head[following, i] = 10.0
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(head)
    model.save_pretrained(out)
    return out


def build_vl_model(out, hidden=32, layers=2, seed=0):
    """A random Qwen2.5-VL with a real processor (image processor + tokenizer + template)."""
    import torch
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    tok = train_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    torch.manual_seed(seed)
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, tie_word_embeddings=True,
                eos_token_id=ids["<|im_end|>"], pad_token_id=tok.pad_token_id, bos_token_id=None)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                  fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True,
                              eos_token_id=ids["<|im_end|>"], pad_token_id=tok.pad_token_id, bos_token_id=None)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = tok.pad_token_id
    # Small images give few visual tokens: 56x56 px -> 4x4 patches -> 4 tokens after merging.
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14,
                                            merge_size=2, temporal_patch_size=2)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok, chat_template=CHAT_TEMPLATE,
                                    video_processor=Qwen2VLVideoProcessor())
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def write_test_image(path, size=(64, 64), seed=0):
    """A small random RGB PNG."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write qwen2/ and qwen2_5_vl/ into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args()
    print(build_text_model(Path(args.out) / "qwen2", seed=args.seed))
    print(build_vl_model(Path(args.out) / "qwen2_5_vl", seed=args.seed))


if __name__ == "__main__":
    main()
