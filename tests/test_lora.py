"""LoRA adapters (--lora-rank, peft) in bootstrap.py and apo.py, on the tiny Qwen2 and Qwen2.5-VL:
only the adapters train, the merged folder is base + (alpha / r) * B @ A, the adapter folder loads
with peft, exact resume after SIGKILL, 2 processes = 1, log(1 + K) at APO's first step, and the
messages for a missing peft or a wrong --lora-targets."""

import math
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import bootstrap
import tiny_models
from launch_for_tests import sigkill_at_line
from common.modeling import is_vision_model
from test_apo_stage import PREFERENCES, adam_divergence_bound, assert_same_first_step, metrics, run_apo, write_jsonl
from test_bootstrap import REPO, env, free_port, train_args, write_data
from test_bootstrap import run as run_bootstrap
from common.run import run_folder

RANK, ALPHA = 4, 8
LORA = ["--lora-rank", str(RANK), "--lora-alpha", str(ALPHA)]
BOOTSTRAP = [*LORA, "--max-steps", "4", "--save-every", "2", "--lr", "1e-2"]


def load(folder):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return (AutoModelForImageTextToText if is_vision_model(folder) else AutoModelForCausalLM).from_pretrained(folder)


def adapters(out):
    """{module name: (A, B)} from the adapter folder, as peft wrote it."""
    tensors = load_file(str(run_folder(out) / "adapter" / "adapter_model.safetensors"))
    pairs = {}
    for key, value in tensors.items():
        module, kind = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
        pairs.setdefault(module, {})[kind.split(".")[0]] = value
    return {m: (p["A"], p["B"]) for m, p in pairs.items()}


def assert_merged_is_base_plus_adapters(base_folder, out, targets):
    """Every adapted weight is base + (alpha / r) * B @ A, every other tensor is the base's, bit for bit."""
    base, merged = load(base_folder).state_dict(), load(out).state_dict()
    pairs = adapters(out)
    assert sorted(pairs) == sorted(targets)
    assert merged.keys() == base.keys()
    assert any(B.abs().sum() > 0 for _, B in pairs.values())  # the adapters did train
    for name in base:
        module = name.removesuffix(".weight")
        if module in pairs:
            A, B = pairs[module]
            assert A.shape == (RANK, base[name].shape[1]) and B.shape == (base[name].shape[0], RANK)
            torch.testing.assert_close(merged[name], base[name] + (ALPHA / RANK) * B @ A, rtol=0, atol=1e-6, msg=name)
        else:
            assert torch.equal(merged[name], base[name]), name


def language_linear_layers(folder):
    """Names of the language model's nn.Linear modules, found here without training.py."""
    model = load(folder)
    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head and "visual" not in n]


# ---------------------------------------------------------------------------------------------
# bootstrap.py


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_text_model):
    folder = tmp_path_factory.mktemp("lora")
    data = write_data(folder)
    out = folder / "out"
    run_bootstrap(train_args(tiny_text_model, data, out, *BOOTSTRAP))
    return data, out


def test_bootstrap_lora_trains_only_adapters_and_merges_them(straight, tiny_text_model):
    from peft import PeftModel

    _, out = straight
    targets = language_linear_layers(tiny_text_model)
    assert len(targets) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers; not the tied head
    assert_merged_is_base_plus_adapters(tiny_text_model, out, targets)

    # The adapter folder is peft's own: loaded on the base, it computes what the merged folder computes.
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(load(tiny_text_model), run_folder(out) / "adapter").eval()(ids).logits
        merged_logits = load(out).eval()(ids).logits
    torch.testing.assert_close(peft_logits, merged_logits, rtol=0, atol=1e-5)

    # Checkpoints hold the adapters alone (the frozen base is reloaded from --model on resume).
    saved = load_file(str(run_folder(out) / "checkpoints" / "step-4" / "model.safetensors"))
    assert sorted(saved) == sorted(f"model.{t}.lora_{ab}.default.weight" for t in targets for ab in "AB")


def test_bootstrap_lora_resumes_exactly_after_sigkill(tmp_path, straight, tiny_text_model):
    data, reference = straight
    out = tmp_path / "killed"
    cmd = [sys.executable, "bootstrap.py", *train_args(tiny_text_model, data, out, *BOOTSTRAP)]
    proc = sigkill_at_line(cmd, "checkpoint: step 2", cwd=REPO, env=env())
    assert proc.returncode == -signal.SIGKILL and not (run_folder(out) / "adapter").exists()

    # Other LoRA settings in the same folder would mix two runs: refused.
    other = run_bootstrap(train_args(tiny_text_model, data, out, *BOOTSTRAP, "--lora-alpha", "16"), check=False)
    assert other.returncode == 2 and "lora_alpha: 8 -> 16" in other.stderr

    assert "resuming from step 2" in run_bootstrap(train_args(tiny_text_model, data, out, *BOOTSTRAP)).stdout
    a, b = adapters(reference), adapters(out)
    for name in a:
        for x, y in zip(a[name], b[name]):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-7, msg=name)
    assert [m["loss"] for m in metrics(out)] == pytest.approx([m["loss"] for m in metrics(reference)], rel=1e-6)


