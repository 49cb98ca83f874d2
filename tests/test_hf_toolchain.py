"""The project in the Hugging Face toolchain: TRL's DPOTrainer and apo.py agree on the same data,
metrics and tracker names are TRL's, the model folder holds only the model, TRL's formats are read,
checkpoints export to loadable folders."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from common import trl_format
from common.records import RecordError
from test_apo_stage import PREFERENCES, ROOT, run_apo, write_jsonl
from common.run import run_folder

# One negative each (K = 1): TRL's pairwise rows and apo.py's instances are then the same thing.
PAIRS = [{"id": p["id"], "prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"][:1],
          **({"system": p["system"]} if "system" in p else {})} for p in PREFERENCES]
# The whole data set in one batch of 4, two steps at a constant lr: the second step's loss depends
# on the first update, so it compares the gradients and the optimizer too, not just log 2.
STEPS = ["--batch-size", "4", "--grad-accum", "1", "--max-steps", "2", "--lr", "1e-3", "--schedule", "constant",
         "--warmup", "0", "--max-length", "512", "--mixed-precision", "no"]  # fp32, as TRL runs below


@pytest.fixture(scope="module")
def model(tiny_text_model, tmp_path_factory):
    """The tiny model, its template ending an assistant turn at <|im_end|> with no newline after it.

    TRL trains every token the template writes after the answer, the newline after <|im_end|>
    included; this project (as ms-swift) trains up to the marker, where generation stops. With the
    newline left out, both train exactly the same tokens and must give the same numbers.
    """
    folder = Path(shutil.copytree(tiny_text_model, tmp_path_factory.mktemp("model") / "m"))
    template = folder / "chat_template.jinja"
    text = template.read_text()
    end = "{% endif %}<|im_end|>\n{% endfor %}"
    assert end in text
    template.write_text(text.replace(end, "{% endif %}<|im_end|>{% if message['role'] != 'assistant' %}\n"
                                          "{% endif %}{% endfor %}"))
    return str(folder)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    prefs = write_jsonl(folder / "preferences.jsonl", PAIRS)
    from scripts import export_preferences

    export_preferences.main(["--data", str(prefs), "--format", "trl", "--out", str(folder / "trl.jsonl")])
    return prefs, folder / "trl.jsonl"


@pytest.fixture(scope="module")
def apo_on_trl(model, exported, tmp_path_factory):
    """apo.py --loss dpo-pairs on the TRL-format file, two steps, TensorBoard on, the training data
    evaluated as held-out data after every step."""
    import apo

    out = tmp_path_factory.mktemp("apo") / "apo"
    apo.main([str(a) for a in ("--model", model, "--data", exported[1], "--out", out, "--loss", "dpo-pairs", *STEPS,
                               "--report-to", "tensorboard", "--project", "toolchain", "--run-name", "k1",
                               "--eval-data", exported[1], "--eval-every", "1")])
    return out


def apo_here(capsys, *args, check=True):
    """apo.py in this process (the imports are paid once): (exit status, stdout, stderr)."""
    import apo

    try:
        apo.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    if check and code:
        raise AssertionError(f"apo.py exited {code}\n{out}\n{err}")
    return code, out, err


def metric_lines(out):
    return [json.loads(line) for line in (run_folder(out) / "metrics.jsonl").read_text().splitlines()]


def trl_log(model, data, out):
    """TRL's DPOTrainer on data with apo.py's settings: its log_history, one dict per step."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(output_dir=str(out), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
                       lr_scheduler_type="constant", warmup_steps=0, beta=0.1, max_grad_norm=1.0, weight_decay=0.0,
                       report_to=[], logging_steps=1, use_cpu=True, bf16=False, save_strategy="no", max_length=None,
                       seed=0)  # fp32 as apo.py on CPU (TRL defaults to bf16 autocast)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model), args=config,
                         train_dataset=load_dataset("json", data_files=str(data), split="train"),
                         processing_class=AutoTokenizer.from_pretrained(model))
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def test_trl_dpo_on_the_export_and_apo_on_trl_format_give_the_same_losses(model, exported, apo_on_trl, tmp_path):
    """Both ways: TRL trains on the project's export, apo.py (dpo-pairs, K = 1) on TRL's format.

    Both sum the response log-probs in fp32; they differ only in summation order (chunked output
    projection here, full logits in TRL), about 1e-7 relative on sums of ~100, so 1e-5 on a loss
    of 0.69 and 1e-4 on log-probs of ~100 hold with room; a wrong token, mask or reduction moves
    a log-prob by about log(vocab) = 6 and the second loss by ~1e-4 (as the newline does)."""
    trl = trl_log(model, exported[1], tmp_path / "trl")
    ours = [line for line in metric_lines(apo_on_trl) if "loss" in line]
    assert [r["step"] for r in ours] == [h["step"] for h in trl] == [1, 2]
    for mine, theirs in zip(ours, trl):
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
        for name in ("logps/chosen", "logps/rejected"):
            assert mine[name] == pytest.approx(theirs[name], abs=1e-4), name
        for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert mine[name] == pytest.approx(theirs[name], abs=1e-5), name
        assert mine["rewards/accuracies"] == theirs["rewards/accuracies"]
        assert mine["learning_rate"] == theirs["learning_rate"] == 1e-3
    assert ours[1]["loss"] < ours[0]["loss"] - 0.01  # the second step's loss is not log 2: the update counts


