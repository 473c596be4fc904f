"""The bug zoo: a small user-style KFAC (hooks, im2col, type-II backprop, π-damped update) with one
planted bug at a time. The documented workflow of docs/verify.md — references from
``maccore_torch.testing.curvature_blocks`` and ``maccore.testing.kfac_damped_solve``, compared with
``maccore.testing.assert_curvature_close`` — catches every bug, in float32 and in float64, and the
correct implementation passes in both."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("maccore_torch")

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import maccore  # noqa: E402
from maccore import testing  # noqa: E402
from maccore_torch.testing import curvature_blocks  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BUGS = ("missing_R", "summed_A", "kron_order", "bias_first", "damping_squared", "pi_split", "mc_one_sample")
DAMPING = 0.3


class UserKFAC:
    """What a user might write: KFAC-expand with type-II factors, π-damping, for Linear / Conv2d."""

    def __init__(self, model: nn.Module, bug: str | None = None):
        self.model, self.bug = model, bug
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        self.inputs, self.outputs = {}, {}
        for name, mod in self.layers.items():
            mod.register_forward_hook(self._hook(name))

    def _hook(self, name):
        def fn(mod, args, out):
            self.inputs[name] = args[0].detach()
            self.outputs[name] = out
        return fn

    def _rows(self, mod, x):
        if isinstance(mod, nn.Conv2d):
            x = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
            x = x.transpose(1, 2).reshape(-1, x.shape[1])
        ones = torch.ones(x.shape[0], 1, dtype=x.dtype)
        return torch.cat([ones, x] if self.bug == "bias_first" else [x, ones], dim=1)

    @staticmethod
    def _grad_rows(mod, g):
        if isinstance(mod, nn.Conv2d):
            return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
        return g.reshape(-1, g.shape[-1])

    def factors(self, x, y):
        """Type-II KFAC factors for a mean cross-entropy (R = 1/N)."""
        logits = self.model(x)
        n, c = logits.shape
        R = 1.0 / n
        p = logits.softmax(-1).detach()
        vecs = []
        if self.bug == "mc_one_sample":  # one sampled label instead of the exact loss Hessian
            gen = torch.Generator().manual_seed(0)
            ys = torch.multinomial(p, 1, generator=gen)[:, 0]
            vecs.append(R * (p - F.one_hot(ys, c).to(p.dtype)))
        else:
            for k in range(c):  # columns of the symmetric factor of ∇²c = diag(p) − ppᵀ
                v = p[:, k:k + 1].sqrt() * (F.one_hot(torch.full((n,), k), c).to(p.dtype) - p)
                vecs.append(v if self.bug == "missing_R" else math.sqrt(R) * v)
        outs = [self.outputs[name] for name in self.layers]
        grads = [torch.autograd.grad(logits, outs, grad_outputs=v, retain_graph=True) for v in vecs]
        res = {}
        for i, (name, mod) in enumerate(self.layers.items()):
            rows = self._rows(mod, self.inputs[name])
            A = rows.T @ rows if self.bug == "summed_A" else rows.T @ rows / rows.shape[0]
            G = sum(self._grad_rows(mod, g[i]).T @ self._grad_rows(mod, g[i]) for g in grads)
            if self.bug == "mc_one_sample":
                G = G / R  # the (1/R) of the autograd form
            res[name] = (A.detach(), G.detach())
        return res

    def block(self, A, G):
        return torch.kron(A, G) if self.bug == "kron_order" else torch.kron(G, A)

    def grad_matrix(self, mod):
        gw = mod.weight.grad.reshape(mod.weight.shape[0], -1)
        gb = mod.bias.grad[:, None]
        return torch.cat([gb, gw] if self.bug == "bias_first" else [gw, gb], dim=1)

    def update(self, A, G, grad, lam):
        if self.bug == "damping_squared":
            lam = lam**2
        ta, tg = torch.trace(A), torch.trace(G)
        if self.bug == "pi_split":
            pi = torch.sqrt(ta / tg)  # forgot the dimensions
        else:
            pi = torch.sqrt((ta / A.shape[0]) / (tg / G.shape[0]))
        la, lg = pi * math.sqrt(lam), math.sqrt(lam) / pi
        eye = lambda m: torch.eye(m.shape[0], dtype=m.dtype)  # noqa: E731
        return torch.linalg.solve(G + lg * eye(G), grad) @ torch.linalg.inv(A + la * eye(A))


def _setup(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    x = torch.randn(8, 2, 4, 4)
    y = torch.randint(0, 4, (8,))
    return model.to(dtype), x.to(dtype), y


def _run_workflow(bug: str | None, dtype) -> dict[str, str]:
    """The docs/verify.md workflow; returns {check: failure message} (empty when all pass)."""
    model, x, y = _setup(dtype)
    ref = curvature_blocks(model, nn.CrossEntropyLoss(), x, y, kind="kfac-expand")  # float64
    user = UserKFAC(model, bug)
    mine = user.factors(x, y)
    failures = {}
    # 1. the curvature: the user's Kronecker block against the reference G ⊗ A
    ok, _, msg = testing.curvature_report({n: user.block(A, G) for n, (A, G) in mine.items()},
                                          {n: np.kron(G, A) for n, (A, G) in ref.items()}, dtype=dtype)
    if not ok:
        failures["curvature"] = msg
    # 2. the damped update on a real gradient, against the dense π-damped solve
    model.zero_grad()
    nn.CrossEntropyLoss()(model(x), y).backward()
    for name, mod in user.layers.items():
        A, G = mine[name]
        got = user.update(A, G, user.grad_matrix(mod), DAMPING)
        A_ref, G_ref = ref[name]
        grad_ref = maccore.grad_matrix(testing.to_numpy(mod.weight.grad).reshape(mod.weight.shape[0], -1),
                                       testing.to_numpy(mod.bias.grad))
        want = testing.kfac_damped_solve(grad_ref, A_ref, G_ref, DAMPING, mode="pi")
        cond = testing.kfac_condition_number(A_ref, G_ref, DAMPING, mode="pi")
        ok, _, msg = testing.curvature_report(got, want, dtype=dtype, cond=cond)
        if not ok:
            failures[f"update {name}"] = msg
    return failures


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_correct_user_kfac_passes(dtype):
    assert _run_workflow(None, dtype) == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("bug", BUGS)
def test_every_planted_bug_is_caught(bug, dtype):
    failures = _run_workflow(bug, dtype)
    assert failures, f"{bug} was not caught in {dtype}"
    curvature_bugs = {"missing_R", "summed_A", "kron_order", "bias_first", "mc_one_sample"}
    if bug in curvature_bugs:
        assert "curvature" in failures  # caught where it lives, not only downstream
    else:
        assert "curvature" not in failures and any(k.startswith("update") for k in failures)
    text = "\n".join(failures.values())
    if bug in ("missing_R", "summed_A"):
        assert "pure scale error" in text  # the report names the kind of bug
    if bug in ("kron_order", "bias_first"):
        assert "ordering bug" in text
