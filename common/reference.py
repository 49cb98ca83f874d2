"""apo.py's reference log-probs: computed once, by a no-grad pass of the initial weights, and cached
in the run folder with what they depend on as metadata, so a rerun or a resumed run reuses them
and any change (data, model, lengths, precision) recomputes them."""

import os
from pathlib import Path

from common.records import disk_full_reported, lazy_import
from common.run import run_folder

torch = lazy_import("torch")

REFERENCE_FILE = "reference_logps.safetensors"
# Bump when the log-prob computation changes, so caches written by older code are recomputed.
REFERENCE_VERSION = "1"
TENSORS_SHA256 = "tensors_sha256"  # metadata key: the cached values as saved


def reference_logps(accelerator, model, examples, config, out, forward, batch_size):
    """The cached reference log-probs if they match, else computed (compute_reference) and cached;
    and which it was."""
    run = run_folder(out)
    # bf16 base weights (LoRA on GPU) give other log-probs than fp32 ones under the same autocast.
    weights = next(model.parameters()).dtype
    key = reference_key(config, accelerator.mixed_precision + ("" if weights == torch.float32 else f", {weights} weights"))
    path = run / REFERENCE_FILE
    reference, problem = load_reference(path, key, examples)
    if problem:
        accelerator.print(f"reference log-probs: the cached {path} is not used, {problem}; computing them again",
                          flush=True)
    # Decided together: the pass is collective, and a node without a shared disk sees no cache.
    from common.training import global_count

    state = "computed" if global_count(accelerator, reference is None) else "reused"
    if state == "computed":
        reference = compute_reference(accelerator, examples, batch_size, forward, "reference log-probs")
        if accelerator.is_main_process:
            run.mkdir(parents=True, exist_ok=True)
            save_reference(path, reference, key)
        accelerator.wait_for_everyone()
    accelerator.print(f"reference log-probs: {state} ({path})", flush=True)
    return reference, state


def reference_key(config, precision):
    """The metadata a cached reference must match: everything the log-probs depend on."""
    key = {k: str(config[k]) for k in ("data_sha256", "model", "model_fingerprint", "max_length", "max_negatives",
                                       "share_prompt")}
    return dict(key, precision=precision, version=REFERENCE_VERSION)


def load_reference(path, key, examples):
    """(the cached tensors, None) if the file exists and matches key and data, else (None, why not:
    None when there is no file, or the settings or data changed; a sentence when the file itself is bad)."""
    from safetensors import safe_open

    if not Path(path).is_file():
        return None, None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # a torn or foreign file is recomputed, not trusted
        return None, f"unreadable ({' '.join(str(e).split())[:200]})"
    stored_hash = meta.pop(TENSORS_SHA256, None)
    if meta != key:
        return None, None
    lines = torch.tensor([ex.record["_line"] for ex in examples])
    if tensors.get("line") is None or not torch.equal(tensors["line"], lines):
        return None, None
    problem = reference_problem(tensors, examples)
    if problem is None and stored_hash != tensors_sha256(tensors):
        problem = ("its values are not the ones that were saved (content hash differs)" if stored_hash else
                   "it carries no content hash to check its values against")
    return (None, problem) if problem else (tensors, None)


def reference_problem(tensors, examples):
    """What is wrong with cached reference tensors for these examples, or None: each is a sum of
    log-probabilities, so finite and at most 0, one per example and negative."""
    n, width = len(examples), max(len(ex.negatives) for ex in examples)
    shapes = {"chosen": (n,), "rejected": (n, width), "num_negatives": (n,)}
    for name, shape in shapes.items():
        if name not in tensors or tuple(tensors[name].shape) != shape:
            got = tuple(tensors[name].shape) if name in tensors else "missing"
            return f"'{name}' has shape {got}, expected {shape}"
    if tensors["num_negatives"].tolist() != [len(ex.negatives) for ex in examples]:
        return "'num_negatives' does not match the data"
    for name in ("chosen", "rejected"):
        values = tensors[name].float()
        if not torch.isfinite(values).all():
            return f"'{name}' holds NaN or infinite values"
        if (values > 0).any():
            return f"'{name}' holds positive values, which no sum of log-probabilities can be"
    return None


def tensors_sha256(tensors):
    """sha256 over the tensors' names and bytes, stored in the file's metadata at save."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_reference(path, tensors, key):
    from safetensors.torch import save_file

    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    with disk_full_reported(path, leftovers=[tmp], resumes="the same command computes the reference pass again"):
        save_file(tensors, str(tmp), metadata={**key, TENSORS_SHA256: tensors_sha256(tensors)})
        os.replace(tmp, path)


def compute_reference(accelerator, examples, batch_size, forward, desc):
    """Log-probs of the initial weights for every example, each process its share, summed.

    forward(examples) gives a batch's summed log-probs: chosen [B], rejected [B, K] and mask [B, K]
    (apo.concatenated_forward). Batches of similar lengths; every process runs the same number of
    forwards (the list is padded with repeats whose results are dropped) because FSDP and ZeRO-3
    forwards are collective.
    """
    from tqdm.auto import tqdm

    n, width = len(examples), max(len(ex.negatives) for ex in examples)
    chosen = torch.zeros(n, device=accelerator.device)
    rejected = torch.zeros(n, width, device=accelerator.device)
    filled = torch.zeros(n, device=accelerator.device)
    order = sorted(range(n), key=lambda i: -examples[i].length)
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    real = len(batches)
    batches += batches[-1:] * (-len(batches) % accelerator.num_processes)
    with torch.no_grad(), tqdm(total=n, desc=desc, disable=not accelerator.is_main_process) as progress:
        for i in range(accelerator.process_index, len(batches), accelerator.num_processes):
            idx = batches[i]
            c, r, mask = forward([examples[j] for j in idx])
            if i < real:
                idx_t = torch.tensor(idx, device=accelerator.device)
                chosen[idx_t] = c.float()
                rejected[idx_t, :r.shape[1]] = torch.where(mask, r.float(), torch.zeros_like(r.float()))
                filled[idx_t] = 1
            progress.update(len(idx) * accelerator.num_processes)
        # Each example is filled by exactly one process and zero elsewhere, so the sum is exact.
        chosen, rejected, filled = (accelerator.reduce(t, reduction="sum") for t in (chosen, rejected, filled))
    if not torch.equal(filled, torch.ones_like(filled)):
        raise RuntimeError("reference pass did not cover every example exactly once")
    return {"chosen": chosen.cpu(), "rejected": rejected.cpu(),
            "num_negatives": torch.tensor([len(ex.negatives) for ex in examples]),
            "line": torch.tensor([ex.record["_line"] for ex in examples])}