def test_metrics_and_tensorboard_carry_trls_names_unrounded(apo_on_trl):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trl_names = {"loss", "learning_rate", "grad_norm", "epoch", "rewards/chosen", "rewards/rejected",
                 "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"}
    line = json.loads((run_folder(apo_on_trl) / "metrics.jsonl").read_text().splitlines()[0])
    assert trl_names <= set(line)
    events = sorted((run_folder(apo_on_trl) / "logs" / "toolchain").glob("events.out.tfevents.*"))
    assert len(events) == 1
    scalars = EventAccumulator(str(events[0])).Reload().Tags()["scalars"]
    assert {f"train/{name}" for name in trl_names} <= set(scalars)
    assert {f"eval/{name}" for name in trl_names - {"learning_rate", "grad_norm", "epoch"}} <= set(scalars)
    assert not any(tag in trl_names for tag in scalars)  # every one under its prefix


def test_evaluation_during_training_measures_the_held_out_data(apo_on_trl):
    """The held-out data is the training data, in one batch of 4: evaluated after step 1, it gives
    what the training forward of step 2 measures before its update (the same weights, rows and
    reference; only the order of the rows in the batch differs, so fp32 sums agree to ~1e-7)."""
    lines = metric_lines(apo_on_trl)
    assert [(line["step"], "loss" in line) for line in lines] == [(1, True), (1, False), (2, True), (2, False)]
    evaluated, trained = lines[1], lines[2]
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert evaluated[f"eval_{name}"] == pytest.approx(trained[name], abs=1e-6), name
    for name in ("logps/chosen", "logps/rejected"):
        assert evaluated[f"eval_{name}"] == pytest.approx(trained[name], abs=1e-4), name


def test_evaluation_scores_as_training_does_with_length_normalize(model, exported, tmp_path, capsys):
    """--length-normalize: the held-out preferences are scored as the loss scores them (per-token
    averages, not sums), so evaluated after step 1 they give step 2's training figures, as above."""
    out = tmp_path / "apo"
    apo_here(capsys, "--model", model, "--data", exported[1], "--out", out, *STEPS, "--length-normalize",
             "--eval-data", exported[1], "--eval-every", "1")
    evaluated, trained = metric_lines(out)[1:3]
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert evaluated[f"eval_{name}"] == pytest.approx(trained[name], abs=1e-6), name
    assert trained["rewards/margins"] != 0.0  # step 1 moved the policy: the rewards measure something


