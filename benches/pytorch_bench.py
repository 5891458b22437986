"""PyTorch side of the CPU benchmark (benches/compare.sh): the oracle network (deepis_ref.py, a copy
of the project's reference) on the same weights and volume as `deepis bench` / `deepis predict`.

  make the shared inputs:  pytorch_bench.py --make-weights W.safetensors --make-input X.npy --config published
  time PyTorch:            pytorch_bench.py --weights W.safetensors --input X.npy --threads 2 --runs 3 [--output Y.npy]

Timing: eval mode, torch.inference_mode, channels_last_3d model and input, torch.set_num_threads(T),
warm-up runs first, the median of the timed runs. Peak RSS from getrusage (the whole process).
Random weights follow deepis's scheme (Weights::random): conv weights N(0, 1/fan_in), biases
N(0, 0.1^2), BN weight U(0.8, 1.2), running mean N(0, 0.2^2), running var U(0.5, 1.5).
"""
import argparse
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

CONFIGS = {"published": {}, "readme": {"widths": [32, 64, 128, 256, 512]}}


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
