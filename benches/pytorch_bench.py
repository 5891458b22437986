"""PyTorch side of the benchmarks (benches/compare.sh on the CPU, benches/gpu_compare.sh on a GPU):
the oracle network (deepis_ref.py, a copy of the project's reference) on the same weights and
volume as `deepis bench` / `deepis predict`.

  make the shared inputs:  pytorch_bench.py --make-weights W.safetensors --make-input X.npy --config published
  time PyTorch:            pytorch_bench.py --weights W.safetensors --input X.npy --threads 2 --runs 3 [--output Y.npy]
  GPU sweep, one process:  pytorch_bench.py --weights W --input X --device cuda --sweep fp32,tf32,fp16,bf16 \
                               --batches 1,8 --graph --runs 10 [--deepis fp32:1:0.055,bf16+wgmma:8:0.0019]

The sweep runs every (precision, batch, eager / CUDA graph) configuration on one loaded model and
prints one line per configuration (ms per volume and volumes/s, timed on the device and host to
host, and the output's difference from strict float32), then a table with the `--deepis` times
(seconds per volume by precision and batch, host to host as `deepis bench` times them), each with
its ratio to PyTorch in the same precision (its faster mode) and to the fastest PyTorch
configuration at that batch.
Precisions: fp32 (strict float32, TF32 off), tf32 (TF32 tensor cores allowed), fp16 / bf16 (the
model and input converted, as an inference server would). Every configuration uses
channels_last_3d and cudnn.benchmark. `--device cpu` runs the same code without CUDA graphs, for
checking the script on a machine with no GPU.

Timing: eval mode, torch.inference_mode, channels_last_3d model and input, torch.set_num_threads(T),
warm-up runs first, the median of the timed runs. Peak RSS from getrusage (the whole process).
Random weights follow deepis's scheme (Weights::random): conv weights N(0, 1/fan_in), biases
N(0, 0.1^2), BN weight U(0.8, 1.2), running mean N(0, 0.2^2), running var U(0.5, 1.5).
"""
import argparse
import copy
import json
import os
import resource
import statistics
import sys
import time

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deepis_ref import DEFAULT_CONFIG, DeepIS, metadata  # noqa: E402

# "check": a small network for running the scripts themselves on a machine without a GPU.
CONFIGS = {"published": {}, "readme": {"widths": [32, 64, 128, 256, 512]},
           "check": {"widths": [4, 8, 16, 32, 64], "trans_feature": 8}}


def make_weights(path, name, seed=1):
    cfg = dict(DEFAULT_CONFIG, **CONFIGS[name])
    torch.manual_seed(seed)
    model = DeepIS(cfg)
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        if k.endswith("running_mean"):
            t = 0.2 * torch.randn_like(v)
        elif k.endswith("running_var"):
            t = 0.5 + torch.rand_like(v)
        elif v.dim() == 5:
            t = torch.randn_like(v) / float(np.prod(v.shape[1:])) ** 0.5
        elif k.endswith("weight"):  # BN weight
            t = 0.8 + 0.4 * torch.rand_like(v)
        else:  # conv or BN bias
            t = 0.1 * torch.randn_like(v)
        sd[k] = t.float().contiguous()
    save_file(sd, path, metadata=metadata(cfg))


def load(path):
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        sd = {k.removeprefix("module."): f.get_tensor(k).float() for k in f.keys()}
    cfg = json.loads(meta.get("config", "{}"))
    model = DeepIS(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.endswith("num_batches_tracked") and not m.startswith("classifier")]
    if missing or unexpected:
        raise SystemExit(f"{path}: missing {missing}, unexpected {unexpected}")
    return model.eval(), cfg


DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def set_tf32(on):
    torch.backends.cudnn.allow_tf32 = on
    torch.backends.cuda.matmul.allow_tf32 = on


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


