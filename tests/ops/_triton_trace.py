"""torch.compile of a Triton-backed stg_ext op, traced without the interpreter and without running it.

Under TRITON_INTERPRET=1, wrap_triton cannot be traced (see test_combine_triton.py). A fresh interpreter
without that variable gets real JITFunctions; the op's tensors are CPU tensors that stg_ext is told to treat
as GPU ones, and a capturing backend records the graph instead of launching anything (there is no GPU).
"""
import os
import subprocess
import sys
import textwrap
from typing import Tuple

_SCRIPT = """
import os
os.environ.pop("TRITON_INTERPRET", None)
import torch, stg_ext
from stg_ext.ops import backends
from torch._dynamo.backends.common import aot_autograd
backends.triton_runs_on = lambda device: True  # pretend the CPU tensors are on a GPU
graphs = []
class NotRun(Exception):
    pass
def capture(gm, example_inputs):
    graphs.append(gm)
    def do_not_run(*args):  # running gm would launch the kernels on a GPU
        raise NotRun
    return do_not_run
{fn}
args = {args}
try:  # fullgraph=True: any graph break raises
    torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=capture))(*args)
except NotRun:
    pass
code = graphs[0].code
print("KERNELS", code.count("triton_kernel_wrapper_functional("), "CUSTOM_OP", {op_name!r} in code)
"""


def trace_without_interpreter(fn_source: str, args_source: str, op_name: str) -> Tuple[int, bool]:
    """Compiles `fn` (defined by fn_source) on the tensors `args_source` evaluates to; returns how many Triton
    kernel calls the captured graph holds and whether the opaque custom op `op_name` is still in it."""
    script = _SCRIPT.format(fn=textwrap.dedent(fn_source), args=args_source, op_name=op_name)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("KERNELS")), None)
    assert line is not None, run.stdout + run.stderr[-3000:]
    _, kernels, _, custom_op = line.split()
    return int(kernels), custom_op == "True"
