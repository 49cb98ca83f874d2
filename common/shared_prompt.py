"""apo.py --share-prompt: each text instance's prompt encoded once for all its 1 + K responses.

An optional speed-up of modeling.ResponseLogps, with the same results: instead of 1 + K rows
[prompt + response_j], an instance is one packed row [prompt, response_0, ..., response_K].
Position ids restart at len(prompt) for every response and a block-causal mask lets a response
token see the prompt and the earlier tokens of its own response only, so each token sees exactly
what it sees in its own [prompt + response] row, while the prompt's activations (and their
gradients) are computed once. benchmarks/bench_apo_step.py measures what it saves.
"""

import torch

from apo_loss import sequence_logps
from common.modeling import IGNORE_INDEX, ResponseLogps
from common.records import fail

ATTENTION = ("sdpa", "eager")  # the implementations that take an arbitrary [B, 1, L, L] mask


class SharedPromptLogps(ResponseLogps):
    """modeling.ResponseLogps's summed response log-probs, from packed rows (pack_shared_prompt).

    The first token of every response is predicted from the last prompt position, hence the
    explicit `sources` index instead of a shift.
    """

    def forward(self, input_ids, segments, position_ids, targets, sources):
        base = getattr(self.model, self.model.base_model_prefix)
        mask = block_causal_mask(segments, self.model.config._attn_implementation, self.model.dtype)
        hidden = base(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state
        head = self.model.get_output_embeddings()
        logps = sequence_logps(hidden.flatten(0, 1)[sources], head.weight, targets, chunk_size=self.chunk_size,
                               lm_head_bias=head.bias)
        return logps, (targets != IGNORE_INDEX).sum(-1)


def check_attention(model, model_path):
    if model.config._attn_implementation not in ATTENTION:
        fail(f"--share-prompt needs the sdpa or eager attention, {model_path} uses "
             f"{model.config._attn_implementation}")


def block_causal_mask(segments, attn_implementation, dtype):
    """[B, 1, L, L] mask from segment ids (0 prompt, j + 1 response j, -1 padding).

    A query sees earlier keys of the prompt or of its own segment. Padding queries see the prompt,
    so no row is fully masked (that would give NaN in sdpa, and NaN * 0 still spreads).
    """
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    q, k = segments[:, :, None], segments[:, None, :]
    allowed = (causal & ((k == 0) | (k == q)))[:, None]
    if attn_implementation == "sdpa":
        return allowed
    if attn_implementation == "eager":  # eager attention adds the mask to its scores
        return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(~allowed, torch.finfo(dtype).min)
    raise ValueError(f"--share-prompt needs the sdpa or eager attention, the model uses {attn_implementation}")


def pack_shared_prompt(encoded_items, pad_id):
    """The batch SharedPromptLogps takes: one packed row per item; targets rows in collate's order."""
    width = max(len(e.prompt_ids) + sum(len(r) for r in e.responses) for e in encoded_items)
    n_rows = sum(len(e.responses) for e in encoded_items)
    longest = max(len(r) for e in encoded_items for r in e.responses)
    input_ids = torch.full((len(encoded_items), width), pad_id, dtype=torch.long)
    segments = torch.full((len(encoded_items), width), -1, dtype=torch.long)
    position_ids = torch.zeros((len(encoded_items), width), dtype=torch.long)
    targets = torch.full((n_rows, longest), IGNORE_INDEX, dtype=torch.long)
    sources = torch.zeros((n_rows, longest), dtype=torch.long)
    row = 0
    for b, item in enumerate(encoded_items):
        p = len(item.prompt_ids)
        input_ids[b, :p] = torch.tensor(item.prompt_ids)
        segments[b, :p] = 0
        position_ids[b, :p] = torch.arange(p)
        start = p
        for j, ids in enumerate(item.responses):
            n = len(ids)
            input_ids[b, start:start + n] = torch.tensor(ids)
            segments[b, start:start + n] = j + 1
            position_ids[b, start:start + n] = torch.arange(p, p + n)
            targets[row, :n] = torch.tensor(ids)
            # Token t of the response is predicted by the position before it; token 0 by the prompt's last.
            sources[row, :n] = b * width + torch.cat([torch.tensor([p - 1]), torch.arange(start, start + n - 1)])
            start, row = start + n, row + 1
    return {"input_ids": input_ids, "segments": segments, "position_ids": position_ids, "targets": targets,
            "sources": sources}
