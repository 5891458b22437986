"""The published loss schedule on the golden cases: for each case, the oracle's train_loss (float64,
training mode, dropout off, weight.npy as the weight map) with the loss weights of epochs 0, 50, 100
and 150, and the three terms, in CASE/losses_by_epoch.json; for tiny also every gradient of the
epoch-150 step in tiny/train_step_e150.safetensors; and the fair peer's error (DESIGN.md: a float32
engine is judged by being no further from the float64 oracle than PyTorch float32 is): for every
gradient of train_step.safetensors, max|a-e| / max(1e-3, max|e|) of PyTorch float32 on the stored
numbers, in CASE/peer_f32_err.json.

The deep-supervision labels are the oracle's own aux3.npy / aux4.npy (aux_labels of the unrounded
float64 target): aux_labels of target.npy (float32) read back as float64 would put the voxels at
distance exactly 0.1 (0.1f32 > 0.1) on the other side of the threshold.

Usage: PYTHONPATH=PATH/TO/reference python3 make_epochs.py TESTS_DATA_DIR   (torch numpy safetensors)
"""
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import deepis_ref as ref

EPOCHS = (0, 50, 100, 150)


def load_case(d):
    with open(os.path.join(d, "weights.safetensors"), "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        cfg = json.loads(json.loads(f.read(n))["__metadata__"]["config"])
    model = ref.DeepIS(cfg).double()
    model.load_state_dict({k: v.double() for k, v in load_file(os.path.join(d, "weights.safetensors")).items()}, strict=False)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    t = lambda f: torch.from_numpy(np.load(os.path.join(d, f))).double()
    return model, t("input.npy"), t("target.npy"), t("weight.npy")


def terms(model, x, target, weight):
    """(head term, CE3, CE4): train_loss with unit weights on one term at a time."""
    return [ref.train_loss(model, x, target, weight, w).item() for w in ((1, 0, 0), (0, 1, 0), (0, 0, 1))]


def main(out):
    torch.set_num_threads(2)
    for case in ("tiny", "small", "readme", "mid"):
        d = os.path.join(out, case)
        model, x, target, weight = load_case(d)
        stored = {np.load(os.path.join(d, f)).shape[1:]: torch.from_numpy(np.load(os.path.join(d, f))) for f in ("aux3.npy", "aux4.npy")}
        ref.aux_labels = lambda target, head, size: stored[tuple(size)]
        main_t, ce3, ce4 = terms(model, x, target, weight)
        rec = {"head": main_t, "ce3": ce3, "ce4": ce4, "epochs": {}}
        for e in EPOCHS:
            rec["epochs"][str(e)] = {"weights": list(ref.loss_weights(e)),
                                     "loss": ref.train_loss(model, x, target, weight, ref.loss_weights(e)).item()}
        with open(os.path.join(d, "losses_by_epoch.json"), "w") as f:
            json.dump(rec, f, indent=1)
        print(case, json.dumps(rec))
        golden = load_file(os.path.join(d, "train_step.safetensors"))
        m32 = model.float()
        m32.zero_grad()
        ref.train_loss(m32, x.float(), target.float(), weight.float(), ref.loss_weights(0)).backward()
        peer = {n: float((q.grad.double() - golden["grad." + n].double()).abs().max() / max(golden["grad." + n].abs().max().item(), 1e-3))
                for n, q in m32.named_parameters() if q.grad is not None}
        with open(os.path.join(d, "peer_f32_err.json"), "w") as f:
            json.dump(peer, f, indent=0, sort_keys=True)
        model = model.double()
        if case == "tiny":
            model.zero_grad()
            loss = ref.train_loss(model, x, target, weight, ref.loss_weights(150))
            loss.backward()
            g = {"loss": loss.detach().float().reshape(1)}
            g.update({"grad." + n: q.grad.float().contiguous() for n, q in model.named_parameters() if q.grad is not None})
            save_file(g, os.path.join(d, "train_step_e150.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
