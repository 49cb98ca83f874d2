"""APO loss (multi-negative Plackett-Luce, top-1) and the summed sequence log-probs it takes.

Needs only torch: copy this file alone into another project if you like.

The paper (Yang, Yu, Duan, Lu, "Turning Drift into Constraint", ICML 2026, arXiv 2510.04142,
Sec. 2.3) scores a response y to a prompt x by the DPO implicit reward against the frozen
bootstrapped model pi_ref, Eq. (6), and ranks the consensus y+ above all K source trajectories
y-_1..y-_K at once with a Plackett-Luce (top-1) probability, Eq. (7); L_APO is its negative
log-likelihood, Eqs. (8)-(9):

    r(y)  = beta * (log pi_theta(y|x) - log pi_ref(y|x))                          (6)
    P     = exp r(y+) / (exp r(y+) + sum_k exp r(y-_k))    the positive IS in the denominator   (7)
    L_APO = -log P = logsumexp([r+, r-_1, ..., r-_K]) - r+                         (8)-(9)

log pi(y|x) is the sequence log-prob summed over the response tokens (no length normalisation).
K = 1 gives DPO exactly: -log sigmoid(r+ - r-).

`dpo_pairs_loss` is the pairwise alternative the official scripts run, mean_k -log sigmoid(r+ - r-_k);
both share one signature, so a caller picks one from LOSSES by name.

`per_token_logps` is an optional departure (apo.py --length-normalize, off by default): the
average log-prob per response token of SimPO / LD-DPO in place of the sum. Summed log-probs
reward moving away from short negatives more cheaply than from long ones; the average does not.
It changes what r(y) measures, not the loss: apply it to all four log-prob tensors, then call
either loss as usual.

`sequence_logps_plain` defines log pi(y|x); `sequence_logps` computes the same sums from the final
hidden states and the output projection in chunks of tokens, so the [sequences, tokens, vocab]
logits tensor is never materialised, neither in forward nor in backward.
"""

import torch
import torch.nn.functional as F


def apo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
             reference_rejected_logps, beta=0.1, rejected_mask=None):
    """Plackett-Luce top-1 loss of one positive against K negatives: the paper's L_APO, Eqs. (6)-(9).

    policy_chosen_logps, reference_chosen_logps: [B]
    policy_rejected_logps, reference_rejected_logps: [B, K]
    rejected_mask: optional bool [B, K], True where the negative is real. Masked slots take no
        part: their values may be anything (padding, NaN, inf) and get exactly zero gradient.
        A row with no real negative has loss 0 (P = 1).
    Returns (losses [B], chosen_rewards [B], rejected_rewards [B, K]), in fp32 (fp64 for fp64
    inputs) whatever the input dtype; the rewards are detached (for logging), masked rewards are 0.
    """
    chosen, rejected = _rewards(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                reference_rejected_logps, beta, rejected_mask)
    if rejected_mask is not None:
        # torch.where, not a multiply: its backward sends exactly 0 to the unselected branch, so
        # NaN/inf in a masked slot poisons neither the loss nor any gradient (0 * NaN = NaN).
        rejected = torch.where(rejected_mask, rejected, torch.full_like(rejected, float("-inf")))
    # r+ is finite, so the row max is finite and logsumexp ignores the -inf slots (softmax 0 there).
    logits = torch.cat([chosen[:, None], rejected], dim=1)
    losses = torch.logsumexp(logits, dim=1) - chosen
    return losses, chosen.detach(), _logged(rejected, rejected_mask)


def dpo_pairs_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                   reference_rejected_logps, beta=0.1, rejected_mask=None):
    """Pairwise DPO averaged over the K negatives: what the official APO scripts run
    (ms-swift `--rlhf_type dpo` on one (consensus, source) pair per line).

    loss = mean_k -log sigmoid(r+ - r-_k) over the real negatives. K = 1 equals `apo_loss`.
    Unlike Plackett-Luce, every pair is its own binary race: a negative already far below the
    positive still pulls as hard as in a single-pair DPO, and the positive is not competing
    against all K at once. Same arguments and returns as `apo_loss`.
    """
    chosen, rejected = _rewards(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                reference_rejected_logps, beta, rejected_mask)
    if rejected_mask is None:
        return -F.logsigmoid(chosen[:, None] - rejected).mean(1), chosen.detach(), rejected.detach()
    # Masked slots become finite before logsigmoid: its backward would turn 0 * NaN into NaN.
    safe = torch.where(rejected_mask, rejected, torch.zeros_like(rejected))
    pair_losses = torch.where(rejected_mask, -F.logsigmoid(chosen[:, None] - safe), torch.zeros_like(safe))
    losses = pair_losses.sum(1) / rejected_mask.sum(1).clamp(min=1)
    return losses, chosen.detach(), _logged(rejected, rejected_mask)


