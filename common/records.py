"""The files between the stages: reading and validating them, and writing them without loss.

Record formats (DESIGN "Files between stages"):

instances / trajectories.jsonl, one object a line:
    id, split ("train" | "val" | "test"; only train is trained on), prompt, system (optional), images (paths relative to the
    file's folder), labels (optional, {finding: class}), trajectories ([{source, text}], the
    instance files given to collect.py may omit it)
preferences.jsonl, one object a train instance:
    id, prompt, system, images, chosen, rejected (list, >= 1), rejected_sources, drift, labels

Every problem is reported as `file:line: field 'x': message` through RecordError, before any model
is loaded, so a bad line never surfaces as a traceback from deep inside torch.
"""

import errno
import hashlib
import importlib
import json
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

SPLITS = ("train", "val", "test")


class RecordError(ValueError):
    """Bad input, with the place it came from."""

    def __init__(self, path, line, field, message):
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: field '{field}': {message}" if field else f"{where}: {message}")


class lazy_import:  # noqa: N801 - used as a module name, as `import` would bind it
    """Stands for the module `name` and imports it at the first attribute read: the stages take
    torch this way so that --help and a wrong flag answer before torch (seconds) is loaded. Only
    the name in the importing file is deferred; sys.modules and other imports are untouched."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        return getattr(importlib.import_module(self._name), attr)


def on_main_process(accelerator, fn, share=False):
    """fn() on the main process only (the one that owns the output files); when it raises
    RecordError, every process ends with exit 2, the main one with the message, so no process is
    left waiting in a collective for one that has gone. Returns fn's result on the main process,
    and with share=True on every process."""
    error, result = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except RecordError as e:
            error = str(e)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [error, result] if share else [error]
        broadcast_object_list(box)
        error, result = box if share else (box[0], result)
    if error is not None:
        if accelerator.is_main_process:
            fail(error)
        raise SystemExit(2)
    return result


def read_jsonl(path):
    """Yield (line number, object) for each non-blank line; bad JSON or bytes name their line."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(path, None, None, "no such file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RecordError(path, lineno, None, f"not UTF-8 ({e.reason} at byte {e.start})") from None
            if not text.strip():
                continue
            non_finite = []
            try:
                obj = json.loads(text, parse_constant=lambda name: non_finite.append(name) or _NonFinite(name))
            except json.JSONDecodeError as e:
                raise RecordError(path, lineno, None, f"malformed JSON ({e.msg}, column {e.colno})") from None
            if non_finite:
                field, name = _first_non_finite(obj)
                raise RecordError(path, lineno, field or None, f"{name} is not valid JSON (NaN and Infinity are not "
                                                               "numbers JSON allows; write a finite number or null)")
            if not isinstance(obj, dict):
                raise RecordError(path, lineno, None, f"expected a JSON object, got {type(obj).__name__}")
            if _ESCAPED_SURROGATE.search(text):  # only an escape can hold one: the bytes were valid UTF-8
                found = _first_lone_surrogate(obj)
                if found:
                    raise RecordError(path, lineno, found[0] or None,
                                      f"holds a lone surrogate '{found[1]}' (half of a UTF-16 pair, not a character; "
                                      "no file, tokenizer or server can take it); fix or remove it")
            yield lineno, obj


class _NonFinite(str):
    """Stands in for a NaN / Infinity while a line is parsed, so the field holding it can be named."""


_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins a valid pair into one character


def _first_lone_surrogate(value, where=""):
    """(field path, the escape as written) of the first string, key or value, holding a lone surrogate."""
    if isinstance(value, str):
        match = _LONE_SURROGATE.search(value)
        return (where, f"\\u{ord(match.group()):04x}") if match else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        path = f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else key
        found = (_first_lone_surrogate(key, path) if isinstance(key, str) else None) or _first_lone_surrogate(item, path)
        if found:
            return found
    return None


def replace_lone_surrogates(text):
    """(text with each lone surrogate replaced by U+FFFD, how many): an answer holding one can be
    written, so it is kept rather than asked again on every run."""
    return _LONE_SURROGATE.subn("\ufffd", text)


def _first_non_finite(value, where=""):
    """(field path such as 'drift[1]' or 'labels.Edema', constant) of the first NaN / Infinity."""
    if isinstance(value, _NonFinite):
        return where, str(value)
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _first_non_finite(item, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else key)
        if found:
            return found
    return None