def test_bootstrap_on_sft_messages_evaluates_the_held_out_loss(tiny_text_model, tmp_path, capsys):
    """bootstrap.py on TRL's SFT messages, the file also its held-out data, one batch of all 4:
    the held-out loss after step 1 is the training loss of step 2 (mean NLL per response token)."""
    rows = [{"messages": ([{"role": "system", "content": p["system"]}] if "system" in p else [])
             + [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["chosen"]}]}
            for p in PAIRS]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    out = tmp_path / "boot"
    import bootstrap

    bootstrap.main(["--model", tiny_text_model, "--data", str(data), "--out", str(out), "--batch-size", "4",
                    "--grad-accum", "1", "--max-steps", "2", "--lr", "1e-3", "--warmup", "0", "--max-length", "256",
                    "--eval-data", str(data), "--eval-every", "1"])
    assert "4 examples from 4 train instances" in capsys.readouterr().out
    lines = metric_lines(out)
    assert [sorted(k for k in line if "loss" in k) for line in lines] == [["loss"], ["eval_loss"]] * 2
    assert lines[1]["eval_loss"] == pytest.approx(lines[2]["loss"], abs=1e-6)
    assert lines[3]["eval_loss"] < lines[1]["eval_loss"]


def test_a_learning_rate_of_5e_7_is_logged_as_5e_7(tiny_text_model, tmp_path, capsys):
    """The default lr of the preference stage: rounding to 6 decimals wrote it as 0.0."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    out = tmp_path / "apo"
    apo_here(capsys, "--model", tiny_text_model, "--data", data, "--out", out, "--batch-size", "4", "--grad-accum", "1",
             "--max-steps", "1", "--lr", "5e-7", "--schedule", "constant", "--warmup", "0", "--max-length", "256",
             "--report-to", "tensorboard")
    assert json.loads((run_folder(out) / "metrics.jsonl").read_text())["learning_rate"] == 5e-7
    events = next((run_folder(out) / "logs" / "apo").glob("events.out.tfevents.*"))
    logged = EventAccumulator(str(events)).Reload().Scalars("train/learning_rate")
    assert [e.value for e in logged] == [pytest.approx(5e-7, rel=1e-7)]  # TensorBoard stores float32


def test_the_model_folder_holds_only_the_model(apo_on_trl, tmp_path):
    """Loaded as vLLM's default loader does (every *.safetensors of a folder without an index is
    weights), the folder gives exactly the model's tensors; its files are exactly those
    save_pretrained writes for the model and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(apo_on_trl)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not (out / "model.safetensors.index.json").exists()
    tensors = {}
    for file in out.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                assert name not in tensors, f"{name} twice"
                tensors[name] = f.get_tensor(name)
    state = model.state_dict()
    assert set(tensors) == set(state) - {"lm_head.weight"}  # tied to the embeddings: saved once
    for name, value in tensors.items():
        assert torch.equal(value, state[name]), name

    model.save_pretrained(tmp_path / "fresh")
    AutoTokenizer.from_pretrained(out).save_pretrained(tmp_path / "fresh")
    (tmp_path / "fresh" / "README.md").write_text("the model card")  # the Hub's card, read by neither
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "fresh").iterdir())
    assert {"metrics.jsonl", "training_summary.json", "checkpoints", "reference_logps.safetensors",
            ".lock"} <= {p.name for p in run_folder(out).iterdir()}


