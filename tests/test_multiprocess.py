"""LoRA and QLoRA under a mesh that spans two real processes on localhost
(jax.distributed)."""

import os
import socket
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "multiprocess", "lora_worker.py")


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_sharded_lora_forward_and_grad():
  port, n = _free_port(), 2
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()   # keep conftest's compile flags
           if not f.startswith("--xla_force_host_platform_device_count")]
  env = dict(os.environ, XLA_FLAGS=" ".join(["--xla_force_host_platform_device_count=2", *flags]),
             JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, WORKER, str(port), str(i), str(n)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(n)]
  outs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outs.append((p.returncode, out))
  for i, (rc, out) in enumerate(outs):
    assert rc == 0, f"process {i} failed:\n{out[-3000:]}"
    for kind in ("lora", "qlora"):
      assert f"process {i}: ok ({kind}), 4 global devices, 2 local shards" in out, out[-2000:]
