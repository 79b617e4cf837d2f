"""Reading a checkpoint tensor by tensor keeps memory at a few tensors, whatever is read."""

import subprocess
import sys

import torch
from safetensors.torch import save_file

SCRIPT = """
import resource, sys
from lorasurgeon.io import open_checkpoint
ckpt = open_checkpoint(sys.argv[1])
ckpt.read(ckpt.names()[0])  # warm up allocator and imports
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for _ in range(2):
    for name in ckpt:
        t = ckpt.read(name)
        del t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - base) * 1024)
"""


def test_peak_memory_is_a_few_tensors_not_the_checkpoint(tmp_path):
    # 48 tensors of 4 MiB = 192 MiB; reading all of them twice may cost a few tensors at most.
    tensors = {f"layers.{i}.weight": torch.full((1024, 1024), float(i)) for i in range(48)}
    save_file(tensors, tmp_path / "model.safetensors")
    del tensors
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, check=True)
    grew = int(out.stdout.strip())
    assert grew < 4 * 4 * 2**20, f"peak RSS grew by {grew / 2**20:.0f} MiB while reading 192 MiB"
