"""Private ops (torch.ops.reid_ext._*) are reachable by users: no flag combination may crash the process.

Each call runs in a subprocess, so that a crash fails the test instead of killing pytest.
"""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SETUP = """
import torch, reid_ext
ops = torch.ops.reid_ext
n = {n}
x = torch.randn(n, 4, dtype=torch.float64)
w = torch.randn(5, 4, dtype=torch.float64)
labels = torch.arange(n) % 5
"""

# (name, expression, expected shapes of the outputs), with x_requires_grad / weight_requires_grad spelt xg, wg.
COSINE_SOFTMAX = [
    ("forward", "ops.cosine_softmax_loss(x, w, labels, 64., .35, 0., 'mean', {xg}, {wg})",
     lambda n, xg, wg: [(), (n, 4) if xg else (0, 4), (5, 4) if wg else (0, 4), (n,)]),
    ("backward", "ops._cosine_softmax_loss_backward(torch.ones(n, dtype=x.dtype), x, w, labels, "
                 "torch.zeros(n, dtype=x.dtype), 64., .35, 0., 'none', {xg}, {wg})",
     lambda n, xg, wg: [(n, 4) if xg else (0, 4), (5, 4) if wg else (0, 4)]),
]


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("n", [6, 0])
def test_cosine_softmax_private_ops_with_any_wanted_gradients(n):
    calls, expected = [], []
    for name, expr, shapes in COSINE_SOFTMAX:
        for xg in (False, True):
            for wg in (False, True):
                calls.append(f"print([tuple(t.shape) for t in {expr.format(xg=xg, wg=wg)}], flush=True)")
                expected.append(str(shapes(n, xg, wg)))
    proc = run_python(SETUP.format(n=n) + "\n".join(calls))
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{proc.stdout}\n{proc.stderr[-2000:]}"
    assert proc.stdout.split("\n")[:-1] == expected


def test_want_nothing_gradients_are_consistent():
    """With no gradient wanted the op still returns the loss of the public function."""
    code = SETUP.format(n=6) + """
total, gx, gw, lse = ops.cosine_softmax_loss(x, w, labels, 64., .35, 0., 'mean', False, False)
torch.testing.assert_close(total, reid_ext.cosine_softmax_loss(x, w, labels, scale=64., margin=.35))
print("ok")
"""
    proc = run_python(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