class Runner:
    """One configuration: the model in `precision` on `device`, fed a batch of `batch` volumes,
    eagerly or as a replayed CUDA graph. `run_device()` runs on a resident input; `run_host(x)`
    copies the float32 host batch in and the float32 output back, as `deepis bench` is timed."""

    def __init__(self, model32, precision, batch, graph, device, vol):
        self.dtype = DTYPES[precision]
        self.device = device
        # Module.to converts in place: the float32 model stays for the configurations after this one.
        self.model = model32 if self.dtype == torch.float32 else copy.deepcopy(model32).to(dtype=self.dtype)
        host = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32)).reshape(1, 1, *vol.shape[-3:])
        self.x_host = host.expand(batch, -1, -1, -1, -1).contiguous(memory_format=torch.channels_last_3d)
        if device == "cuda":
            self.x_host = self.x_host.pin_memory()
        self.x = self.x_host.to(device, dtype=self.dtype).contiguous(memory_format=torch.channels_last_3d)
        self.graph = None
        if graph:
            self._capture()

    def _capture(self):
        # Warm up on a side stream first (cuDNN picks its algorithms), then capture one forward.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.model(self.x)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.y = self.model(self.x)

    def run_device(self):
        if self.graph is not None:
            self.graph.replay()
            return self.y
        return self.model(self.x)

    def run_host(self):
        if self.graph is not None:
            self.x.copy_(self.x_host, non_blocking=True)
            self.graph.replay()
            return self.y.float().cpu()
        x = self.x_host.to(self.device, dtype=self.dtype, non_blocking=True)
        return self.model(x.contiguous(memory_format=torch.channels_last_3d)).float().cpu()


def timed(fn, device, warmup, runs):
    """Median seconds of `runs` calls after `warmup` calls, each synchronised."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rel_err(y, ref):
    """max|y - ref| / max(1, max|ref|): the project's output metric."""
    y, ref = y.double(), ref.double()
    return ((y - ref).abs().max() / max(1.0, ref.abs().max().item())).item()


def sweep(a, model32, vol, cfg):
    cuda = a.device == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    precisions = a.sweep.split(",")
    unknown = [p for p in precisions if p not in DTYPES]
    if unknown:
        raise SystemExit(f"--sweep: unknown precision(s) {unknown}; choose from {sorted(DTYPES)}")
    batches = [int(b) for b in a.batches.split(",")]
    modes = ["eager", "graph"] if a.graph and cuda else ["eager"]
    if a.graph and not cuda:
        print("CUDA graphs need --device cuda: graph configurations skipped")
    where = (f"{torch.cuda.get_device_name()}, cuDNN {torch.backends.cudnn.version()}" if cuda
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"pytorch {torch.__version__}, {where}, channels_last_3d, cudnn.benchmark={cuda}, "
          f"widths {cfg.get('widths')}, volume {list(vol.shape[-3:])}")
    model32 = model32.to(a.device, memory_format=torch.channels_last_3d)
    rows, failed, refs = [], [], {}
    with torch.inference_mode():
        for b in batches:
            for prec in precisions:
                for mode in modes:
                    name = f"{prec} batch={b} {mode}"
                    try:
                        set_tf32(prec == "tf32")
                        r = Runner(model32, prec, b, mode == "graph", a.device, vol)
                        dev = timed(r.run_device, a.device, a.warmup, a.runs) / b
                        host = timed(r.run_host, a.device, a.warmup, a.runs) / b
                        y = r.run_host()
                        if prec == "fp32" and mode == "eager":
                            refs[b] = y
                        err = rel_err(y, refs[b]) if b in refs else float("nan")
                        del r
                    except (RuntimeError, NotImplementedError) as e:
                        failed.append(name)
                        print(f"config {name}: FAILED: {str(e).splitlines()[0]}")
                        continue
                    finally:
                        set_tf32(False)
                        if cuda:
                            torch.cuda.empty_cache()
                    rows.append((prec, b, mode, dev, host, err))
                    print(f"config {name}: device {dev * 1e3:.3f} ms/volume ({1 / dev:.1f} volumes/s), "
                          f"host to host {host * 1e3:.3f} ms/volume ({1 / host:.1f} volumes/s), "
                          f"err vs fp32 {err:.2e}")
    print_table(rows, parse_peer(a.deepis), a.deepis_label)
    if failed:
        raise SystemExit(f"{len(failed)} configuration(s) failed: {', '.join(failed)}")


def parse_peer(s):
    """`P:B:T,...` (precision label, batch, seconds per volume), or the older `B:T,...` (fp32)."""
    out = {}
    for item in (s or "").split(","):
        if not item:
            continue
        parts = item.split(":")
        prec, b, t = ("fp32", *parts) if len(parts) == 2 else parts
        out[(prec, int(b))] = float(t)
    return out


