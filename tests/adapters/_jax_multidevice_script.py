"""Run by test_jax_multidevice.py in a fresh interpreter with 2 host devices: MAC, SMAC and KFAC
trained under shard_map (batch split over 2 devices, statistics averaged with axis_name) must
follow the single-device trajectory on the full batch.

SMAC's gradient statistic E_rows[g⊙g] is not renormalised by the batch size: each device's loss is
its local mean and the gradients are pmean-ed, so its output-gradient rows are W times those of the
effective (global-mean) loss; the adapter divides them by the size of ``axis_name``."""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

import maccore_jax as mj  # noqa: E402

F32 = jnp.float32


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(3, (3, 3), strides=2, padding="SAME", param_dtype=F32)(x))
        x = nn.Dense(4, param_dtype=F32)(x.mean(axis=(1, 2)))
        return nn.Dense(2, param_dtype=F32)(jnp.tanh(x))


def main():
    assert len(jax.devices()) == 2, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    rng = np.random.default_rng(0)
    n = 8
    xs = [jnp.asarray(rng.standard_normal((n, 6, 6, 2)), F32) for _ in range(4)]
    ys = [jnp.asarray(rng.standard_normal((n, 2)), F32) for _ in range(4)]
    model = CNN()
    variables = model.init(jax.random.key(0), xs[0])
    params = variables["params"]
    specs = mj.linen.layer_specs(model, variables, xs[0])

    def grads_of(p, x, y):
        perts = mj.linen.output_zeros(model, {"params": p}, x)

        def loss(p, q):
            out, acts = mj.linen.apply(model, {"params": p}, x, perturbations=q)
            return jnp.mean(jnp.sum((out - y) ** 2, -1)), acts

        (_, acts), (g, go) = jax.value_and_grad(loss, (0, 1), has_aux=True)(p, perts)
        return g, acts, go

    for name in ("mac", "smac", "kfac"):

        def make(axis_name=None):
            kw = dict(layers=specs, t_cov=1, t_inv=2, weight_decay=0.01, axis_name=axis_name)
            if name == "mac":
                return mj.mac(0.1, **kw)
            if name == "smac":  # damping small against ẑ ~ E[g⊙g]: sensitive to its scale
                return mj.mac(0.05, damping=0.02, diagonal=True, **kw)
            return mj.kfac(0.05, damping=0.1, **kw)

        tx1, txd = make(), make("batch")

        @jax.jit
        def single(p, s, x, y):
            g, acts, go = grads_of(p, x, y)
            u, s = tx1.update(g, s, p, activations=acts, output_grads=go, reduction_factor=1.0 / n)
            return optax.apply_updates(p, u), s

        def local(p, s, x, y):
            g, acts, go = grads_of(p, x, y)
            g = jax.lax.pmean(g, "batch")
            u, s = txd.update(
                g, s, p, activations=acts, output_grads=go, reduction_factor=1.0 / x.shape[0]
            )
            return optax.apply_updates(p, u), s

        def sharded(fn):
            # check_vma=False: per-device gradients as under pmap, averaged explicitly with pmean
            return jax.jit(
                jax.shard_map(
                    fn,
                    mesh=mesh,
                    in_specs=(P(), P(), P("batch"), P("batch")),
                    out_specs=(P(), P()),
                    check_vma=False,
                )
            )

        multi = sharded(local)
        p1, s1 = params, tx1.init(params)
        p2, s2 = params, txd.init(params)
        for x, y in zip(xs, ys):
            p1, s1 = single(p1, s1, x, y)
            p2, s2 = multi(p2, s2, x, y)
        def gap(t1, t2):
            return max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                       for a, b in zip(jax.tree.leaves(t1), jax.tree.leaves(t2)))

        print(name, f"max |single - multi|: params {gap(p1, p2):.3g}, state {gap(s1, s2):.3g}")
        for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
            np.testing.assert_allclose(
                np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=2e-4, atol=2e-5
            )
        if (
            name == "mac"
        ):  # negative control: local statistics (no axis_name) give another trajectory
            txd = make()
            p3, _ = sharded(local)(params, txd.init(params), xs[0], ys[0])
            p1, _ = single(params, tx1.init(params), xs[0], ys[0])
            diff = max(
                float(jnp.max(jnp.abs(a - b)))
                for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p3))
            )
            assert diff > 1e-4, diff
        print(name, "ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