LOSSES = {"apo": apo_loss, "dpo-pairs": dpo_pairs_loss}


def per_token_logps(logps, token_counts):
    """Summed response log-probs divided by the response's token count (at least 1): the average
    log-prob of SimPO / LD-DPO. Any shape; token_counts broadcasts against logps. Not the paper's
    loss, which sums (Eq. (6)); a named departure."""
    return logps / token_counts.to(logps.dtype).clamp(min=1)


def _rewards(pc, pr, rc, rr, beta, rejected_mask):
    """Checked shapes, then r = beta * (policy - reference) for the chosen [B] and rejected [B, K]."""
    if pc.dim() != 1 or rc.shape != pc.shape:
        raise ValueError(f"chosen logps must both be [B], got policy {tuple(pc.shape)} and reference {tuple(rc.shape)}")
    if pr.dim() != 2 or rr.shape != pr.shape or pr.shape[0] != pc.shape[0] or pr.shape[1] < 1:
        raise ValueError(f"rejected logps must both be [B, K] with B = {pc.shape[0]} and K >= 1, "
                         f"got policy {tuple(pr.shape)} and reference {tuple(rr.shape)}")
    if rejected_mask is not None and (rejected_mask.shape != pr.shape or rejected_mask.dtype != torch.bool):
        raise ValueError(f"rejected_mask must be a bool tensor of shape {tuple(pr.shape)}, "
                         f"got {rejected_mask.dtype} {tuple(rejected_mask.shape)}")
    # Upcast before subtracting: two bf16 sequence log-probs of -1000 differ by less than their ulp.
    acc = torch.promote_types(pc.dtype, torch.float32)
    return beta * (pc.to(acc) - rc.to(acc)), beta * (pr.to(acc) - rr.to(acc))


def _logged(rejected, rejected_mask):
    """Detached rejected rewards for logging, 0 in masked slots."""
    rejected = rejected.detach()
    if rejected_mask is None:
        return rejected
    return torch.where(rejected_mask, rejected, torch.zeros_like(rejected))


# ---------------------------------------------------------------------------------------------
# log pi(y|x): the definition, then the same sums computed in chunks


def sequence_logps_plain(hidden_states, lm_head_weight, labels, lm_head_bias=None, ignore_index=-100):
    """log pi(y|x) of each sequence: sum over the labelled tokens t of log softmax(W h_t + b)[y_t].

    The definition, written plainly: it materialises the [N, T, V] logits (152k vocab for Qwen2.5,
    so gigabytes for one batch of long responses). `sequence_logps` computes the same numbers in
    chunks; arguments as there.
    """
    acc = torch.promote_types(lm_head_weight.dtype, torch.float32)
    logits = F.linear(hidden_states.to(acc), lm_head_weight.to(acc), None if lm_head_bias is None else lm_head_bias.to(acc))
    keep = labels != ignore_index
    logps = logits.log_softmax(-1).gather(2, labels.masked_fill(~keep, 0).long()[..., None]).squeeze(2)
    return (logps * keep).sum(-1)


