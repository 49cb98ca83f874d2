"""bootstrap.py and apo.py under FSDP2 on 2 CPU processes (gloo), as `accelerate launch --config_file
configs/fsdp_8gpu.yaml` runs them on GPUs, and the launch faults of RELIABILITY.md.

The runs go through the real config and launch_for_tests.py, a test-only shim: accelerate 1.15 keeps
CPU processes plain DDP under an FSDP config (see its docstring). Each 2-process run costs ~20 s,
so the runs are chosen to cover the faults, not every combination: bootstrap on the text model in
fp32 (equal to one process, tied embeddings under cpu_ram_efficient_loading, a slow rank during
checkpoints, sharded resume); apo on the VLM with --freeze-vision and gradient checkpointing in fp32
(equal to one process) and in bf16 (fp32 log-probs).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import apo
import tiny_models
from common.reference import REFERENCE_FILE
from common.run import run_folder
from test_apo_stage import PREFERENCES, adam_divergence_bound, assert_same_first_step, write_jsonl
from test_bootstrap import write_data

REPO = Path(__file__).resolve().parent.parent
FSDP = "configs/fsdp_8gpu.yaml"
BOOTSTRAP = ["--grad-accum", "2", "--lr", "1e-3", "--max-length", "160", "--warmup", "0.34", "--max-steps", "6",
             "--save-every", "3"]
APO = ["--grad-accum", "1", "--max-steps", "2", "--lr", "1e-3", "--max-length", "512", "--max-negatives", "2",
       "--freeze-vision", "--gradient-checkpointing"]


def env(**extra):
    e = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    for name in ("ACCELERATE_USE_CPU", "WORLD_SIZE", "RANK", "LOCAL_RANK", "APO_TEST_SLOW_SAVE_RANK"):
        e.pop(name, None)
    return dict(e, **extra)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, check=True, **extra_env):
    result = subprocess.run(cmd, cwd=REPO, env=env(**extra_env), capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def one_process(script, *args):
    return run([sys.executable, script, *map(str, args)])


def two_processes(script, *args, config=FSDP, mixed_precision="no", **extra_env):
    """The stage on 2 gloo processes under an accelerate config, through the test-only shim."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "2",
              "--mixed_precision", mixed_precision, "--main_process_port", str(free_port()),
              "tests/launch_for_tests.py", script, *map(str, args)]
    return run(launch, ACCELERATE_USE_CPU="1", **extra_env)


