"""The GPU check of stg_ext (run by scripts/gpu_check.sh): one report, CSV and markdown, in --out.

On a CUDA machine (after gpu_check.sh built the package with its CUDA ops):
  build      the extension's SASS/PTX and the CUDA dispatch keys (scripts/check_cuda_build.py);
  tests      the op tests on the GPU (tests/ops: every backend, "cuda" and "triton" included, against the reference
             in fp32/fp16/bf16 on the CPU tests' shapes; the conftest leaves the Triton interpreter off) and the
             GPU-marked tests (-m gpu);
  combine    cuda / triton / eager / torch.compile and the memory floor (bytes moved over peak DRAM bandwidth) on
             the Mochi, LTX and Wan latents (benchmarks/bench_combine.py --device cuda);
  attention  identity joint attention: cuda / triton / the masked SDPA the model would run without the op, on the
             Mochi, Wan and LTX attention shapes;
  step cost  one guided step (CFG vs STG-A with prefix reuse vs the naive third pass) of the Wan 2.1 1.3B
             transformer at its real width (random weights, bf16, no download).
Without a GPU (--compile-only, or no device): the parts that need none: the toolkit and arch list the build would
use, the nvcc compile tests, the Triton kernels compiled for sm_80/sm_90 with their registers and spills, and the
installed extension's SASS if it has CUDA ops.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

SECTIONS = []  # (title, rows: list of dicts)
FAILURES = []


def section(title, rows):
    SECTIONS.append((title, rows))
    print(f"\n== {title}")
    for r in rows:
        print("  " + ", ".join(f"{k}={v}" for k, v in r.items()))


def run(cmd, timeout=3600, env=None):
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    return proc, time.time() - t0


def last_line(text):
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# --- parts that need no GPU ---------------------------------------------------------------------------------

def compile_only_parts(py):
    import cuda_toolkit

    tk = cuda_toolkit.find_toolkit()
    row = {"toolkit": tk.home if tk else "none", "cuda": tk.version if tk else "-",
           "found_by": tk.how if tk else "-"}
    if tk:
        row["arch_list"] = cuda_toolkit.arch_list(tk.nvcc)[0]
        row["wheel_headers"] = " ".join(tk.include_dirs) or "none"
        row["missing_headers"] = " ".join(tk.missing) or "none"
    section("CUDA toolkit the build would use", [row])

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc, secs = run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join("tests", "ops",
                      "test_cuda_compile.py")], env=env)
    if proc.returncode != 0:
        FAILURES.append("nvcc compile tests")
    section("nvcc compile tests (build flags, sm_80..sm_90, no spills)",
            [{"result": last_line(proc.stdout), "seconds": round(secs)}])

    csv_path = os.path.join(OUT, "triton_resources.csv")
    proc, secs = run([py, "-m", "stg_ext.kernels.gpu_compile", "--jobs", "2", "--csv", csv_path], env=env)
    rows = []
    for line in proc.stdout.splitlines():
        if line.startswith("| _"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.append(dict(zip(["kernel", "launch_config", "arch", "variants", "registers_max", "spill_stack_max",
                                  "shared_max"], cells)))
    rows.append({"kernel": "(all)", "result": "zero spills" if proc.returncode == 0 else "SPILLS or errors",
                 "seconds": round(secs)})
    if proc.returncode != 0:
        FAILURES.append("Triton compiles for sm_80/sm_90")
        rows.append({"error": proc.stderr[-2000:]})
    section("Triton kernels compiled for sm_80 / sm_90 (compile-checked only)", rows)

    import torch

    proc, _ = run([py, os.path.join("scripts", "check_cuda_build.py")])
    if proc.returncode != 0 and torch.version.cuda:  # a CPU torch has no CUDA ops to check
        FAILURES.append("the installed extension's CUDA code / dispatch keys")
    section("installed extension", [{"check": line} for line in (proc.stdout + proc.stderr[-500:]).splitlines()
                                     if line.strip() and "Warning" not in line])


# --- parts that need a GPU ----------------------------------------------------------------------------------

def gpu_tests(py):
    rows = []
    for label, args in (("op tests on the GPU (tests/ops)", [os.path.join("tests", "ops")]),
                        ("GPU-marked tests", ["-m", "gpu", "tests"])):
        proc, secs = run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args])
        rows.append({"tests": label, "result": last_line(proc.stdout), "seconds": round(secs)})
        if proc.returncode not in (0, 5):  # 5: no tests collected (no GPU-marked test)
            FAILURES.append(label)
    section("tests on the GPU", rows)


def cuda_time(fn, repeats=20, warmup=3):
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def combine_timings():
    import bench_combine

    rows = bench_combine.run(repeats=20, device="cuda")
    section("combine on the GPU (ms, median; CFG + STG + rescale 0.7)", rows)


# (B, H, N video tokens, D, T text tokens) at the models' real sizes, 1 video.
ATTENTION_SHAPES = {
    "mochi": (1, 24, 44520, 128, 256),  # 848x480x163 frames -> 28 x 30 x 53 latent tokens
    "wan-1.3b": (1, 12, 32760, 128, 512),  # 832x480x81 frames -> 21 x 30 x 52
    "ltx-video": (1, 32, 8064, 64, 128),  # 768x512x121 frames -> 16 x 16 x 24... (2B: 32 heads of 64)
}


def attention_timings():
    import torch
    import torch.nn.functional as F

    import stg_ext

    rows = []
    for model, (B, H, N, D, T) in ATTENTION_SHAPES.items():
        dt = torch.bfloat16
        q, k, v = (torch.randn(B, H, N + T, D, device="cuda", dtype=dt) for _ in range(3))
        args = (q[:, :, :N], k[:, :, :N], v[:, :, :N], k[:, :, N:], v[:, :, N:])
        row = {"model": model, "B,H,N,D,T": f"{B},{H},{N},{D},{T}", "dtype": "bf16"}
        for backend in ("cuda", "triton"):
            if backend in stg_ext.available_backends("cuda"):
                row[f"{backend}_ms"] = round(cuda_time(lambda: stg_ext.identity_joint_attention(
                    *args, backend=backend)), 3)
        # Without the op: SDPA over the joint sequence with a mask (video rows: self + text; text rows: all).
        mask = torch.zeros(N + T, N + T, dtype=torch.bool, device="cuda")
        mask[:N, N:] = True
        mask[torch.arange(N), torch.arange(N)] = True
        mask[N:] = True
        row["masked_sdpa_ms"] = round(cuda_time(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                                repeats=3, warmup=1), 3)
        ref = stg_ext.identity_joint_attention(*args, backend="torch")
        for backend in ("cuda", "triton"):
            if f"{backend}_ms" in row:
                got = stg_ext.identity_joint_attention(*args, backend=backend)
                row[f"{backend}_max_diff"] = f"{(got.float() - ref.float()).abs().max().item():.1e}"
                row[f"sdpa_over_{backend}"] = round(row["masked_sdpa_ms"] / row[f"{backend}_ms"], 1)
        del mask
        torch.cuda.empty_cache()
        rows.append(row)
    section("identity joint attention on the GPU (ms, median)", rows)


def wan_real_config():
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json (no weights: random init).
    return dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                eps=1e-6, rope_max_seq_len=1024)


def step_cost(device="cuda", dtype_name="bf16", config=None, latent=(1, 16, 21, 60, 104), text_tokens=512,
              layer=8, repeats=5):
    """One guided step of Wan (its "separate" convention: an uncond call and a cond call): CFG = 2 stock calls;
    STG = the uncond call + the cond call with STG-A on `layer` (stg_ext's default prefix reuse, and naive)."""
    import torch
    from diffusers import WanTransformer3DModel

    import stg_ext

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    model = WanTransformer3DModel(**(config or wan_real_config())).to(device, dtype).eval()
    x = torch.randn(latent, device=device, dtype=dtype)
    ctx = torch.randn(latent[0], text_tokens, model.config.text_dim, device=device, dtype=dtype)
    t = torch.full((latent[0],), 500.0, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def call():
        with torch.no_grad():
            return model(hidden_states=x, encoder_hidden_states=ctx, timestep=t, return_dict=False)[0]

    def timed(fn):
        fn()
        sync()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    stock = timed(call)
    row = {"model": "wan-1.3b (real width, random weights)", "dtype": dtype_name, "device": device,
           "latent": "x".join(map(str, latent)), "cfg_step_ms": round(2 * stock, 1)}
    for strategy in ("sequential", "naive"):
        session = stg_ext.apply_stg(model, layer=layer, mode="attention", cfg_scale=None, scale=1.0,
                                    strategy=strategy)
        try:
            stg_call = timed(call)
        finally:
            session.remove()
        row[f"stg_{strategy}_step_ms"] = round(stock + stg_call, 1)
        row[f"stg_{strategy}_over_cfg"] = round((stock + stg_call) / (2 * stock), 3)
    section("step cost, Wan 2.1 1.3B at real width", [row])
    return row


# --- report ---------------------------------------------------------------------------------------------------

def write_report(out):
    md = [f"# stg_ext GPU check\n", f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n"]
    with open(os.path.join(out, "gpu_check.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["section", "key", "value", "row"])
        for title, rows in SECTIONS:
            md.append(f"\n## {title}\n")
            if rows:
                cols = list(dict.fromkeys(k for r in rows for k in r))
                md.append("| " + " | ".join(cols) + " |")
                md.append("|" + "---|" * len(cols))
                for i, r in enumerate(rows):
                    md.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
                    for k, v in r.items():
                        w.writerow([title, k, v, i])
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"\nwrote {os.path.join(out, 'gpu_check.md')} and gpu_check.csv")


def main(argv=None) -> int:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "gpu_check_out"))
    ap.add_argument("--compile-only", action="store_true", help="only the parts that need no GPU")
    args = ap.parse_args(argv)
    OUT = args.out
    os.makedirs(OUT, exist_ok=True)
    import torch

    py = sys.executable
    gpu = torch.cuda.is_available() and not args.compile_only
    head = {"torch": torch.__version__, "cuda": torch.version.cuda or "none",
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"}
    section("machine", [head])
    if not gpu:
        print("gpu_check: no CUDA device here: running the compile-only parts (nothing below ran on a GPU)")
    compile_only_parts(py)
    if gpu:
        gpu_tests(py)
        for part in (combine_timings, attention_timings, step_cost):
            try:
                part()
            except Exception as exc:  # noqa: BLE001  (one failed part must not lose the others' results)
                FAILURES.append(part.__name__)
                section(f"{part.__name__} FAILED", [{"error": f"{type(exc).__name__}: {exc}"[:2000]}])
    section("summary", [{"failed": ", ".join(FAILURES) or "nothing", "gpu": gpu}])
    write_report(OUT)
    return 1 if FAILURES else 0


OUT = "gpu_check_out"

if __name__ == "__main__":
    sys.exit(main())