def test_an_old_layout_is_moved_into_the_run_folder(tiny_text_model, tmp_path, capsys):
    """A run written with metrics, summary, checkpoints and cache inside the model folder: the
    rerun moves them beside it, says so, and finds the finished run there (nothing retrained)."""
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    out = tmp_path / "apo"
    args = ("--model", tiny_text_model, "--data", data, "--out", out, "--batch-size", "4", "--grad-accum", "1",
            "--max-steps", "1", "--max-length", "256")
    apo_here(capsys, *args)
    for item in list(run_folder(out).iterdir()):  # back to the old layout, with the old checkpoint state name
        item.rename(out / item.name)
    run_folder(out).rmdir()
    (out / "checkpoints" / "step-1" / "run_state.json").rename(out / "checkpoints" / "step-1" / "trainer_state.json")
    weights = (out / "model.safetensors").stat().st_mtime_ns
    _, stdout, stderr = apo_here(capsys, *args)
    assert f"moved metrics.jsonl, training_summary.json, checkpoints, reference_logps.safetensors to " \
           f"{run_folder(out)}" in stderr
    assert "nothing to do" in stdout and (out / "model.safetensors").stat().st_mtime_ns == weights
    assert not {"metrics.jsonl", "training_summary.json", "checkpoints", ".lock"} & {p.name for p in out.iterdir()}
    _, stdout, _ = apo_here(capsys, *args[:-4], "--max-steps", "2", *args[-2:])  # the old checkpoint resumes
    assert "continuing the run from step 1" in stdout


# ---------------------------------------------------------------------------------------------
# TRL's formats read as records


def test_trl_pairs_sharing_a_prompt_and_chosen_become_one_instance(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "Be careful."}, {"role": "user", "content": "Q1"}],
             "chosen": [{"role": "assistant", "content": "A"}], "rejected": [{"role": "assistant", "content": r}]}
            for r in ("B", "C")]
    rows.append({"prompt": "Q2", "chosen": "D", "rejected": "E"})  # standard form
    path = write_jsonl(tmp_path / "trl.jsonl", rows)
    records = trl_format.read_preferences(path)
    assert [(r["id"], r.get("system"), r["prompt"], r["chosen"], r["rejected"], r["_line"]) for r in records] == [
        ("line-1", "Be careful.", "Q1", "A", ["B", "C"], 1), ("line-3", None, "Q2", "D", ["E"], 3)]

    rows[1]["prompt"] = rows[1]["prompt"] + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]
    write_jsonl(path, rows)
    with pytest.raises(RecordError, match=r"trl.jsonl:2: field 'prompt': must be one user turn"):
        trl_format.read_preferences(path)
    rows[1] = {"prompt": "Q", "chosen": "A", "rejected": [{"role": "user", "content": "B"}]}
    write_jsonl(path, rows)
    with pytest.raises(RecordError, match=r"trl.jsonl:2: field 'rejected': must be a string or a list of one "
                                          r"assistant message"):
        trl_format.read_preferences(path)


def test_trl_preferences_load_from_parquet_as_from_jsonl(tmp_path):
    from datasets import Dataset

    rows = [{"prompt": "Q1", "chosen": "A", "rejected": r} for r in ("B", "C")]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "trl.parquet"))
    records = trl_format.read_preferences(tmp_path / "trl.parquet")
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in records] == [("Q1", "A", ["B", "C"])]


def test_sft_messages_read_as_instances_with_one_trajectory(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                          {"role": "assistant", "content": "A"}]},
            {"messages": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "B"}]}]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    records = trl_format.read_instances(path)
    assert [(r["id"], r.get("system"), r["prompt"], r["trajectories"], r["split"]) for r in records] == [
        ("line-1", "S", "Q", [{"source": "data", "text": "A"}], "train"),
        ("line-2", None, "Q2", [{"source": "data", "text": "B"}], "train")]
    write_jsonl(path, rows + [{"messages": [{"role": "user", "content": "Q3"}]}])
    with pytest.raises(RecordError, match=r"sft.jsonl:3: field 'messages': the last message must be the assistant's"):
        trl_format.read_instances(path)