def sequence_logps(hidden_states, lm_head_weight, labels, chunk_size=512, lm_head_bias=None,
                   ignore_index=-100):
    """`sequence_logps_plain`, equal to float rounding, without ever holding the full logits tensor.

    hidden_states: [N, T, H], final hidden states (after the last norm), where hidden_states[:, t]
        predicts labels[:, t]. The caller shifts: for a causal LM pass
        last_hidden_state[:, :-1] and input_ids-derived labels[:, 1:].
    lm_head_weight: [V, H]; lm_head_bias: optional [V].
    labels: [N, T] int, ignore_index where a position does not count (prompt, padding).
    chunk_size: tokens per chunk; peak extra memory is about 3 * chunk_size * V * 4 bytes.
    Returns [N] in fp32 (fp64 for fp64 weights); differentiable wrt hidden, weight and bias.
    """
    if hidden_states.dim() != 3 or labels.shape != hidden_states.shape[:2]:
        raise ValueError(f"need hidden_states [N, T, H] and labels [N, T], got "
                         f"{tuple(hidden_states.shape)} and {tuple(labels.shape)}")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden_states.shape[2]:
        raise ValueError(f"lm_head_weight must be [V, {hidden_states.shape[2]}], got {tuple(lm_head_weight.shape)}")
    if lm_head_bias is not None and lm_head_bias.shape != lm_head_weight.shape[:1]:
        raise ValueError(f"lm_head_bias must be [{lm_head_weight.shape[0]}], got {tuple(lm_head_bias.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    # Gather the labelled positions first: prompt and padding tokens then cost nothing.
    keep = labels != ignore_index
    rows = keep.nonzero()[:, 0]
    token_logps = _ChunkedTokenLogps.apply(hidden_states[keep], lm_head_weight, lm_head_bias,
                                           labels[keep].long(), chunk_size)
    out = torch.zeros(labels.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    return out.index_add(0, rows, token_logps)


class _ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias)[label] per token, chunk by chunk, recomputed in backward.

    Saves only the inputs and one fp32 logsumexp per token; peak extra memory is a few
    [chunk_size, V] fp32 buffers instead of [tokens, V].

    Backward recomputes the logits under the autocast state of forward (autograd runs backward
    with autocast off): logits recomputed in fp32 against a logsumexp of bf16 logits would make
    the gradient something other than the gradient of the forward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size):
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        # hidden [M, H], weight [V, H], bias [V] or None, labels [M] -> [M]
        acc = torch.promote_types(weight.dtype, torch.float32)  # fp32 softmax even for bf16 weights
        out = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        lse = torch.empty_like(out)
        for s in range(0, hidden.shape[0], chunk_size):
            logits = _chunk_logits(hidden[s:s + chunk_size], weight, bias, acc)
            lse[s:s + chunk_size] = torch.logsumexp(logits, dim=-1)
            out[s:s + chunk_size] = logits.gather(1, labels[s:s + chunk_size, None]).squeeze(1) - lse[s:s + chunk_size]
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            return _ChunkedTokenLogps._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = lse.dtype
        grad_h = torch.empty_like(hidden) if need_h else None
        # Accumulate weight/bias grads across chunks in fp32; skipped entirely for a frozen lm_head.
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        for s in range(0, hidden.shape[0], ctx.chunk_size):
            h, y, g = hidden[s:s + ctx.chunk_size], labels[s:s + ctx.chunk_size], grad_out[s:s + ctx.chunk_size].to(acc)
            # d logp_y / d logits = onehot(y) - softmax(logits); scaled by the incoming grad per token.
            dlogits = _chunk_logits(h, weight, bias, acc).sub_(lse[s:s + ctx.chunk_size, None]).exp_()
            dlogits.mul_(-g[:, None]).scatter_add_(1, y[:, None], g[:, None])
            if need_h:
                grad_h[s:s + ctx.chunk_size] = (dlogits.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w and weight.dtype == acc:
                grad_w.addmm_(dlogits.t(), h.to(acc))  # in place: no [V, H] temporary per chunk
            elif need_w:
                grad_w += dlogits.t().to(weight.dtype) @ h.to(weight.dtype)
            if need_b:
                grad_b += dlogits.sum(0)
        return (grad_h,
                grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None,
                None, None)


def _chunk_logits(h, weight, bias, acc):
    # The matmul runs in the weight's dtype (tensor cores accumulate in fp32 anyway) so the big
    # weight is never copied; only the [chunk, V] result is upcast for the softmax.
    logits = (h.to(weight.dtype) @ weight.t()).to(acc)  # a fresh tensor: callers modify it in place
    return logits.add_(bias.to(acc)) if bias is not None else logits
