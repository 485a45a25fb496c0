"""Every GPU measurement the README's GPU tables come from, and the tests that only a GPU runs, in one
command with a time budget.

    python -m benchmarks.gpu_all                          # everything that fits in --budget seconds (570)
    python -m benchmarks.gpu_all --only attention,packed  # some steps
    python -m benchmarks.gpu_all --budget 300 --out DIR   # copy the result files to DIR ($OUT by default)

Run it from the repository root on a machine with one CUDA GPU. Missing packages come from .whl/
(benchmarks/gpu_wheels.sh fills it where PyPI is reachable) and are installed offline into /tmp/site;
fasttrain itself is installed editable when it is not importable. Steps, most important first, each in its
own process with its own timeout, cut to the time left (a step that no longer fits is skipped, and said so):

  tests       the GPU-only tests: the kernels' bf16 and larger-shape cases, CUDA-graph steps against eager
  attention   our attention (atomic and separate dQ) against SDPA's cuDNN and flash backends, d 64 / 128,
              seq 1k-16k, causal: target fwd+bwd >= 1.0x cuDNN from seq 2k
  packed      1.5m, 3m, 6m packed K = 16 and 64, eager and as one CUDA graph, against the same runs one at a
              time in plain eager PyTorch: target >= 15x tokens/s
  large       800m, the plain trainer's step compiled with cuDNN attention and the fused loss at the largest
              micro-batch that fits, with a profile of where the time goes: target MFU >= 50% (datasheet)
  linear_ce   fused linear cross-entropy against torch eager / compiled and Liger-Kernel: target <= 1.0x
              torch.compile's time at <= 1/4 its memory, faster than Liger at d <= 1024
  deepspeed   800m under ZeRO 0, 1, 2 against the plain trainer's step on the same shapes: target >= 0.9x
  tuning      every autotuning config of the attention kernels against the float64 reference

Each benchmark writes its JSON (with the device name) to benchmarks/results/; this adds
gpu_summary-<device>.json (each step's status, the tests' results and every target check), prints one
summary table at the end, and keeps the whole output in gpu_all.log (in --out, else /tmp).
"""
import argparse
import glob
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
SITE = "/tmp/site"  # where carried wheels are installed (on PYTHONPATH for every step)
# module -> distribution, for the packages a step may need that an image may lack
CARRIED = {"deepspeed": "deepspeed", "hjson": "hjson", "pydantic": "pydantic", "pydantic_core": "pydantic_core",
           "annotated_types": "annotated_types", "typing_inspection": "typing_inspection",
           "liger_kernel": "liger_kernel"}
TEST_FILES = ["tests/test_flash_attention.py", "tests/test_linear_cross_entropy.py", "tests/test_cross_entropy.py",
              "tests/test_step_graph.py", "tests/test_backends.py", "tests/test_model.py"]


class Log:
    """Everything printed, also kept in a file."""

    def __init__(self, path):
        self.file = open(path, "w")

    def __call__(self, text=""):
        print(text, flush=True)
        self.file.write(text + "\n")
        self.file.flush()


