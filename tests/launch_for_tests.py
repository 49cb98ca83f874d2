"""TEST-ONLY launcher: run a training stage on CPU processes (gloo) as an FSDP2 GPU run would run.

    ACCELERATE_USE_CPU=1 accelerate launch --config_file configs/fsdp_8gpu.yaml --num_processes 2 \
        launch_for_tests.py bootstrap.py --model M ...

Users never need it: on GPUs, `accelerate launch --config_file configs/fsdp_8gpu.yaml bootstrap.py …`
is all. It works around accelerate 1.15, where AcceleratorState.__init__ turns the distributed type
into FSDP only for the GPU-like types (MULTI_GPU, MULTI_NPU, …) and keeps MULTI_CPU as plain DDP even
with ACCELERATE_USE_FSDP set, dropping the FSDP plugin. Under an FSDP config the shim switches the
type to FSDP after the state is built and hands it the plugin, as the GPU branch does (in
AcceleratorState and in PartialState, which every later AcceleratorState() copies from); FSDP2's
fully_shard then runs on gloo and the stage takes the code path of an FSDP2 GPU run.

Faults the reliability tests inject from here, so that the stage scripts carry no test hooks:
- APO_TEST_SLOW_SAVE_RANK=R:S makes rank R write its share of every checkpoint S seconds late (the
  checkpoint race of RELIABILITY.md), under any config;
- APO_TEST_SIGKILL_AFTER_BACKWARD=N SIGKILLs the process right after its backward number N
  (0-based), i.e. inside an optimizer step when N is not the last micro-batch of one. Works with
  a plain `python launch_for_tests.py apo.py …` too;
- APO_TEST_LONG_C_CALL_AFTER_BACKWARD=N runs one long matrix product (seconds, one C call that
  never returns to the interpreter) right after backward number N, announced on stderr: the
  window in which two signals reach Python's handler as one;
- APO_TEST_SIGKILL_BEFORE_RENAME=NAME SIGKILLs the process just before a file is renamed onto
  NAME (e.g. training_summary.json: everything is saved, the summary is written, not yet renamed).
"""

import os
import runpy
import sys
import time


def switch_multi_cpu_to_fsdp():
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    build = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        build(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type

    AcceleratorState.__init__ = init


def slow_down_checkpoint_writes(rank, seconds):
    """Delay this rank's RNG-state and scheduler write, the last part of Accelerator.save_state."""
    import accelerate.accelerator
    import accelerate.checkpointing

    write = accelerate.checkpointing.save_accelerator_state

    def late(*args, **kwargs):
        if int(os.environ.get("RANK", 0)) == rank:
            time.sleep(seconds)
        return write(*args, **kwargs)

    accelerate.accelerator.save_accelerator_state = late  # the name save_state calls


def kill_after_backward(n):
    """SIGKILL right after the n-th (0-based) Accelerator.backward: a crash mid-step, at a point
    fixed by the data order rather than by timing."""
    import signal

    from accelerate import Accelerator

    backward = Accelerator.backward
    calls = [0]

    def counted(self, *args, **kwargs):
        backward(self, *args, **kwargs)
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        calls[0] += 1

    Accelerator.backward = counted


def long_c_call_after_backward(n):
    """After the n-th (0-based) Accelerator.backward, print a line to stderr, then spend seconds in
    one torch.mm, as a large model's forward or backward does."""
    import torch
    from accelerate import Accelerator

    backward = Accelerator.backward
    calls = [0]

    def counted(self, *args, **kwargs):
        backward(self, *args, **kwargs)
        if calls[0] == n:
            a = torch.randn(3000, 3000)
            print("\nlong C call", file=sys.stderr, flush=True)
            torch.mm(a, a)
        calls[0] += 1

    Accelerator.backward = counted


def kill_before_rename(name):
    """SIGKILL this process when os.replace is about to put a file at a path named `name`."""
    import signal

    replace = os.replace

    def replace_or_die(src, dst, *args, **kwargs):
        if os.path.basename(os.fspath(dst)) == name:
            os.kill(os.getpid(), signal.SIGKILL)
        return replace(src, dst, *args, **kwargs)

    os.replace = replace_or_die


def sigkill_at_line(cmd, prefix, cwd, env):
    """Start cmd and SIGKILL it as soon as its stdout prints a line starting with prefix (such as
    "checkpoint: step 3"); returns the finished process."""
    import signal
    import subprocess

    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith(prefix):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    proc.stdout.close()
    return proc


if __name__ == "__main__":
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        switch_multi_cpu_to_fsdp()
    if os.environ.get("APO_TEST_SLOW_SAVE_RANK"):
        rank, seconds = os.environ["APO_TEST_SLOW_SAVE_RANK"].split(":")
        slow_down_checkpoint_writes(int(rank), float(seconds))
    if os.environ.get("APO_TEST_SIGKILL_AFTER_BACKWARD"):
        kill_after_backward(int(os.environ["APO_TEST_SIGKILL_AFTER_BACKWARD"]))
    if os.environ.get("APO_TEST_LONG_C_CALL_AFTER_BACKWARD"):
        long_c_call_after_backward(int(os.environ["APO_TEST_LONG_C_CALL_AFTER_BACKWARD"]))
    if os.environ.get("APO_TEST_SIGKILL_BEFORE_RENAME"):
        kill_before_rename(os.environ["APO_TEST_SIGKILL_BEFORE_RENAME"])
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
