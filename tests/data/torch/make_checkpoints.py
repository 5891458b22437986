"""PyTorch checkpoints for `deepis import`'s tests, written by PyTorch itself from the golden weights.

  tiny_trainer.pth.tar          the published trainer's dict ({model_type, start_epoch, network, optimizer,
                                best_metric}), network a DataParallel state_dict (`module.` names), optimizer
                                the state of Adam(lr 5e-5, betas 0.5/0.999) after 2 steps; zip format (PyTorch >= 1.6)
  tiny_trainer_legacy.pth.tar   the same dict in the legacy single-stream format (_use_new_zipfile_serialization=False)
  tiny_adam.safetensors         what the import must give: exp_avg / exp_avg_sq by parameter name, and the step
  tiny_state_dict.pth           a bare state_dict (zip)
  readme_state_dict_legacy.pth  a bare state_dict of the sigmoid / max-pool / input-scaled case (legacy format)
  malicious.pth                 a zip checkpoint whose pickle calls os.system (it would create the file
                                PWNED in the working folder if Python loaded it)
  malicious_legacy.pth          the same in the legacy format

Usage: PYTHONPATH=PATH/TO/reference python3 make_checkpoints.py   (in this folder; torch, numpy, safetensors)
"""
import collections
import json
import os

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import deepis_ref as ref

HERE = os.path.dirname(os.path.abspath(__file__))


def model_of(case):
    path = os.path.join(HERE, "..", case, "weights.safetensors")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        cfg = json.loads(json.loads(f.read(n))["__metadata__"]["config"])
    m = ref.DeepIS(cfg)
    m.load_state_dict(load_file(path), strict=False)
    return m


class Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def main():
    torch.manual_seed(0)
    net = model_of("tiny")
    dp = torch.nn.DataParallel(net)
    x = torch.from_numpy(np.load(os.path.join(HERE, "..", "tiny", "input.npy")))
    opt = torch.optim.Adam(dp.parameters(), lr=5e-5, betas=(0.5, 0.999))
    state = {k: v.clone() for k, v in dp.state_dict().items()}
    for _ in range(2):
        opt.zero_grad()
        out, c3, c4 = dp.module(x, aux=True)
        (out.square().mean() + c3.mean() + c4.mean()).backward()
        opt.step()
    dp.load_state_dict(state)  # the network as in the golden case; the optimizer state after 2 steps
    ckpt = {"model_type": "Unet3D_glob", "start_epoch": 7, "network": dp.state_dict(),
            "optimizer": opt.state_dict(), "best_metric": 0.053456}
    torch.save(ckpt, os.path.join(HERE, "tiny_trainer.pth.tar"))
    torch.save(ckpt, os.path.join(HERE, "tiny_trainer_legacy.pth.tar"), _use_new_zipfile_serialization=False)
    names = [n for n, _ in net.named_parameters()]
    adam = {}
    for i, n in enumerate(names):
        if i not in opt.state_dict()["state"]:  # never had a gradient (ConBR0): no state, as in PyTorch
            continue
        st = opt.state_dict()["state"][i]
        adam["exp_avg." + n] = st["exp_avg"].contiguous()
        adam["exp_avg_sq." + n] = st["exp_avg_sq"].contiguous()
    save_file(adam, os.path.join(HERE, "tiny_adam.safetensors"), metadata={"step": str(int(opt.state_dict()["state"][0]["step"]))})
    torch.save(net.state_dict(), os.path.join(HERE, "tiny_state_dict.pth"))
    torch.save(model_of("readme").state_dict(), os.path.join(HERE, "readme_state_dict_legacy.pth"), _use_new_zipfile_serialization=False)
    evil = collections.OrderedDict(net.state_dict())
    evil["conv1.conv1.0.weight"] = Evil()
    torch.save(evil, os.path.join(HERE, "malicious.pth"))
    torch.save({"network": Evil()}, os.path.join(HERE, "malicious_legacy.pth"), _use_new_zipfile_serialization=False)
    # the malicious files do run a command when Python loads them without weights_only
    import tempfile
    for f in ("malicious.pth", "malicious_legacy.pth"):
        with tempfile.TemporaryDirectory() as tmp:
            cwd = os.getcwd()
            os.chdir(tmp)
            try:
                torch.load(os.path.join(HERE, f), weights_only=False)
            finally:
                os.chdir(cwd)
            assert os.path.exists(os.path.join(tmp, "PWNED")), f
    print(torch.__version__, sorted(os.listdir(HERE)))


if __name__ == "__main__":
    main()
