"""The outputs of the journaled stages (collect, consensus, evaluate): one writer at a time, tied
to what decides them, appended one finished record at a time, resumed by skipping what is there.
A stage gets them from its Run (common/run.py), which closes the journals and releases the lock
when the run ends:

    output = run.output(out)                           # the lock: a second writer is refused
    output.tie({"run": settings}, advice)              # <out>.run.json: other settings are refused
    lines = run.journal(out).open()                    # a torn last line (a kill mid-write) is cut
    lines.append(record)                               # one line per finished record, flushed
    lines.rewrite(rows)                                # the final file, atomically, in input order

A rerun of the same command reads what the journal holds (`complete`, `lines`) and does only the
rest. What each fault does to these files is listed in docs/RELIABILITY.md.
"""

from pathlib import Path

from common import records


class Output:
    """A stage's output, locked for this process (records.OutputLock) and tied to its settings."""

    def __init__(self, out, stage, folder=False):
        self.path, self.stage = Path(out), stage
        records.OutputLock(out, stage, folder=folder)

    @property
    def manifest(self):
        """<out>.run.json, what the output is tied to."""
        return records.manifest_path(self.path)

    def tie(self, entries, advice, used=None):
        """Record {name: settings} in the manifest, refusing a name recorded with other settings
        (records.tie_to_run; used: the names the output still holds lines of, None: all)."""
        saved = records.tie_to_run(self.path, self.manifest, entries, self.stage, advice, used=used)
        records.write_json_atomic(self.manifest, saved)


class Journal:
    """A JSONL file appended one finished record at a time (records.JsonlAppender: a crash or a
    full disk loses at most the line being written), read back on resume."""

    def __init__(self, path, kept=None):
        self.path = Path(path)
        self.kept = kept  # what a stop says the journal keeps ("finished answers"); see Run.journal
        self.opened = False  # opened to append (closed since or not)
        self._appender = None

    def complete(self):
        """The complete records already there, a torn last line cut off the file."""
        return records.repair_torn_tail(self.path)

    def lines(self):
        """(line number, record) of a file that is there, validated as records.read_jsonl reads it."""
        return records.read_jsonl(self.path) if self.path.exists() else []

    def open(self):
        self._appender = records.JsonlAppender(self.path)
        self.opened = True
        return self

    def append(self, record):
        self._appender.write(record)

    def close(self):
        if self._appender is not None:
            self._appender.close()

    def rewrite(self, rows):
        """Replace the file by `rows` at once (write, fsync, rename)."""
        self.close()
        records.write_jsonl_atomic(self.path, rows)


def first_per_id(rows, order):
    """rows with an id's first one kept, sorted by order ({id: position})."""
    return sorted({r["id"]: r for r in reversed(rows)}.values(), key=lambda r: order[r["id"]])


def skipped_path(out):
    """Where the instances a stage skipped are listed with their reason: <stem>.skipped.jsonl."""
    out = Path(out)
    return out.with_name((out.stem if out.suffix == ".jsonl" else out.name) + ".skipped.jsonl")


class Settled:
    """The results of a stage that settles each instance once: a written record in OUT or a skip
    with its reason in <stem>.skipped.jsonl. The main process journals them as they are settled;
    every process reads back, on resume, which instances are settled already."""

    def __init__(self, out, instances, kind, kept=None):
        self.written, self.skipped = Journal(out, kept), Journal(skipped_path(out))
        self.order = {r["id"]: i for i, r in enumerate(instances)}
        self.kind = kind  # what the instances are, for the message naming a stray line

    def read(self, lines):
        """The complete lines of one of the two journals, each checked to be of an instance."""
        done = []
        for lineno, obj in lines.lines():
            if obj.get("id") not in self.order:
                raise records.RecordError(lines.path, lineno, "id", f"{obj.get('id')!r} is not a {self.kind} of the "
                                                                    "data; this file is from another run: move it away")
            done.append(obj)
        return done

    def resume(self, accelerator, skips):
        """The ids an earlier run already wrote or skipped. The main process opens the journals
        (cutting torn tails) and lists the new skips ({id: reason}) before any process reads them."""
        if accelerator.is_main_process:
            self.written.open()
            self.skipped.open()
            listed = {r["id"] for r in self.read(self.skipped)}
            for rec_id in self.order:
                if rec_id in skips and rec_id not in listed:
                    self.add(rec_id, skips[rec_id])
        accelerator.wait_for_everyone()
        settled = {r["id"] for r in self.read(self.written) + self.read(self.skipped)}
        accelerator.wait_for_everyone()  # nobody appends while another process still reads
        return settled

    def add(self, rec_id, result):
        """result: the record to write, or the reason the instance is skipped (a string)."""
        if isinstance(result, str):
            self.skipped.append({"id": rec_id, "reason": result})
        else:
            self.written.append(result)

    def finish(self):
        """(written, skipped) in input order, an id's first line kept when it has two; the files are
        rewritten so, since a resumed run may have appended out of order."""
        self.written.close()
        self.skipped.close()
        lines = self.read(self.written)
        written = first_per_id(lines, self.order)
        skipped = first_per_id(self.read(self.skipped), self.order)
        if [r["id"] for r in lines] != [r["id"] for r in written]:
            records.write_jsonl_atomic(self.written.path, written)
        if skipped:
            records.write_jsonl_atomic(self.skipped.path, skipped)
        else:
            self.skipped.path.unlink(missing_ok=True)
        return written, skipped
