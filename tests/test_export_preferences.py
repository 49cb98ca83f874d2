"""export_preferences.py read back: the ms-swift DPO export re-imports (collect.py --import-swift) to
the same instances, the TRL export holds exactly the prompt and response texts apo.py trains on, and
ms-swift 3.12's rejected_response as a list of assistant messages imports."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.preferences import select_negatives
from scripts import export_preferences
from common import modeling
from common import sources
import tiny_models
from common.records import RecordError, load_preferences, public
from test_apo_stage import PREFERENCES, write_jsonl

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def data(tmp_path):
    (tmp_path / "img").mkdir()
    tiny_models.write_test_image(tmp_path / "img" / "cxr.png")
    rows = [dict(PREFERENCES[0], images=["img/cxr.png"], labels={"Cardiomegaly": 1}), *PREFERENCES[1:]]
    return write_jsonl(tmp_path / "preferences.jsonl", rows)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_swift_export_reimports_to_the_same_instances(data, tmp_path):
    out = tmp_path / "export" / "dpo.jsonl"
    result = subprocess.run([sys.executable, "-m", "scripts.export_preferences", "--data", str(data), "--format", "swift",
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    pairs = sum(len(p["rejected"]) for p in PREFERENCES)
    assert f"4 instances -> {pairs} swift pairs" in result.stdout
    rows = read_jsonl(out)
    assert len(rows) == pairs
    first = rows[0]
    # The official scripts' layout: one <image> tag per image, the consensus as the assistant turn.
    assert first["messages"][-2:] == [{"role": "user", "content": "<image>" + PREFERENCES[0]["prompt"]},
                                      {"role": "assistant", "content": PREFERENCES[0]["chosen"]}]
    assert first["images"] == [str((tmp_path / "img" / "cxr.png").resolve())]
    assert first["rejected_response"] == PREFERENCES[0]["rejected"][0]

    back = {r["id"]: public(r) for r in sources.import_swift(out)}
    for p in load_preferences(data):
        # The negatives in apo.py's order (highest drift first), after the consensus; unnamed ones
        # get the importer's numbered default name.
        order = select_negatives(p, None, data)
        names = ([p["rejected_sources"][i] for i in order] if p.get("rejected_sources") else
                 ["swift-rejected"] + [f"swift-rejected-{k}" for k in range(2, len(order) + 1)])
        expected = {"id": p["id"], "split": "train", "prompt": p["prompt"],
                    "images": [str(modeling.resolve_image(data, i).resolve()) for i in p.get("images", [])],
                    "trajectories": [{"source": "consensus", "text": p["chosen"]}]
                                    + [{"source": n, "text": p["rejected"][i]} for n, i in zip(names, order)]}
        if p.get("system"):
            expected["system"] = p["system"]
        assert back[p["id"]] == expected


def test_trl_export_holds_what_apo_trains_on(data, tmp_path, tiny_text_model):
    out = tmp_path / "trl.jsonl"
    export_preferences.main(["--data", str(data), "--format", "trl", "--out", str(out), "--max-negatives", "2"])
    try:
        import datasets
        rows = list(datasets.load_dataset("json", data_files=str(out), split="train"))
    except ImportError:  # datasets is not a dependency; the file is plain JSONL
        rows = read_jsonl(out)
    prefs = load_preferences(data)
    assert len(rows) == sum(min(2, len(p["rejected"])) for p in prefs)
    processor = modeling.load_processor(tiny_text_model)
    tokenizer = modeling.tokenizer_of(processor)
    at = 0
    for p in prefs:
        for i in select_negatives(p, 2, data):
            row = rows[at]
            at += 1
            assert row["chosen"] == [{"role": "assistant", "content": p["chosen"]}]
            assert row["rejected"] == [{"role": "assistant", "content": p["rejected"][i]}]
            assert row["images"] == [str(modeling.resolve_image(data, x).resolve()) for x in p.get("images", [])]
            if p.get("images"):
                continue  # the text model's template below reads string contents only
            # The prompt text TRL renders is apo.py's prompt, token for token.
            prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
            assert prompt == modeling.prompt_text(processor, p)
            # TRL scores the template's continuation: apo.py's response (text + end of turn) plus the
            # template's newline after it, which apo.py does not score (README).
            full = tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
            assert full[len(prompt):] == p["chosen"] + modeling.turn_end(processor) + "\n"
    assert at == len(rows)


def test_import_swift_takes_rejected_response_as_assistant_messages(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Good."}],
             "rejected_response": [{"role": "assistant", "content": "Bad."},
                                   {"role": "assistant", "content": [{"type": "text", "text": "Worse."}]}]}]
    [instance] = sources.import_swift(write_jsonl(tmp_path / "new.jsonl", rows))
    assert [t["text"] for t in instance["trajectories"]] == ["Good.", "Bad.", "Worse."]

    rows[0]["rejected_response"] = ["Bad.", {"role": "user", "content": "x"}]
    with pytest.raises(RecordError) as e:
        sources.import_swift(write_jsonl(tmp_path / "bad.jsonl", rows))
    assert str(e.value).startswith(f"{tmp_path / 'bad.jsonl'}:1: field 'rejected_response[1]': must be a string or "
                                   f"an assistant message")


def run_export(*args):
    return subprocess.run([sys.executable, "-m", "scripts.export_preferences", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_the_export_never_writes_over_its_input_a_model_or_another_export_in_progress(data, tmp_path):
    """The export used to replace whatever --out named and exit 0: the consensus file itself, or a
    model's weights. It now has every stage's output contract."""
    before = data.read_bytes()
    result = run_export("--data", data, "--format", "swift", "--out", data)
    assert result.returncode == 2 and "is also the input --data" in result.stderr, result.stderr
    assert data.read_bytes() == before and not Path(f"{data}.lock").exists()

    model = tmp_path / "model"  # a model folder as from_pretrained reads it (the export never loads one)
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "qwen2"}')
    (model / "model.safetensors").write_bytes(b"weights")
    for out in (model / "model.safetensors", model / "dpo.jsonl"):
        result = run_export("--data", data, "--format", "trl", "--out", out)
        assert result.returncode == 2 and "lies in the model folder" in result.stderr, result.stderr
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]
    assert (model / "model.safetensors").read_bytes() == b"weights"

    other = tmp_path / "notes.jsonl"  # a file no export wrote (no notes.jsonl.run.json beside it)
    other.write_text('{"mine": 1}\n')
    result = run_export("--data", data, "--format", "swift", "--out", other)
    assert result.returncode == 2 and "exists and was not written by export_preferences.py" in result.stderr
    assert other.read_text() == '{"mine": 1}\n'

    result = run_export("--data", data, "--format", "swift", "--out", "/")
    assert result.returncode == 2 and "names a folder, not a file" in result.stderr and "Traceback" not in result.stderr

    out = tmp_path / "dpo.jsonl"
    assert run_export("--data", data, "--format", "swift", "--out", out).returncode == 0
    swift = out.read_bytes()
    assert run_export("--data", data, "--format", "trl", "--out", out).returncode == 0  # its own export: replaced
    assert out.read_bytes() != swift and not Path(f"{out}.tmp").exists()

    # A second export while the first holds the lock (held here by a real process) is refused.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from common import records; records.OutputLock(sys.argv[1], "
                               "'export_preferences.py'); print('locked', flush=True); time.sleep(60)", str(out)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = run_export("--data", data, "--format", "trl", "--out", out)
        assert result.returncode == 2 and "another export_preferences.py is writing this output" in result.stderr
    finally:
        holder.kill()
        holder.wait()