def metrics(out):
    return [json.loads(line) for line in (run_folder(out) / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    return [row["loss"] for row in metrics(out)]


def assert_same_weights(a, b, atol):
    wa, wb = load_file(str(Path(a) / "model.safetensors")), load_file(str(Path(b) / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=atol, msg=name)


def assert_two_processes_equal_one(one, two, lr, steps, keys):
    """Step 1 to fp32 rounding; the weights within what AdamW can do with rounding differences (see
    test_apo_stage.adam_divergence_bound): a tighter bound after step 1 would hold on one CPU only."""
    rows_one, rows_two = metrics(one), metrics(two)
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one] == list(range(1, steps + 1))
    assert_same_first_step(rows_one[0], rows_two[0], keys)
    assert_same_weights(one, two, atol=adam_divergence_bound(lr, steps))


def test_fsdp2_bootstrap_equals_one_process_keeps_ties_survives_a_slow_rank_and_resumes(tmp_path, tiny_text_model):
    from transformers import AutoModelForCausalLM

    data = write_data(tmp_path, long_prompt=True, long_response=True)
    one, two = tmp_path / "one", tmp_path / "fsdp"
    one_process("bootstrap.py", "--model", tiny_text_model, "--data", data, "--out", one, "--batch-size", 2,
                *BOOTSTRAP)
    # Rank 1 writes its share of each checkpoint 3 s after rank 0: the rename must wait for it.
    result = two_processes("bootstrap.py", "--model", tiny_text_model, "--data", data, "--out", two,
                           "--batch-size", 1, *BOOTSTRAP, APO_TEST_SLOW_SAVE_RANK="1:3")
    assert "(1 x 2 processes x 2 accumulation)" in result.stdout
    assert (run_folder(two) / "checkpoints" / "step-3" / "pytorch_model_fsdp_0").is_dir()  # sharded: FSDP really ran
    assert {p.name for p in (run_folder(two) / "checkpoints" / "step-6").glob("random_states_*.pkl")} == {
        "random_states_0.pkl", "random_states_1.pkl"}

    # Same keys as the one-process folder: lm_head.weight is tied to the embeddings, not a copy of
    # its own (cpu_ram_efficient_loading in the config moves the model to meta and back).
    assert_two_processes_equal_one(one, two, lr=1e-3, steps=6, keys=("loss", "grad_norm"))
    model = AutoModelForCausalLM.from_pretrained(two)
    assert model.lm_head.weight is model.model.embed_tokens.weight

    # Sharded resume: back to the state of a run killed after its step-3 checkpoint.
    final, before = load_file(str(two / "model.safetensors")), losses(two)
    shutil.rmtree(run_folder(two) / "checkpoints" / "step-6")
    (two / "model.safetensors").unlink()
    (run_folder(two) / "training_summary.json").unlink()
    resumed = two_processes("bootstrap.py", "--model", tiny_text_model, "--data", data, "--out", two,
                            "--batch-size", 1, *BOOTSTRAP)
    assert "resuming from step 3" in resumed.stdout
    assert losses(two) == pytest.approx(before, rel=1e-6, abs=1e-6)  # the same 2-process run, as logged
    again = load_file(str(two / "model.safetensors"))
    for name in final:
        torch.testing.assert_close(again[name], final[name], rtol=0, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def vl_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vl")
    tiny_models.write_test_image(folder / "cxr.png", seed=1)
    tiny_models.write_test_image(folder / "prior.png", seed=2)
    # Every row has an image: under FSDP each process must run the (sharded) vision tower.
    images = [["cxr.png"], ["cxr.png", "prior.png"], ["prior.png"], ["cxr.png"]]
    return write_jsonl(folder / "preferences.jsonl", [dict(p, images=i) for p, i in zip(PREFERENCES, images)])


@pytest.fixture(scope="module")
def vl_one(tiny_vl_model, vl_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("vl_one")
    one_process("apo.py", "--model", tiny_vl_model, "--data", vl_data, "--out", out, "--batch-size", 2, *APO)
    return out


def test_fsdp2_apo_vlm_frozen_tower_and_checkpointing_equals_one_process(tiny_vl_model, vl_data, vl_one, tmp_path):
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "fsdp"
    two_processes("apo.py", "--model", tiny_vl_model, "--data", vl_data, "--out", out, "--batch-size", 1, *APO)
    ref1, ref2 = load_file(str(run_folder(vl_one) / REFERENCE_FILE)), load_file(str(run_folder(out) / REFERENCE_FILE))
    torch.testing.assert_close(ref2["chosen"], ref1["chosen"], rtol=1e-5, atol=1e-4)
    assert_two_processes_equal_one(vl_one, out, lr=1e-3, steps=2, keys=("loss", "rewards/margins", "grad_norm"))
    initial = AutoModelForImageTextToText.from_pretrained(tiny_vl_model)
    trained = AutoModelForImageTextToText.from_pretrained(out)
    tower = dict(initial.model.visual.named_parameters())
    assert all(torch.equal(p, tower[n]) for n, p in trained.model.visual.named_parameters())  # frozen


def test_fsdp2_bf16_log_probs_and_rewards_stay_fp32(tiny_vl_model, vl_data, vl_one, tmp_path):
    out = tmp_path / "bf16"
    two_processes("apo.py", "--model", tiny_vl_model, "--data", vl_data, "--out", out, "--batch-size", 1,
                  *APO[:-2], "--max-steps", "1", "--grad-accum", "2", mixed_precision="bf16")
    reference, exact = load_file(str(run_folder(out) / REFERENCE_FILE)), load_file(str(run_folder(vl_one) / REFERENCE_FILE))
    chosen = reference["chosen"]
    assert chosen.dtype == torch.float32
    # Summed log-probs cast to bf16 by the root module would sit on bf16's grid (-150.0 for -149.71).
    assert not torch.equal(chosen, chosen.bfloat16().float()), chosen
    torch.testing.assert_close(chosen, exact["chosen"], rtol=0.02, atol=0.5)
    # Step 1: the policy is the reference, so every reward is exactly 0 and P = 1 / (1 + K).
    first = json.loads((run_folder(out) / "metrics.jsonl").read_text().splitlines()[0])
    assert first["rewards/chosen"] == 0 and first["rewards/margins"] == 0
    k = [min(2, len(p["rejected"])) for p in PREFERENCES]
    assert first["loss"] == pytest.approx(sum(torch.log(torch.tensor(1.0 + n)).item() for n in k) / 4, abs=1e-6)


def test_a_world_size_accelerate_did_not_join_is_refused(tmp_path, tiny_text_model):
    """A multi-GPU launch on a machine without GPUs: accelerate makes each process a 1-process run."""
    data = write_data(tmp_path, n_train=2)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), "bootstrap.py", "--model", tiny_text_model,
              "--data", str(data), "--out", str(tmp_path / "out")]
    result = run(launch, check=False)
    assert result.returncode != 0
    assert "the launcher started 2 processes (WORLD_SIZE) but accelerate runs this one as 1 of 1" in result.stderr
    assert not (tmp_path / "out.run" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------
# DeepSpeed settings (ZeRO-3 itself is not run here: deepspeed JIT-compiles a C++ op on first use)


def test_auto_accumulation_in_a_config_takes_the_runs_own(tmp_path, monkeypatch):
    import bootstrap
    from common import training

    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "auto")  # what `accelerate launch` sets for 'auto'
    args = bootstrap.parse_args(["--model", "m", "--data", "d", "--out", str(tmp_path), "--global-batch", "8",
                                 "--batch-size", "2"])
    accelerator = training.build_accelerator(args, tmp_path)
    assert args.grad_accum == 4 and accelerator.gradient_accumulation_steps == 4


def test_deepspeed_settings_come_from_the_run_and_a_fixed_clipping_must_match(capsys):
    import argparse

    from common import training

    args = argparse.Namespace(batch_size=2, grad_accum=4, max_grad_norm=0.5)
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto", "zero_optimization": {"stage": 3}}
    training.configure_deepspeed(config, args, num_processes=8)
    assert (config["train_micro_batch_size_per_gpu"], config["train_batch_size"], config["gradient_clipping"]) == (
        2, 64, 0.5)
    with pytest.raises(SystemExit) as exit_:
        training.configure_deepspeed({"gradient_clipping": 1.0}, args, num_processes=8)
    assert exit_.value.code == 2 and "clips gradients at 1.0, but this run asks --max-grad-norm 0.5" in capsys.readouterr().err


def test_weight_decay_groups_use_the_real_shape_of_zero3_shards():
    from common import training

    model = torch.nn.Linear(4, 3)
    # ZeRO-3 init replaces every parameter by a 1-D shard and keeps its shape in ds_shape.
    for p in model.parameters():
        p.ds_shape = p.shape
        p.data = p.data.flatten()
    optimizer = training.build_optimizer(model, lr=1e-3, weight_decay=0.1)
    assert [(len(g["params"]), g["weight_decay"]) for g in optimizer.param_groups] == [(1, 0.1), (1, 0.0)]
    frozen_bias = torch.nn.Linear(4, 3)
    frozen_bias.bias.requires_grad_(False)
    # Never an empty group: DeepSpeed drops it and the scheduler then has one learning rate too many.
    assert len(training.build_optimizer(frozen_bias, lr=1e-3, weight_decay=0.1).param_groups) == 1