def test_apo_takes_a_hub_id_as_model(tiny_text_model, tmp_path, capsys):
    """--model as a hub id, resolved offline from a hub cache laid out as huggingface_hub writes it."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny--qwen2" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_text_model, snapshot)
    (cache / "models--tiny--qwen2" / "refs").mkdir()
    (cache / "models--tiny--qwen2" / "refs" / "main").write_text("0" * 40)
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    out = tmp_path / "apo"
    hub = {"HF_HUB_CACHE": str(cache)}
    run_apo("--model", "tiny/qwen2", "--data", data, "--out", out, "--batch-size", "4", "--grad-accum", "1",
            "--max-steps", "1", "--max-length", "256", extra_env=hub)
    summary = json.loads((run_folder(out) / "training_summary.json").read_text())
    assert summary["config"]["model"] == "tiny/qwen2" and summary["config"]["model_fingerprint"] == "hub:tiny/qwen2"

    code, _, err = apo_here(capsys, "--model", "tiny/not-there", "--data", data, "--out", tmp_path / "o", check=False)
    assert code == 2 and "error: tiny/not-there: not a model folder or hub id: cannot read its config" in err


# ---------------------------------------------------------------------------------------------
# Checkpoints export to model folders


def same_tensors(a, b):
    """Every tensor of two model folders' *.safetensors, compared exactly."""
    def read(folder):
        out = {}
        for file in Path(folder).glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as f:
                out.update({name: f.get_tensor(name) for name in f.keys()})
        return out

    ta, tb = read(a), read(b)
    assert ta.keys() == tb.keys()
    return all(torch.equal(ta[name], tb[name]) for name in ta)