def _require_str(obj, field, path, lineno, allow_empty=False):
    value = obj.get(field)
    if value is None:
        raise RecordError(path, lineno, field, "missing")
    if not isinstance(value, str):
        raise RecordError(path, lineno, field, f"must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError(path, lineno, field, "empty")
    return value


def _check_images(obj, path, lineno, check_files):
    images = obj.get("images", [])
    if images is None:
        images = []
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise RecordError(path, lineno, "images", "must be a list of paths")
    if check_files:
        for image in images:
            resolved = resolve_image(path, image)
            if not resolved.is_file():
                raise RecordError(path, lineno, "images", f"no such image file: {resolved}")
            if not _looks_like_image(resolved):
                raise RecordError(path, lineno, "images", f"not an image file: {resolved}")
    return images


def _looks_like_image(path):
    """Cheap header check, so a wrong file is caught at load time, not inside a processor."""
    try:
        from PIL import Image
    except ImportError:  # without pillow there is no image stage to protect
        return True
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:
        return False


def resolve_image(jsonl_path, image):
    """Image paths are relative to the folder of the JSONL file that names them."""
    p = Path(image)
    return p if p.is_absolute() else Path(jsonl_path).resolve().parent / p


def check_images_inside(record, jsonl_path):
    """Refuse images that lie outside the folder of the JSONL file naming them: absolute paths,
    `../` paths and symlinks that lead out, as resolved on disk now.

    Stages that send images off the machine (collect.py's API sources) call this unless the user
    passes --allow-outside-images: a stray path must not send a patient's X-ray from a folder the
    user never meant to share. The error names the record's line and the resolved path.
    """
    folder = Path(jsonl_path).resolve().parent
    for image in record.get("images") or []:
        resolved = resolve_image(jsonl_path, image).resolve()
        if not resolved.is_relative_to(folder):
            raise RecordError(jsonl_path, record.get("_line"), "images",
                              f"{image!r} resolves to {resolved}, outside the data file's folder {folder}; images "
                              "are sent to API sources only from inside it (pass --allow-outside-images to send it "
                              "anyway)")


def rebase_images(images, from_jsonl, to_jsonl):
    """Image paths of a record read from one JSONL file, made relative to another file's folder
    (a stage that writes its output elsewhere keeps the images reachable); absolute paths stay."""
    to_dir = Path(to_jsonl).resolve().parent
    return [p if Path(p).is_absolute() else os.path.relpath(resolve_image(from_jsonl, p), to_dir) for p in images]


def _validate_common(obj, path, lineno, check_images):
    rec_id = obj.get("id")
    if rec_id is None:
        raise RecordError(path, lineno, "id", "missing")
    if isinstance(rec_id, int) and not isinstance(rec_id, bool):
        obj["id"] = rec_id = str(rec_id)  # numeric ids from other tools are harmless
    if not isinstance(rec_id, str) or not rec_id:
        raise RecordError(path, lineno, "id", "must be a non-empty string")
    _require_str(obj, "prompt", path, lineno)
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise RecordError(path, lineno, "system", "must be a string")
    obj["images"] = _check_images(obj, path, lineno, check_images)
    check_labels(obj, path, lineno)


def check_labels(obj, path, lineno):
    """Labels must read as answers (known finding names, valid classes): every stage that scores
    them would otherwise fail after its work is done and its output written."""
    labels = obj.get("labels")
    if labels is None:
        return
    if not isinstance(labels, dict):
        raise RecordError(path, lineno, "labels", "must be an object {finding: class}")
    from common import answers

    try:
        answers.normalize(labels)
    except ValueError as e:
        raise RecordError(path, lineno, "labels", str(e)) from None


def _check_unique(seen, obj, path, lineno):
    if obj["id"] in seen:
        raise RecordError(path, lineno, "id", f"duplicate id {obj['id']!r} (first on line {seen[obj['id']]})")
    seen[obj["id"]] = lineno


def check_instance(obj, path, lineno, check_images=True):
    """One instance checked as load_instances checks each line (id, prompt, system, images, labels,
    split; split defaults to train), for records built from other formats (collect.py's importers)."""
    _validate_common(obj, path, lineno, check_images)
    split = obj.setdefault("split", "train")
    if split not in SPLITS:
        raise RecordError(path, lineno, "split", f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")


def load_instances(path, require_trajectories=False, check_images=True):
    """Instances or trajectories.jsonl, validated whole before anything else runs."""
    def check(obj, lineno):
        check_instance(obj, path, lineno, check_images)
        trajectories = obj.get("trajectories")
        if trajectories is None and require_trajectories:
            raise RecordError(path, lineno, "trajectories", "missing")
        if trajectories is not None:
            _check_trajectories(trajectories, path, lineno)

    return _validated_records(path, check)


def _check_trajectories(trajectories, path, lineno):
    if not isinstance(trajectories, list):
        raise RecordError(path, lineno, "trajectories", "must be a list of {source, text}")
    first = {}  # source -> index of its trajectory
    for i, t in enumerate(trajectories):
        if not isinstance(t, dict) or not isinstance(t.get("source"), str) or not isinstance(t.get("text"), str):
            raise RecordError(path, lineno, f"trajectories[{i}]", "must be {\"source\": str, \"text\": str}")
        if t["source"] in first:  # a second answer from one source would count twice in the vote
            raise RecordError(path, lineno, f"trajectories[{i}].source",
                              f"duplicate source {t['source']!r} (also trajectories[{first[t['source']]}]); "
                              "each source answers an instance once")
        first[t["source"]] = i


def load_preferences(path, check_images=True):
    """preferences.jsonl for apo.py: every record has a chosen and at least one rejected."""
    def check(obj, lineno):
        _validate_common(obj, path, lineno, check_images)
        _require_str(obj, "chosen", path, lineno)
        rejected = obj.get("rejected")
        if rejected is None:
            raise RecordError(path, lineno, "rejected", "missing")
        if not isinstance(rejected, list) or not all(isinstance(r, str) for r in rejected):
            raise RecordError(path, lineno, "rejected", "must be a list of strings")
        if not rejected:
            raise RecordError(path, lineno, "rejected", "no negatives (a preference needs at least one)")
        for field in ("rejected_sources", "drift"):
            value = obj.get(field)
            if value is not None and (not isinstance(value, list) or len(value) != len(rejected)):
                raise RecordError(path, lineno, field, f"must be a list as long as 'rejected' ({len(rejected)})")
        _check_negatives(obj, path, lineno)

    return _validated_records(path, check)


def _validated_records(path, check):
    """Every line of the file passed through check(obj, lineno), ids unique, each record marked
    with its line number (_line) for later messages; an empty file is refused."""
    records, seen = [], {}
    for lineno, obj in read_jsonl(path):
        check(obj, lineno)
        _check_unique(seen, obj, path, lineno)
        obj["_line"] = lineno
        records.append(obj)
    if not records:
        raise RecordError(path, None, None, "no records")
    return records


def _check_negatives(obj, path, lineno):
    """Each negative is a text other than the chosen one (rejecting the chosen would push the
    objective both ways), named by a string, with a drift in [0, 1] (DESIGN)."""
    chosen = obj["chosen"].strip()
    for i, text in enumerate(obj["rejected"]):
        if not text.strip():
            raise RecordError(path, lineno, f"rejected[{i}]", "empty (a negative must be an answer)")
        if text.strip() == chosen:
            raise RecordError(path, lineno, f"rejected[{i}]", "is the chosen text itself; a preference cannot "
                                                              "reject its own positive")
    for i, name in enumerate(obj.get("rejected_sources") or []):
        if not isinstance(name, str):
            raise RecordError(path, lineno, f"rejected_sources[{i}]", f"must be a source name (a string), got "
                                                                      f"{type(name).__name__}")
    for i, drift in enumerate(obj.get("drift") or []):
        if isinstance(drift, bool) or not isinstance(drift, (int, float)) or not 0 <= drift <= 1:
            raise RecordError(path, lineno, f"drift[{i}]", f"must be a number in [0, 1], got {drift!r}")


def public(record):
    """The record as written to disk: bookkeeping keys (leading underscore) stripped."""
    return {k: v for k, v in record.items() if not k.startswith("_")}


class JsonlAppender:
    """Append one JSON line at a time so that a crash loses at most the line being written.

    On open, a torn last line (a kill mid-write) is cut off, so the next stage never reads half a
    record and a resumed run simply writes that record again.
    """

    def __init__(self, path, fsync=False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        repair_torn_tail(self.path)
        self.file = open(self.path, "a", encoding="utf-8")

    def write(self, obj):
        line = json.dumps(obj, ensure_ascii=False) + "\n"
        end = self.file.tell()
        try:
            self.file.write(line)
            self.file.flush()
            if self.fsync:
                os.fsync(self.file.fileno())
        except OSError as e:
            if not is_disk_full(e):
                raise
            self._cut_back(end)  # no half line left behind: the file ends after its last whole record
            raise DiskFull(self.path, "the lines before this one are kept, and the same command resumes after "
                                      "them") from None

    def _cut_back(self, end):
        try:
            self.file.close()  # drops what is still buffered (the close's own flush fails too)
        except OSError:
            pass
        with open(self.path, "r+b") as f:
            f.truncate(end)
        self.file = open(self.path, "a", encoding="utf-8")

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def repair_torn_tail(path):
    """Truncate a file after its last complete line; return the complete records it holds."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    out = []
    for raw in data[:end].splitlines():
        if raw.strip():
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError:
                raise RecordError(path, None, None, "output file is corrupt; move it away to start over") from None
    return out


def write_json_atomic(path, obj):
    """Write, fsync, then rename: a reader sees the old file or the new one, never a half."""
    _write_atomic(path, [json.dumps(obj, indent=2, ensure_ascii=False) + "\n"])


def write_text_atomic(path, text):
    _write_atomic(path, [text])


def write_jsonl_atomic(path, rows):
    _write_atomic(path, (json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _write_atomic(path, chunks):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with disk_full_reported(path, leftovers=[tmp]):
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(chunks)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# A full disk


class DiskFull(RecordError):
    """The disk filled while an output was written: what was half-written is removed, the message
    names the path and says that the same command resumes once there is space."""

    def __init__(self, path, resumes="the same command resumes from what was completely written"):
        super().__init__(path, None, None, f"the disk is full (No space left on device) while writing this; nothing "
                                           f"half-written was kept. Free some space and run again: {resumes}")


def is_disk_full(error):
    """ENOSPC / EDQUOT, also when torch or safetensors wrap it in their own error: torch.save's
    zip writer says only 'unexpected pos' when a write came up short."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if "No space left on device" in text or "StorageFull" in text or (
                isinstance(error, RuntimeError) and "unexpected pos" in text):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextmanager
def disk_full_reported(path, leftovers=(), resumes=None):
    """Turn a full disk inside the block into DiskFull(path), after removing leftovers (the
    temporary files or folders the block was writing), so a rerun finds no stray half output."""
    try:
        yield
    except Exception as e:
        if not is_disk_full(e):  # a DiskFull from a writer inside is renamed for the whole output
            raise
        for item in map(Path, leftovers):
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)
        raise (DiskFull(path, resumes) if resumes else DiskFull(path)) from None


def content_key(record, images=None):
    """What an instance asks (prompt, system, image paths): a stored answer to an instance whose
    key has changed since is never reused, even under the same id."""
    images = record.get("images") or [] if images is None else images
    asked = json.dumps([record["prompt"], record.get("system"), images], ensure_ascii=False)
    return hashlib.sha256(asked.encode()).hexdigest()[:16]


def file_hash(*paths):
    """sha256 over files' bytes: the key that tells a cache whether its inputs changed."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Outputs: one writer at a time, never over an input, and tied to what decided them


class OutputLock:
    """An exclusive lock on a stage's output, held until the process ends: two runs on one --out
    would interleave their lines and each take the other's for its own.

    The lock is a separate file (<out>.lock, or <out>/.lock for a folder), because outputs are
    replaced by rename and a lock on a replaced file protects nothing. It is left in place: removing
    it would race with a run that is just opening it. filelock takes it (flock on POSIX, msvcrt on
    Windows), so it holds on every platform.
    """

    def __init__(self, out, stage, folder=False):
        from filelock import FileLock, Timeout

        out = Path(out) if folder else output_file(out)
        self.path = out / ".lock" if folder else out.with_name(out.name + ".lock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            open(self.path, "a", encoding="utf-8").close()
        except OSError as e:  # checked before any model work: a read-only folder fails here, not at the end
            raise RecordError(out, None, None, f"cannot write the output here ({e.strerror or e})") from None
        # thread_local=False: the lock is the process's, whichever thread releases it
        self.lock = FileLock(self.path, timeout=0, thread_local=False, preserve_lock_file=True)
        try:
            self.lock.acquire()
        except Timeout:
            raise RecordError(out, None, None, f"another {stage} is writing this output (lock {self.path}); "
                                               "wait for it to finish or use another --out") from None
        _HELD_LOCKS.append(self)  # held until the process ends, whether or not the caller keeps it

    def release(self):
        if self in _HELD_LOCKS:
            _HELD_LOCKS.remove(self)
        self.lock.release(force=True)


_HELD_LOCKS = []


def release_locks():
    """Release every OutputLock this process holds: a stage's main() called again in the same
    process (tests, notebooks) must be able to lock the same output again."""
    for held in list(_HELD_LOCKS):
        held.release()


def check_output_paths(files=(), folders=(), inputs=None, model_dirs=None):
    """Refuse, before anything is loaded, outputs that would overwrite an input or write into a
    model folder the stage reads. files / folders: the paths the stage writes; inputs: {flag: file};
    model_dirs: {flag: model folder}. A file output may not be an input nor lie directly in a model
    folder (its top-level files are what from_pretrained and model_fingerprint read); a folder
    output may not be a model folder."""
    def same(a, b):
        try:
            return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
        except OSError:
            return False

    models = [(flag, Path(folder)) for flag, folder in (model_dirs or {}).items()
              if folder is not None and Path(folder).is_dir()]
    for out in map(Path, filter(None, folders)):
        if is_root(out):
            raise RecordError(out, None, None, "is the root of the file system; choose an output folder of its own")
        for flag, folder in models:
            if same(out, folder):
                raise RecordError(out, None, None, f"is the model folder {flag} {folder}, which this stage reads; "
                                                   "choose another output folder")
            if out.resolve().is_relative_to(folder.resolve()):
                raise RecordError(out, None, None, f"lies inside the model folder {flag} {folder}, which this stage "
                                                   "reads; choose an output folder outside it")
    for out in map(Path, filter(None, files)):
        output_file(out)
        for flag, path in (inputs or {}).items():
            if path is not None and same(out, Path(path)):
                raise RecordError(out, None, None, f"is also the input {flag} {path}: a stage never writes over "
                                                   "its input; choose another output path")
        for flag, folder in models:
            if same(out.parent, folder):
                raise RecordError(out, None, None, f"lies in the model folder {flag} {folder}, which this stage "
                                                   "reads; choose an output outside it")


def is_root(path):
    resolved = Path(path).resolve()
    return resolved == resolved.parent


def check_writable(path, flag):
    """Refuse now, not after minutes of work, an output file whose folder cannot be made or written."""
    folder = Path(path).resolve().parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"{flag}: cannot create {folder}: {e.strerror}")
    if not os.access(folder, os.W_OK):
        fail(f"{flag}: {folder} is not writable")


def output_file(out):
    """--out of a stage that writes a file, as a Path: refused when it names a folder with no file
    name (`/`, `.`), since the stage's companion files (<out>.lock, <out>.run.json) hang off that name."""
    out = Path(out)
    if not out.name or out.name in (".", "..") or is_root(out):
        raise RecordError(out, None, None, "names a folder, not a file; the output is a file (e.g. out.jsonl)")
    return out


def settings_mismatch(saved, now):
    """'key: saved -> now' for each setting that differs, or '' when they agree."""
    keys = sorted(set(saved) | set(now))
    return "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k))


def manifest_path(out):
    """Where a file output's run manifest lives: next to it, <out>.run.json."""
    out = output_file(out)
    return out.with_name(out.name + ".run.json")


def tie_to_run(out, manifest, entries, stage, advice, used=None):
    """Tie an output to what decides it, before any work: manifest is a JSON file {name: settings}
    (one entry per run, source or model the output holds); an entry already there with other
    settings is refused, naming every setting that changed, so a resume never mixes old lines with
    new ones. used: the names the output still holds lines of (others are simply replaced); None:
    all. An output that exists without its manifest is not this stage's and is refused too.
    Returns the merged manifest to write with write_json_atomic once the run may go ahead."""
    out, manifest = Path(out), Path(manifest)
    if out.is_dir():
        raise RecordError(out, None, None, "is a folder; the output is a file (e.g. out.jsonl)")
    if not manifest.is_file():
        if out.is_file() and out.stat().st_size:
            raise RecordError(out, None, None, f"exists and was not written by {stage} (no {manifest.name} beside "
                                               "it); move it away or choose another --out")
        return dict(entries)
    try:
        saved = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError(manifest, None, None, f"unreadable run manifest ({e}); move the output away to start over") from None
    for name, settings in entries.items():
        if name in saved and (used is None or name in used):
            diff = settings_mismatch(saved[name], settings)
            if diff:
                what = "" if name == "run" else f" for {name!r}"
                raise RecordError(out, None, None, f"was written with other settings{what} ({diff}); {advice}")
    return {**saved, **entries}


def fail(message):
    """End a script on bad input: the message, no traceback, exit status 2."""
    import sys

    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