def run(cmd, timeout, env, log):
    """Run cmd (a list) with its output streamed to the log; returns (status, seconds): "ok", "failed (rc N)",
    or "timeout" (the whole process group is killed)."""
    log(f"$ {' '.join(cmd)}   [timeout {timeout:.0f} s]")
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)

    def pump():
        for line in proc.stdout:
            log(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    status = None
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        status = "timeout"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the step and every process it started
            proc.wait()
    reader.join(timeout=5)
    seconds = time.time() - start
    if status is None:
        status = "ok" if proc.returncode == 0 else f"failed (rc {proc.returncode})"
    log(f"-> {status} after {seconds:.0f} s")
    return status, seconds


def setup(env, log):
    """Install what is missing from .whl/ (offline), and fasttrain editable if it cannot be imported."""
    wheels = sorted(glob.glob(os.path.join(ROOT, ".whl", "*.whl")))
    missing = [dist for module, dist in CARRIED.items() if importlib.util.find_spec(module) is None]
    chosen = [w for w in wheels if os.path.basename(w).split("-")[0].lower() in missing]
    if chosen:
        run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
             "--no-cache-dir", "--upgrade", "--target", SITE, *chosen], 120, env, log)
    elif missing:
        log(f"not installed and not carried in .whl/: {', '.join(missing)} (the steps that need them say so)")
    probe = [sys.executable, "-c", "import fasttrain.kernels, yaml, tokenizers, pytest"]
    if subprocess.run(probe, cwd=ROOT, env=env, capture_output=True).returncode != 0:
        run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e", "."],
            180, env, log)
    out = subprocess.run([sys.executable, "-c", "from benchmarks.common import device_info, device_slug; import json; "
                          "print(json.dumps({**device_info(), 'slug': device_slug()}))"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        log(out.stderr)
        raise SystemExit("error: cannot import torch and fasttrain here; see the log above")
    return json.loads(out.stdout.strip().splitlines()[-1])


STARTED = time.time()


def read(name, slug):
    """A result file this run wrote (an older one, e.g. committed for this GPU, is not this run's)."""
    path = os.path.join(RESULTS, f"{name}-{slug}.json")
    if not os.path.exists(path) or os.path.getmtime(path) < STARTED:
        return None
    with open(path) as f:
        return json.load(f)


def junit_summary(path):
    import xml.etree.ElementTree as ET

    if not os.path.exists(path):
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            failed.append({"test": f"{case.get('classname')}::{case.get('name')}",
                           "message": (bad.get("message") or "")[:300]})
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed}


def checks(slug):
    """(what, value, target, met) for every target the measurements speak to."""
    out = []
    att = read("attention", slug)
    if att:
        for provider in ("fasttrain-triton", "fasttrain-triton-separate-dq"):
            for d in (64, 128):
                ratios = [r["vs_cudnn"] for r in att["rows"] if r["provider"] == provider and r["head_dim"] == d
                          and r["seq"] >= 2048 and r.get("causal") and "vs_cudnn" in r]
                if ratios:
                    out.append((f"attention {provider} d{d} seq>=2k: fwd+bwd vs cuDNN (worst)", min(ratios),
                                ">= 1.0", min(ratios) >= 1.0))
    thr = read("throughput", slug)
    if thr:
        for r in thr["rows"]:
            if r.get("impl") == "packed" and "speedup_vs_plain_eager" in r:
                out.append((f"packed {r['preset']} K={r['K']} {'cuda graph' if r.get('cuda_graph') else 'eager'} "
                            f"{r['attention']}/{r['loss']}: tokens/s vs one at a time, plain eager",
                            r["speedup_vs_plain_eager"], ">= 15", r["speedup_vs_plain_eager"] >= 15))
            if r.get("part") == "ladder" and r.get("preset") == "800m" and r.get("mfu"):
                out.append((f"800m {r['impl']} {r['attention']}/{r['loss']} compile={r['compile']} micro "
                            f"{r.get('micro_batch')}: MFU (datasheet; {r.get('mfu_vs_matmul', float('nan')):.1%} of "
                            "measured matmul)", r["mfu"], ">= 0.50", r["mfu"] >= 0.5))
    zero = read("zero", slug)
    if zero:
        for r in zero["rows"]:
            if "vs_plain" in r:
                out.append((f"DeepSpeed ZeRO-{r['stage']} {r['preset']} micro {r['micro_batch']}: tokens/s vs plain",
                            r["vs_plain"], ">= 0.9", r["vs_plain"] >= 0.9))
        if zero.get("note"):
            out.append((f"DeepSpeed: {zero['note']}", float("nan"), "", False))
    lce = read("linear_cross_entropy", slug)
    if lce:
        for r in lce["rows"]:
            if r["provider"] != "fasttrain" or "time_vs_compile" not in r:
                continue
            shape = f"N {r['N']}, d {r['d']}, V {r['V']}"
            out.append((f"linear CE {shape}: time vs torch.compile", r["time_vs_compile"], "<= 1.0",
                        r["time_vs_compile"] <= 1.0))
            out.append((f"linear CE {shape}: memory vs torch.compile", r["mem_vs_compile"], "<= 0.25",
                        r["mem_vs_compile"] <= 0.25))
            if "time_vs_liger" in r and r["d"] <= 1024:
                out.append((f"linear CE {shape}: time vs Liger", r["time_vs_liger"], "< 1.0", r["time_vs_liger"] < 1.0))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=570, help="seconds for all steps together")
    parser.add_argument("--only", help="comma-separated steps to run (default: all)")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="copy the result files here (default $OUT)")
    parser.add_argument("--workers", type=int, default=8, help="pytest-xdist processes for the tests")
    args = parser.parse_args(argv)
    start = time.time()
    os.makedirs(RESULTS, exist_ok=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    log = Log(os.path.join(args.out or "/tmp", "gpu_all.log"))
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        [SITE, ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    env.pop("TRITON_INTERPRET", None)
    os.makedirs(SITE, exist_ok=True)
    info = setup(env, log)
    slug = info["slug"]
    log(f"device: {info.get('device')}, torch {info.get('torch')}, triton {info.get('triton')}, cuda {info.get('cuda')}")
    py = [sys.executable]
    xdist = ["-n", str(args.workers)] if importlib.util.find_spec("xdist") else []
    junit = os.path.join("/tmp", f"gpu_tests-{slug}.xml")
    state = {"micro": 4}

    def deepspeed_cmd():
        large = read("throughput", slug)
        micro = next((r.get("micro_batch") for r in (large or {}).get("rows", [])
                      if r.get("preset") == "800m" and r.get("micro_batch")), 8)
        state["micro"] = max(1, min(micro // 2, 8))  # eager steps hold more activations than compiled ones
        return py + ["-m", "benchmarks.bench_zero", "--presets", "800m", "--stages", "0,1,2", "--attention", "cudnn",
                     "--loss", "triton", "--micro-batch", str(state["micro"]), "--vs-plain", "--steps", "3",
                     "--warmup", "2"]

    steps = [
        ("tests", 150, lambda: py + ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *xdist,
                                     "--junitxml", junit, *TEST_FILES, "-k", "not every_tuning_config"]),
        ("attention", 200, lambda: py + ["-m", "benchmarks.bench_attention", "--seqs", "1024,2048,4096,8192,16384",
                                         "--head-dims", "64,128", "--causal-only", "--providers",
                                         "fasttrain-triton,fasttrain-triton-separate-dq,sdpa-cudnn,sdpa-flash,flash-attn"]),
        ("packed", 180, lambda: py + ["-m", "benchmarks.bench_throughput", "--skip-ladder", "--packed-presets",
                                      "1.5m,3m,6m", "--packed-k", "16,64", "--packed-compile", "off",
                                      "--packed-cuda-graph", "off,on", "--packed-combos", "auto/triton",
                                      "--warmup", "3", "--iters", "10"]),
        ("large", 240, lambda: py + ["-m", "benchmarks.bench_throughput", "--skip-packed", "--skip-plain", "--presets",
                                     "800m", "--attention", "cudnn", "--loss", "triton", "--compile", "on", "--batch",
                                     "32", "--micro-batch", "max", "--profile", "--warmup", "2", "--iters", "5"]),
        ("linear_ce", 150, lambda: py + ["-m", "benchmarks.bench_linear_cross_entropy", "--quick"]),
        ("deepspeed", 200, deepspeed_cmd),
        ("tuning", 240, lambda: py + ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *xdist,
                                      "tests/test_flash_attention.py", "-k", "every_tuning_config"]),
    ]
    only = set(args.only.split(",")) if args.only else None
    statuses = {}
    for name, timeout, make_cmd in steps:
        if only and name not in only:
            continue
        left = args.budget - (time.time() - start) - 10  # keep time for the summary
        if left < 30:
            statuses[name] = {"status": "skipped: no time left in the budget"}
            log(f"== {name}: skipped, {left:.0f} s left")
            continue
        log(f"== {name}")
        status, seconds = run(make_cmd(), min(timeout, left), env, log)
        statuses[name] = {"status": status, "seconds": round(seconds, 1)}

    tests = junit_summary(junit) if "tests" in statuses else None
    found = checks(slug)
    summary = {"device": info, "budget_s": args.budget, "total_s": round(time.time() - start, 1), "steps": statuses,
               "tests": tests, "checks": [{"what": w, "value": v, "target": t, "met": m} for w, v, t, m in found]}
    path = os.path.join(RESULTS, f"gpu_summary-{slug}.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)

    log("\n======== summary ========")
    for name, s in statuses.items():
        log(f"{name:10s} {s['status']}" + (f" ({s['seconds']:.0f} s)" if "seconds" in s else ""))
    if tests:
        log(f"tests: {tests['passed']} passed, {tests['failures'] + tests['errors']} failed, {tests['skipped']} skipped")
        for bad in tests["failed"]:
            log(f"  FAILED {bad['test']}: {bad['message']}")
    width = max([len(w) for w, *_ in found] + [10])
    for what, value, target, met in found:
        log(f"{what:{width}s}  {value:8.3f}  {target:8s}  {'met' if met else 'NOT met'}")
    log(f"wrote {path}")
    if args.out:
        for name in ("attention", "throughput", "zero", "linear_cross_entropy", "gpu_summary"):
            src = os.path.join(RESULTS, f"{name}-{slug}.json")
            if os.path.exists(src) and os.path.getmtime(src) >= STARTED:
                shutil.copy(src, args.out)
        if os.path.exists(junit):
            shutil.copy(junit, args.out)
        log(f"copied the result files to {args.out}")


if __name__ == "__main__":
    main()
