"""Tests of apo_loss.py: the APO (Plackett-Luce) loss and the chunked sequence log-prob function.

Only loss and log-prob tests live here; the stages have their own test_*.py files.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from apo_loss import (_ChunkedTokenLogps, apo_loss, dpo_pairs_loss, per_token_logps, sequence_logps,
                      sequence_logps_plain)


def make_logps(B=4, K=3, dtype=torch.float32, scale=50.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    pc, rc = (-scale * torch.rand(B, generator=g, dtype=torch.float64) for _ in range(2))
    pr, rr = (-scale * torch.rand(B, K, generator=g, dtype=torch.float64) for _ in range(2))
    return [t.to(dtype) for t in (pc, pr, rc, rr)]


def brute_force_pl(pc, pr, rc, rr, beta, mask=None):
    """-log P with P = exp r+ / (exp r+ + sum_k exp r-_k), straight from the definition, float64."""
    out = []
    for b in range(pc.shape[0]):
        num = math.exp(beta * (float(pc[b]) - float(rc[b])))
        den = num + sum(math.exp(beta * (float(pr[b, k]) - float(rr[b, k])))
                        for k in range(pr.shape[1]) if mask is None or bool(mask[b, k]))
        out.append(-math.log(num / den))
    return torch.tensor(out, dtype=torch.float64)


# ---------------------------------------------------------------------------------------- the loss

@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_k1_equals_dpo(beta):
    pc, pr, rc, rr = make_logps(B=8, K=1, dtype=torch.float64)
    losses, chosen_r, rejected_r = apo_loss(pc, pr, rc, rr, beta=beta)
    dpo = -F.logsigmoid(beta * ((pc - rc) - (pr[:, 0] - rr[:, 0])))
    assert losses.dtype == torch.float64 and losses.shape == (8,) and rejected_r.shape == (8, 1)
    torch.testing.assert_close(losses, dpo, atol=1e-6, rtol=0)
    torch.testing.assert_close(chosen_r, beta * (pc - rc), atol=1e-12, rtol=0)
    torch.testing.assert_close(rejected_r, beta * (pr - rr), atol=1e-12, rtol=0)
    # The same in fp32: same values up to fp32 rounding of rewards of size ~beta * 50.
    f = [t.float() for t in (pc, pr, rc, rr)]
    losses32, _, _ = apo_loss(*f, beta=beta)
    dpo32 = -F.logsigmoid(beta * ((f[0] - f[2]) - (f[1][:, 0] - f[3][:, 0])))
    assert losses32.dtype == torch.float32
    torch.testing.assert_close(losses32, dpo32, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("K", [1, 2, 5])
def test_equals_brute_force_plackett_luce(K):
    pc, pr, rc, rr = make_logps(B=6, K=K, dtype=torch.float64, seed=K)
    losses, _, _ = apo_loss(pc, pr, rc, rr, beta=0.3)
    torch.testing.assert_close(losses, brute_force_pl(pc, pr, rc, rr, 0.3), atol=1e-9, rtol=0)
    losses32, _, _ = apo_loss(*(t.float() for t in (pc, pr, rc, rr)), beta=0.3)
    torch.testing.assert_close(losses32.double(), brute_force_pl(pc, pr, rc, rr, 0.3), atol=1e-5, rtol=0)


def test_hand_computed_value():
    # r+ = 0.1 * (-10 - -12) = 0.2; r- = 0.1 * (-20 - -20) = 0 and 0.1 * (-5 - -6) = 0.1.
    losses, chosen_r, rejected_r = apo_loss(torch.tensor([-10.0]), torch.tensor([[-20.0, -5.0]]),
                                            torch.tensor([-12.0]), torch.tensor([[-20.0, -6.0]]))
    expected = -math.log(math.exp(0.2) / (math.exp(0.2) + 1.0 + math.exp(0.1)))
    assert losses.item() == pytest.approx(expected, abs=1e-6)
    assert chosen_r.item() == pytest.approx(0.2, abs=1e-6)
    assert rejected_r.tolist()[0] == pytest.approx([0.0, 0.1], abs=1e-6)


def test_length_normalized_hand_computed_value():
    # Chosen: 10 tokens, sums -10 (policy) and -12 (reference): averages -1.0 and -1.2, r+ = 0.1 * 0.2 = 0.02.
    # Negatives: 4 tokens, -20 / -20 -> r = 0; 2 tokens, -5 / -6 -> averages -2.5 / -3.0, r = 0.05.
    tokens_c, tokens_r = torch.tensor([10]), torch.tensor([[4, 2]])
    pc, rc = per_token_logps(torch.tensor([-10.0]), tokens_c), per_token_logps(torch.tensor([-12.0]), tokens_c)
    pr, rr = (per_token_logps(torch.tensor([[-20.0, -5.0]]), tokens_r),
              per_token_logps(torch.tensor([[-20.0, -6.0]]), tokens_r))
    assert pc.tolist() == [-1.0] and pr.tolist() == [[-5.0, -2.5]]
    losses, chosen_r, rejected_r = apo_loss(pc, pr, rc, rr)
    expected = -math.log(math.exp(0.02) / (math.exp(0.02) + 1.0 + math.exp(0.05)))
    assert losses.item() == pytest.approx(expected, abs=1e-6)
    assert chosen_r.item() == pytest.approx(0.02, abs=1e-7) and rejected_r.tolist()[0] == pytest.approx([0.0, 0.05], abs=1e-7)
    # the summed loss of the same inputs (test_hand_computed_value) ranks the short negative higher
    assert expected != pytest.approx(-math.log(math.exp(0.2) / (math.exp(0.2) + 1.0 + math.exp(0.1))))
    # a zero-token slot (padding) divides by 1, never by 0
    assert per_token_logps(torch.tensor([0.0, -3.0]), torch.tensor([0, 3])).tolist() == [0.0, -1.0]


@pytest.mark.parametrize("garbage", [0.0, -1e30, float("nan"), float("inf"), float("-inf")])
def test_masked_negative_changes_nothing(garbage):
    pc, pr, rc, rr = make_logps(B=3, K=3)
    mask = torch.tensor([[True, False, True], [True, True, False], [False, True, True]])
    ref = brute_force_pl(pc, pr, rc, rr, 0.1, mask)
    pr_g, rr_g = pr.clone(), rr.clone()
    pr_g[~mask], rr_g[~mask] = garbage, garbage
    losses, _, rejected_r = apo_loss(pc, pr_g, rc, rr_g, rejected_mask=mask)
    torch.testing.assert_close(losses.double(), ref, atol=1e-6, rtol=0)
    assert torch.all(rejected_r[~mask] == 0)
    # Same as dropping the masked column outright (row 0 without column 1).
    alone, _, _ = apo_loss(pc[:1], pr[:1, [0, 2]], rc[:1], rr[:1, [0, 2]])
    assert losses[0].item() == pytest.approx(alone.item(), abs=1e-6)


def test_all_negatives_masked_gives_zero_loss():
    pc, pr, rc, rr = make_logps(B=2, K=2)
    mask = torch.tensor([[False, False], [True, False]])
    losses, _, _ = apo_loss(pc, pr, rc, rr, rejected_mask=mask)
    assert losses[0].item() == 0.0 and losses[1].item() > 0


def test_order_of_negatives_changes_nothing():
    pc, pr, rc, rr = make_logps(B=5, K=4)
    mask = torch.rand(5, 4, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[:, 0] = True
    base, _, _ = apo_loss(pc, pr, rc, rr, rejected_mask=mask)
    for perm in itertools.permutations(range(4)):
        p = list(perm)
        losses, _, _ = apo_loss(pc, pr[:, p], rc, rr[:, p], rejected_mask=mask[:, p])
        torch.testing.assert_close(losses, base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("big", [1e4, -1e4])
def test_extreme_rewards_finite(big):
    # beta * (logp - ref) = +-1e4: exp would overflow, logsumexp must not.
    pc = torch.tensor([big, 0.0, big], requires_grad=True)
    pr = torch.tensor([[0.0, -big], [big, big], [big, -big]], requires_grad=True)
    zeros_c, zeros_r = torch.zeros(3), torch.zeros(3, 2)
    losses, _, _ = apo_loss(pc, pr, zeros_c, zeros_r, beta=1.0)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    # Row 1: r+ = 0 against two negatives at 1e4 -> loss = 1e4 + log 2.
    assert losses[1].item() == pytest.approx(abs(big) + math.log(2) if big > 0 else math.log(1 + 2 * math.exp(-1e4)), rel=1e-6, abs=1e-6)


def test_gradient_signs_and_masked_zero():
    pc, pr, rc, rr = make_logps(B=4, K=3)
    mask = torch.tensor([[True, True, False], [True, False, False], [True, True, True], [False, True, True]])
    pr = torch.where(mask, pr, torch.full_like(pr, float("nan")))  # garbage in the masked slots
    pc.requires_grad_(True), pr.requires_grad_(True), rc.requires_grad_(True), rr.requires_grad_(True)
    losses, _, _ = apo_loss(pc, pr, rc, rr, beta=0.1, rejected_mask=mask)
    losses.sum().backward()
    # Descent raises log pi(y+) and lowers every real negative's log pi(y-).
    assert (pc.grad < 0).all() and (pr.grad[mask] > 0).all()
    assert (rc.grad > 0).all() and (rr.grad[mask] < 0).all()
    assert torch.all(pr.grad[~mask] == 0) and torch.all(rr.grad[~mask] == 0)
    # Exact values: dL/dpc = -beta * (1 - P), dL/dpr_k = beta * softmax_k.
    r = torch.where(mask, 0.1 * (pr - rr), torch.full_like(pr, float("-inf"))).detach()
    logits = torch.cat([0.1 * (pc - rc).detach()[:, None], r], 1)
    sm = logits.softmax(1)
    torch.testing.assert_close(pc.grad, -0.1 * (1 - sm[:, 0]), atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(pr.grad, 0.1 * sm[:, 1:], atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp32_and_bf16_inputs(dtype):
    pc, pr, rc, rr = make_logps(B=4, K=3, dtype=dtype)
    pc.requires_grad_(True), pr.requires_grad_(True)
    losses, chosen_r, rejected_r = apo_loss(pc, pr, rc, rr, beta=0.1)
    assert losses.dtype == chosen_r.dtype == rejected_r.dtype == torch.float32
    # Exact against the same (bf16-rounded) inputs taken to float64.
    ref = brute_force_pl(*(t.detach().double() for t in (pc, pr, rc, rr)), 0.1)
    torch.testing.assert_close(losses.double(), ref, atol=1e-5, rtol=0)
    losses.sum().backward()
    assert pc.grad.dtype == dtype and pr.grad.dtype == dtype
    assert torch.isfinite(pc.grad.float()).all() and (pc.grad.float() < 0).all()
    assert not chosen_r.requires_grad and not rejected_r.requires_grad


# ------------------------------------------------------------------- the pairwise alternative

def brute_force_pairs(pc, pr, rc, rr, beta, mask=None):
    """mean over real negatives of -log sigmoid(r+ - r-_k), straight from the definition, float64."""
    out = []
    for b in range(pc.shape[0]):
        ks = [k for k in range(pr.shape[1]) if mask is None or bool(mask[b, k])]
        rp = beta * (float(pc[b]) - float(rc[b]))
        terms = [math.log1p(math.exp(-(rp - beta * (float(pr[b, k]) - float(rr[b, k]))))) for k in ks]
        out.append(sum(terms) / len(terms) if terms else 0.0)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_dpo_pairs_k1_equals_apo_loss(beta):
    pc, pr, rc, rr = make_logps(B=8, K=1, dtype=torch.float64, seed=3)
    pairs, chosen_p, rejected_p = dpo_pairs_loss(pc, pr, rc, rr, beta=beta)
    apo, chosen_a, rejected_a = apo_loss(pc, pr, rc, rr, beta=beta)
    torch.testing.assert_close(pairs, apo, atol=1e-12, rtol=0)
    torch.testing.assert_close(chosen_p, chosen_a, atol=0, rtol=0)
    torch.testing.assert_close(rejected_p, rejected_a, atol=0, rtol=0)


@pytest.mark.parametrize("K", [2, 5])
def test_dpo_pairs_equals_mean_of_pairs_and_differs_from_plackett_luce(K):
    pc, pr, rc, rr = make_logps(B=6, K=K, dtype=torch.float64, seed=K)
    losses, _, _ = dpo_pairs_loss(pc, pr, rc, rr, beta=0.3)
    torch.testing.assert_close(losses, brute_force_pairs(pc, pr, rc, rr, 0.3), atol=1e-9, rtol=0)
    # Two different objectives for K > 1: the mean of pairs is not -log P of the K+1-way race.
    pl, _, _ = apo_loss(pc, pr, rc, rr, beta=0.3)
    assert (pl - losses).abs().max() > 1e-3


@pytest.mark.parametrize("garbage", [0.0, float("nan"), float("inf"), float("-inf")])
def test_dpo_pairs_masked_negative_changes_nothing(garbage):
    pc, pr, rc, rr = make_logps(B=3, K=3)
    mask = torch.tensor([[True, False, True], [True, True, False], [False, False, False]])
    pr_g, rr_g = pr.clone(), rr.clone()
    pr_g[~mask], rr_g[~mask] = garbage, garbage
    pc.requires_grad_(True), pr_g.requires_grad_(True)
    losses, _, rejected_r = dpo_pairs_loss(pc, pr_g, rc, rr_g, rejected_mask=mask)
    torch.testing.assert_close(losses.double(), brute_force_pairs(pc, pr, rc, rr, 0.1, mask), atol=1e-6, rtol=0)
    assert losses[2].item() == 0.0 and torch.all(rejected_r[~mask] == 0)
    losses.sum().backward()
    assert torch.isfinite(pc.grad).all() and torch.all(pr_g.grad[~mask] == 0)
    # Exact gradient of row 0: dL/dpc = -beta/n * sum_k sigmoid(r-_k - r+).
    r0 = 0.1 * (pc[0] - rc[0]).detach()
    expected = -0.1 / 2 * sum(torch.sigmoid(0.1 * (pr[0, k] - rr[0, k]) - r0) for k in (0, 2))
    assert pc.grad[0].item() == pytest.approx(expected.item(), abs=1e-7)


def test_shape_validation():
    pc, pr, rc, rr = make_logps(B=2, K=3)
    with pytest.raises(ValueError, match="chosen"):
        apo_loss(pc[:, None], pr, rc, rr)
    with pytest.raises(ValueError, match="rejected"):
        apo_loss(pc, pr[:, 0], rc, rr)
    with pytest.raises(ValueError, match="rejected"):
        apo_loss(pc, pr[:1], rc, rr[:1])
    with pytest.raises(ValueError, match="rejected_mask"):
        apo_loss(pc, pr, rc, rr, rejected_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="rejected_mask"):
        apo_loss(pc, pr, rc, rr, rejected_mask=torch.ones(2, 2, dtype=torch.bool))


# ------------------------------------------------------------------------------ sequence log-probs

def make_lm_inputs(N=3, T=11, H=16, V=37, bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, T, H, generator=g).to(dtype)
    weight = torch.randn(V, H, generator=g).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[0, :4] = -100  # a prompt
    labels[1, -3:] = -100  # padding
    labels[2, ::2] = -100  # scattered
    return hidden, weight, b, labels


def grads(fn, *tensors):
    tensors = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
    out = fn(*tensors)
    # A non-uniform upstream gradient, so per-sequence scaling is tested too.
    (out * torch.arange(1, out.shape[0] + 1, dtype=out.dtype)).sum().backward()
    return out.detach(), [t.grad if t is not None else None for t in tensors]


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_sequence_logps_matches_full(chunk_size, bias):
    hidden, weight, b, labels = make_lm_inputs(bias=bias)
    out, (gh, gw, gb) = grads(lambda h, w, bb: sequence_logps(h, w, labels, chunk_size=chunk_size, lm_head_bias=bb),
                              hidden, weight, b)
    ref, (rh, rw, rb) = grads(lambda h, w, bb: sequence_logps_plain(h, w, labels, lm_head_bias=bb),
                              hidden, weight, b)
    assert out.shape == (3,) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(gh, rh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, rw, atol=1e-5, rtol=1e-5)
    if bias:
        torch.testing.assert_close(gb, rb, atol=1e-5, rtol=1e-5)
    # Ignored positions neither count nor receive gradient.
    assert torch.all(gh[labels == -100] == 0)


def test_sequence_logps_hand_value_and_ignored():
    # V = 2, zero weights: every labelled token has log-prob log(1/2).
    hidden = torch.randn(2, 5, 3)
    labels = torch.tensor([[-100, -100, 1, 0, 1], [-100, -100, -100, -100, -100]])
    out = sequence_logps(hidden, torch.zeros(2, 3), labels, chunk_size=2)
    torch.testing.assert_close(out, torch.tensor([3 * math.log(0.5), 0.0]))
    # A custom ignore_index.
    out = sequence_logps(hidden, torch.zeros(2, 3), labels.masked_fill(labels == -100, 7), ignore_index=7)
    torch.testing.assert_close(out, torch.tensor([3 * math.log(0.5), 0.0]))


def test_chunked_function_gradcheck_fp64():
    hidden, weight, b, labels = make_lm_inputs(N=3, T=5, H=4, V=9, dtype=torch.float64)
    h = hidden.reshape(-1, 4)[labels.reshape(-1) != -100].clone().requires_grad_(True)
    y = labels.reshape(-1)[labels.reshape(-1) != -100]
    assert torch.autograd.gradcheck(lambda h, w, bb: _ChunkedTokenLogps.apply(h, w, bb, y, 3),
                                    (h, weight.requires_grad_(True), b.requires_grad_(True)))


def test_frozen_weight_gets_no_grad():
    hidden, weight, _, labels = make_lm_inputs(bias=False)
    hidden.requires_grad_(True)
    sequence_logps(hidden, weight, labels, chunk_size=5).sum().backward()
    assert weight.grad is None and hidden.grad is not None


def test_sequence_logps_bf16():
    hidden, weight, b, labels = make_lm_inputs(dtype=torch.bfloat16, H=32, V=101)
    out, (gh, gw, gb) = grads(lambda h, w, bb: sequence_logps(h, w, labels, chunk_size=7, lm_head_bias=bb),
                              hidden, weight, b)
    ref, (rh, rw, rb) = grads(lambda h, w, bb: sequence_logps_plain(h.double(), w.double(), labels, bb.double()),
                              hidden, weight, b)
    assert out.dtype == torch.float32 and gh.dtype == gw.dtype == gb.dtype == torch.bfloat16
    # Logits are rounded to bf16 by the matmul (as the model's own lm_head does); the sum is fp32.
    torch.testing.assert_close(out.double(), ref, atol=0.5, rtol=1e-2)
    torch.testing.assert_close(gh.double(), rh.to(torch.bfloat16).double(), atol=0.1, rtol=0.05)
    torch.testing.assert_close(gw.double(), rw.to(torch.bfloat16).double(), atol=0.1, rtol=0.05)


def test_backward_under_bf16_autocast_is_the_gradient_of_its_forward():
    """accelerate's bf16 runs the forward under autocast and the backward outside it (fp32 weights)."""
    hidden, weight, b, labels = make_lm_inputs(H=32, V=101)
    h, w, bb = (t.clone().requires_grad_(True) for t in (hidden, weight, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sequence_logps(h, w, labels, chunk_size=7, lm_head_bias=bb)
    out.sum().backward()
    # d logp_y / d logits = onehot(y) - softmax sums to exactly 0 over the vocabulary, so the bias
    # gradient does too, if backward's softmax is the forward's (logits rounded to bf16 alike).
    assert abs(bb.grad.sum().item()) < 1e-5, bb.grad.sum()
    # The same maths by plain autograd: bf16 matmul (autocast), fp32 bias and softmax.
    ref = [t.clone().requires_grad_(True) for t in (hidden, weight, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = (ref[0] @ ref[1].t()).float() + ref[2]
        token = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        expected = (token * (labels != -100)).sum(-1)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-5)
    for got, want in zip((h.grad, w.grad, bb.grad), (t.grad for t in ref)):
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


def test_sequence_logps_shape_validation():
    hidden, weight, b, labels = make_lm_inputs()
    with pytest.raises(ValueError, match="labels"):
        sequence_logps(hidden, weight, labels[:, :-1])
    with pytest.raises(ValueError, match="lm_head_weight"):
        sequence_logps(hidden, weight[:, :-1], labels)
    with pytest.raises(ValueError, match="lm_head_bias"):
        sequence_logps(hidden, weight, labels, lm_head_bias=b[:-1])
    with pytest.raises(ValueError, match="chunk_size"):
        sequence_logps(hidden, weight, labels, chunk_size=0)


def test_tiny_qwen2_matches_model_logits():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM(config).eval()
    input_ids = torch.randint(0, 300, (3, 20))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, -6:] = 0  # right padding
    labels = input_ids.clone()
    labels[:, :8] = -100  # prompt
    labels[attention_mask == 0] = -100

    def ours():
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return sequence_logps(hidden[:, :-1], model.lm_head.weight, labels[:, 1:], chunk_size=5)

    def theirs():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
        y = labels[:, 1:]
        logps = logits.log_softmax(-1).gather(2, y.clamp(min=0)[..., None]).squeeze(2)
        return (logps * (y != -100)).sum(-1)

    a, b = ours(), theirs()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6)
    assert a[0].item() < -10  # 11 labelled tokens of a ~uniform 300-way model: about 11 * log(1/300)
    # The model's parameter gradients agree too.
    model.zero_grad()
    a.sum().backward()
    ga = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    b.sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ga[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