def export_checkpoint(capsys, *args):
    """export_checkpoint.py in this process: (exit status, stderr)."""
    from scripts import export_checkpoint as tool

    try:
        tool.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_the_last_checkpoint_exports_to_the_final_model(apo_on_trl, tmp_path, capsys):
    """The final checkpoint holds the weights of the final model: exported, they are the same
    tensors, and the folder loads with from_pretrained and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = run_folder(apo_on_trl) / "checkpoints" / "step-2"
    code, err = export_checkpoint(capsys, "--checkpoint", checkpoint, "--out", tmp_path / "e")
    assert code == 0, err
    assert same_tensors(apo_on_trl, tmp_path / "e")
    AutoModelForCausalLM.from_pretrained(tmp_path / "e")
    assert AutoTokenizer.from_pretrained(tmp_path / "e").chat_template

    code, err = export_checkpoint(capsys, "--checkpoint", checkpoint, "--out", tmp_path / "e")
    assert code == 2 and "exists; choose a new folder" in err
    code, err = export_checkpoint(capsys, "--checkpoint", run_folder(apo_on_trl), "--out", tmp_path / "f")
    assert code == 2 and "not a checkpoint (no run_state.json)" in err


def test_a_lora_checkpoint_exports_merged(tiny_text_model, tmp_path, capsys):
    """A LoRA run's checkpoint holds the adapters alone; exported on the base, merged, it gives the
    final merged model (the same merge of the same fp32 tensors)."""
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    out = tmp_path / "apo"
    apo_here(capsys, "--model", tiny_text_model, "--data", data, "--out", out, "--batch-size", "4", "--grad-accum", "1",
             "--max-steps", "2", "--lr", "1e-2", "--max-length", "256", "--lora-rank", "4")
    code, err = export_checkpoint(capsys, "--checkpoint", run_folder(out) / "checkpoints" / "step-2", "--out",
                                  tmp_path / "e")
    assert code == 0, err
    assert same_tensors(out, tmp_path / "e")
    assert not same_tensors(tiny_text_model, tmp_path / "e")  # the adapters did change the weights


# ---------------------------------------------------------------------------------------------
# --config


def test_a_config_file_sets_flags_and_the_command_line_overrides_it(tmp_path):
    import apo
    import bootstrap

    args = apo.parse_args(["--config", str(ROOT / "configs" / "apo-paper-recipe.yaml"), "--model", "m", "--data", "d",
                           "--out", "o", "--lr", "1e-6"])
    assert (args.lr, args.beta, args.max_length, args.global_batch, args.loss) == (1e-6, 0.1, 4096, 32, "apo")
    args = bootstrap.parse_args(["--config", str(ROOT / "configs" / "bootstrap-paper-recipe.yaml"), "--model", "m",
                                 "--data", "d", "--out", "o"])
    assert (args.lora_rank, args.lora_alpha, args.lr, args.max_length) == (8, 32, 1e-4, 2304)

    config = tmp_path / "run.yaml"
    config.write_text("model: m\ndata: d\nout: o\nshare_prompt: true\nmax-steps: 3\n")
    args = apo.parse_args(["--config", str(config)])
    assert (args.model, args.share_prompt, args.max_steps) == ("m", True, 3)
    config.write_text("model: m\nlearning-rate: 1e-5\n")
    with pytest.raises(SystemExit, match=rf"{config}:2: field 'learning-rate': not a flag of"):
        apo.parse_args(["--config", str(config)])


def test_the_model_card_names_base_data_settings_metrics_and_the_paper(apo_on_trl, exported, model):
    from common.records import file_hash

    card = (Path(apo_on_trl) / "README.md").read_text()
    header = card.split("---")[1]
    assert f'base_model: "{Path(model).resolve()}"' in header and "library_name: transformers" in header
    assert "constraint-aware preference optimisation, APO (apo.py)" in card
    assert f"Training data: sha256 `{file_hash(exported[1])}`" in card
    assert "| loss | dpo-pairs |" in card and "| lr | 0.001 |" in card
    final = metric_lines(apo_on_trl)
    assert f"| loss | {final[2]['loss']:.6g} |" in card and f"| eval_loss | {final[3]['eval_loss']:.6g} |" in card
    assert "eprint    = {2510.04142}" in card


# ---------------------------------------------------------------------------------------------
# Extending a run


def test_a_finished_run_continues_to_more_steps_and_a_checkpoint_starts_a_new_run(tiny_text_model, tmp_path, capsys):
    """1 step, then continued to 2: the weights of a straight 2-step run (constant lr: the curve
    does not depend on the length). Fewer steps are refused. --init-from step-1 into a new folder
    at another lr: its first step sees the weights the continued run's step 2 saw (same margin)."""
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    common = ("--model", tiny_text_model, "--data", data, "--batch-size", "4", "--grad-accum", "1", "--lr", "1e-3",
              "--schedule", "constant", "--warmup", "0", "--max-length", "256")
    straight, grown = tmp_path / "straight", tmp_path / "grown"
    apo_here(capsys, *common, "--out", straight, "--max-steps", "2")
    apo_here(capsys, *common, "--out", grown, "--max-steps", "1")
    _, stdout, _ = apo_here(capsys, *common, "--out", grown, "--max-steps", "2")
    assert "continuing the run from step 1 with max_steps 1 -> 2" in stdout
    assert same_tensors(straight, grown)
    summary = json.loads((run_folder(grown) / "training_summary.json").read_text())
    assert [(p["event"], p["from_step"], p["max_steps"]) for p in summary["provenance"]] == [("continued", 1, [1, 2])]
    assert [line["step"] for line in metric_lines(grown)] == [1, 2]

    code, _, stderr = apo_here(capsys, *common, "--out", grown, "--max-steps", "1", check=False)
    assert code == 2 and "has 2 steps done, more than this run's 1" in stderr
    code, _, stderr = apo_here(capsys, *common[:-6], "--lr", "1e-4", *common[-4:], "--out", grown, "--max-steps", "2",
                               check=False)
    assert code == 2 and "lr: 0.001 -> 0.0001" in stderr
    assert f"--init-from {run_folder(grown) / 'checkpoints' / 'step-2'}" in stderr

    new = tmp_path / "new"
    checkpoint = run_folder(grown) / "checkpoints" / "step-1"
    apo_here(capsys, *common[:-6], "--lr", "1e-4", *common[-4:], "--out", new, "--max-steps", "1",
             "--init-from", checkpoint)
    started = json.loads((run_folder(new) / "training_summary.json").read_text())["config"]["init_from"]
    assert (started["checkpoint"], started["step"], started["lr"]) == (str(checkpoint.resolve()), 1, 1e-3)
    assert metric_lines(new)[0]["rewards/margins"] == pytest.approx(metric_lines(grown)[1]["rewards/margins"], abs=1e-6)
    assert metric_lines(new)[0]["rewards/margins"] != 0