def print_table(rows, deepis, label):
    """One table: deepis rows first (ratios: < 1 means deepis is faster), then every PyTorch row;
    then per batch the fastest of each engine and their ratio."""
    def fastest(b, prec=None):
        cand = [r for r in rows if r[1] == b and (prec is None or r[0] == prec)]
        return min(cand, key=lambda r: r[4]) if cand else None

    print()
    print("| engine | precision | batch | mode | ms/volume (device) | ms/volume (host to host) | volumes/s (host to host) "
          "| deepis / PyTorch same precision | deepis / fastest PyTorch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (prec, b), t in sorted(deepis.items(), key=lambda kv: (kv[0][1], kv[1])):
        same, best = fastest(b, prec.split("+")[0]), fastest(b)
        r_same = f"{t / same[4]:.3g} ({same[2]})" if same else "-"
        r_best = f"{t / best[4]:.3g} ({best[0]} {best[2]})" if best else "-"
        print(f"| deepis | {prec} | {b} | {label} | - | {t * 1e3:.3f} | {1 / t:.1f} | {r_same} | {r_best} |")
    for prec, b, mode, dev, host, _ in rows:
        print(f"| pytorch | {prec} | {b} | {mode} | {dev * 1e3:.3f} | {host * 1e3:.3f} | {1 / host:.1f} | | |")
    for b in sorted({r[1] for r in rows} | {k[1] for k in deepis}):
        best = fastest(b)
        mine = min(((p, t) for (p, bb), t in deepis.items() if bb == b), key=lambda pt: pt[1], default=None)
        line = f"batch {b}:"
        if mine:
            line += f" fastest deepis {mine[0]}, {mine[1] * 1e3:.3f} ms/volume;"
        if best:
            line += f" fastest PyTorch {best[0]} {best[2]}, {best[4] * 1e3:.3f} ms/volume host to host;"
        if mine and best:
            line += f" PyTorch time / deepis time = {best[4] / mine[1]:.3g}x"
        print(line)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--make-weights")
    ap.add_argument("--make-input")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="published")
    ap.add_argument("--size", default="128,128,64")
    ap.add_argument("--weights")
    ap.add_argument("--input")
    ap.add_argument("--output")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: cuDNN, timed host to host like `deepis bench`")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 tensor cores in cuDNN (default: strict float32)")
    ap.add_argument("--sweep", help="precisions to sweep, e.g. fp32,tf32,fp16,bf16 (one process, see above)")
    ap.add_argument("--batches", default="1,8", help="batch sizes of the sweep")
    ap.add_argument("--graph", action="store_true", help="the sweep also replays each configuration as a CUDA graph")
    ap.add_argument("--deepis", help="deepis seconds per volume by batch, e.g. 1:0.055,8:0.052 (for the ratios)")
    ap.add_argument("--deepis-label", default="bench --backend cuda", help="how the --deepis times were taken")
    a = ap.parse_args()
    size = [int(s) for s in a.size.split(",")]
    if a.make_weights or a.make_input:
        if a.make_weights:
            make_weights(a.make_weights, a.config)
        if a.make_input:
            rng = np.random.default_rng(7)
            np.save(a.make_input, rng.standard_normal(size).astype(np.float32))
        return
    torch.set_num_threads(a.threads)
    model, cfg = load(a.weights)
    if a.sweep:
        vol = np.load(a.input) if a.input else np.random.default_rng(7).standard_normal(size).astype(np.float32)
        return sweep(a, model, vol, cfg)
    cuda = a.device == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = a.tf32
        torch.backends.cuda.matmul.allow_tf32 = a.tf32
    model = model.to(a.device, memory_format=torch.channels_last_3d)
    vol = np.load(a.input) if a.input else np.random.default_rng(7).standard_normal(size).astype(np.float32)
    x = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32)).reshape(1, 1, *vol.shape[-3:])
    x = x.contiguous(memory_format=torch.channels_last_3d)
    gflop = None
    times = []
    with torch.inference_mode():
        for i in range(a.warmup + a.runs):
            t0 = time.perf_counter()
            # host to host, as deepis bench times it: upload, forward, download
            y = model(x.to(a.device).contiguous(memory_format=torch.channels_last_3d)).cpu() if cuda else model(x)
            t = time.perf_counter() - t0
            kind = "warmup" if i < a.warmup else "run"
            print(f"  {kind} {i + 1 if i < a.warmup else i - a.warmup + 1}: {t:.3f} s", file=sys.stderr)
            if i >= a.warmup:
                times.append(t)
    med = statistics.median(times)
    if a.output:
        np.save(a.output, y.contiguous().numpy())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    where = (f"{torch.cuda.get_device_name()} cuDNN {torch.backends.cudnn.version()} tf32={a.tf32}" if cuda
             else f"{torch.get_num_threads()} threads")
    print(f"pytorch {torch.__version__}, {where}, channels_last_3d, widths {cfg.get('widths')}")
    print(f"median of {len(times)} run(s): {med:.3f} s per volume")
    print(f"peak RSS: {rss:.1f} MiB")


if __name__ == "__main__":
    main()
