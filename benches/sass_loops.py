#!/usr/bin/env python3
"""The inner loops of the tensor-core kernels in their machine code (SASS), without a GPU.

Reads the cubins of deepis's kernel cache (`deepis kernels` fills it), disassembles them with
cuobjdump, and prints every loop that issues tensor-core instructions (HMMA, HGMMA): its length
in instructions, instructions per tensor-core instruction, how many carry a high word (`.X`:
64-bit integer arithmetic, in these loops address arithmetic), how many touch local memory
(LDL / STL), and its instruction mix. These are
static counts of the code, not timings: they show what each loop asks of the issue slots and how
much of it is address arithmetic, before any GPU runs it.

    python3 -m pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm   # ~1 MB, no GPU needed
    DEEPIS_CACHE_DIR=/tmp/kc deepis kernels --arch sm_80,sm_90
    python3 benches/sass_loops.py /tmp/kc [FILE [KERNEL...]]           # FILE default conv3d_tc

A loop is a backward branch and the instructions it jumps over; nested loops are all printed,
innermost (shortest) first. cuobjdump is taken from $CUOBJDUMP, else from the nvidia-cuda-cuobjdump
wheel of this python3 (nvdisasm likewise, which cuobjdump runs), else from PATH;
`sass_loops.py --tool cuobjdump` prints where (exit 3 when it is nowhere).
"""
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

MAGIC = b"DEEPISCUBIN\0"
HEADER = 12 + 4 + 32 + 8 + 8 + 32  # magic, format, key, log length, cubin length, digest


def cubin_of(path):
    """The ELF cubin of one cache entry (src/gpu/nvrtc/cache.rs: header, log, cubin)."""
    b = open(path, "rb").read()
    if b[:12] != MAGIC or len(b) < HEADER:
        raise SystemExit(f"{path}: not a deepis cubin cache entry")
    log_len = int.from_bytes(b[48:56], "little")
    cubin_len = int.from_bytes(b[56:64], "little")
    cubin = b[HEADER + log_len:HEADER + log_len + cubin_len]
    if len(cubin) != cubin_len or cubin[:4] != b"\x7fELF":
        raise SystemExit(f"{path}: truncated entry")
    return cubin


def tool(name, env):
    """A CUDA binary tool: $ENV, the nvidia-cuda-<name> wheel's, or PATH's."""
    if os.environ.get(env):
        return os.environ[env]
    try:
        import nvidia  # the namespace package of NVIDIA's wheels

        for root in nvidia.__path__:
            hits = glob.glob(os.path.join(root, "*", "bin", name))
            if hits:
                return hits[0]
    except ImportError:
        pass
    found = shutil.which(name)
    if not found:
        print(f"no {name}: python3 -m pip install nvidia-cuda-{name} (or set ${env})", file=sys.stderr)
        sys.exit(3)  # tests/sass.rs: the tool is missing (not a failure of the code)
    return found


def functions(sass):
    """{kernel: [(address, opcode, text)]} of cuobjdump -sass output."""
    out, fn = collections.defaultdict(list), None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            fn = m.group(1)
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m and fn:
            text = re.sub(r"^@!?U?P[0-9T]\s+", "", m.group(2).strip())
            out[fn].append((int(m.group(1), 16), text.split()[0], text))
    return out


def tensor_loops(code):
    """(start, end, body) of each loop that holds HMMA or HGMMA, shortest first; body: the
    (opcode with its modifiers, text) of its instructions."""
    loops = []
    for addr, op, text in code:
        m = re.search(r"0x([0-9a-f]+)", text) if op.startswith("BRA") else None
        if m and int(m.group(1), 16) < addr:
            start = int(m.group(1), 16)
            body = [(o, t) for a, o, t in code if start <= a <= addr]
            if any(o.split(".")[0] in ("HMMA", "HGMMA") for o, _ in body):
                loops.append((start, addr, body))
    return sorted(loops, key=lambda l: len(l[2]))


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    if sys.argv[1] == "--tool" and len(sys.argv) == 3:
        print(tool(sys.argv[2], sys.argv[2].upper()))
        return
    cache, file = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "conv3d_tc"
    kernels = set(sys.argv[3:])
    entries = sorted(glob.glob(os.path.join(cache, "cubin", f"{file}.*.cubin")))
    if not entries:
        raise SystemExit(f"no {file} cubins in {cache}/cubin: run `DEEPIS_CACHE_DIR={cache} deepis kernels` first")
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(tool("nvdisasm", "NVDISASM")) + os.pathsep + env.get("PATH", "")
    cuobjdump = tool("cuobjdump", "CUOBJDUMP")
    for entry in entries:
        arch = os.path.basename(entry).split(".")[1]
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin_of(entry))
            f.flush()
            sass = subprocess.run([cuobjdump, "-sass", f.name], env=env, capture_output=True, text=True, check=True).stdout
        for fn, code in sorted(functions(sass).items()):
            if kernels and fn not in kernels:
                continue
            for start, end, body in tensor_loops(code):
                mix = collections.Counter(o.split(".")[0] for o, _ in body)
                n, tc = len(body), mix["HMMA"] + mix["HGMMA"]
                wide = sum("X" in o.split(".")[1:] for o, _ in body)
                local = mix["LDL"] + mix["STL"]
                top = ", ".join(f"{k} {v}" for k, v in mix.most_common(8))
                print(f"{arch:7} {fn:24} loop {start:#06x}..{end:#06x}: {n:5} instructions, {tc:3} tensor, {n / tc:5.2f} per tensor, "
                      f"{wide:3} with a carry (.X), {local} local: {top}")


if __name__ == "__main__":
    main()