def test_missing_peft_and_unknown_targets_exit_2_with_the_reason(tmp_path, capsys, monkeypatch, tiny_text_model):
    data = write_data(tmp_path, n_train=2)
    common = ["--model", tiny_text_model, "--data", str(data), "--out", str(tmp_path / "o"), "--max-steps", "1"]
    with pytest.raises(SystemExit) as exit_:
        bootstrap.main([*common, *LORA, "--lora-targets", "q_proj,qkv"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    # qkv is a layer of a VLM's vision tower, never a target
    assert "--lora-targets: qkv is not a linear layer of the language model; its linear layers are down_proj, " \
           "gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in err

    monkeypatch.setitem(sys.modules, "peft", None)  # what `import peft` meets when it is not installed
    with pytest.raises(SystemExit) as exit_:
        bootstrap.main([*common, *LORA])
    # at parse time, before the data or a model is loaded
    assert exit_.value.code == 2
    assert "argument --lora-rank: needs the peft package, which is not installed: pip install peft" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# apo.py on the VLM: images, text-only rows, --freeze-vision, 2 processes


APO = [*LORA, "--freeze-vision", "--max-length", "256", "--grad-accum", "2", "--max-steps", "2", "--lr", "1e-2",
       "--warmup", "0", "--schedule", "constant"]


@pytest.fixture(scope="module")
def vl_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vl")
    tiny_models.write_test_image(folder / "cxr.png", seed=1)
    tiny_models.write_test_image(folder / "prior.png", seed=2)
    rows = [dict(PREFERENCES[0], images=["cxr.png"]), dict(PREFERENCES[1], images=["cxr.png", "prior.png"]),
            PREFERENCES[2], dict(PREFERENCES[3], images=["prior.png"])]
    return write_jsonl(folder / "preferences.jsonl", rows)


@pytest.fixture(scope="module")
def vl_one(tiny_vl_model, vl_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("vl-one")
    return out, run_apo("--model", tiny_vl_model, "--data", vl_data, "--out", out, "--batch-size", 2, *APO)


def test_apo_lora_starts_at_log_1_plus_k_and_merges_into_the_language_model(tiny_vl_model, vl_one):
    out, proc = vl_one
    assert "apo: 2 steps on 4 preferences" in proc.stdout
    # One model in memory: the reference is the adapted policy before its first update (B = 0).
    rows = metrics(out)
    assert rows[0]["loss"] == pytest.approx(sum(math.log(1 + len(p["rejected"])) for p in PREFERENCES) / 4, abs=1e-6)
    assert rows[0]["rewards/margins"] == pytest.approx(0, abs=1e-6) and rows[1]["loss"] < rows[0]["loss"]
    targets = language_linear_layers(tiny_vl_model)
    assert targets and all(".language_model." in t for t in targets)
    # the vision tower and its merger are not adapted and come out bit for bit
    assert_merged_is_base_plus_adapters(tiny_vl_model, out, targets)


def test_apo_lora_two_processes_match_one(tiny_vl_model, vl_data, vl_one, tmp_path):
    one, _ = vl_one
    out = tmp_path / "two"
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port()))
    proc = run_apo("--model", tiny_vl_model, "--data", vl_data, "--out", out, "--batch-size", 1, *APO,
                   launcher=launcher, extra_env={"ACCELERATE_USE_CPU": "1"})
    assert "(1 x 2 processes x 2 accumulation)" in proc.stdout
    rows_one, rows_two = metrics(one), metrics(out)
    assert len(rows_one) == len(rows_two) == 2
    assert_same_first_step(rows_one[0], rows_two[0])  # same weights, same data: fp32 rounding only
    # APO: 2 steps at a constant lr of 1e-2; each adapter weight ends within Adam's bound of the other run's
    a, b = adapters(one), adapters(out)
    for name in a:
        for x, y in zip(a[name], b[name]):
            torch.testing.assert_close(y, x, rtol=0, atol=adam_divergence_bound(1e-2, 2), msg=name)
