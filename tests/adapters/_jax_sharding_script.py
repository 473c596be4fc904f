"""Run by test_jax_sharding.py in a fresh interpreter with 4 host devices: parameters sharded over a
device mesh (``NamedSharding``; model-parallel Dense kernels and Conv kernels split on their output
axis, biases with them; the batch replicated) give the same updates as unsharded parameters, and the
updates and new parameters keep the parameters' sharding. Checked for MAC, SMAC, KFAC and SINGD in
float32 (relative to the update size) and float64 (``argv[1] == "x64"``)."""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
)
X64 = len(sys.argv) > 1 and sys.argv[1] == "x64"
if X64:
    os.environ["JAX_ENABLE_X64"] = "1"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import maccore_jax as mj  # noqa: E402

DT = jnp.float64 if X64 else jnp.float32
TOL = 1e-10 if X64 else 1e-5  # max |Δ| relative to max |update| of the leaf
STEPS = 5


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), padding="SAME", param_dtype=DT, dtype=DT)(x))
        x = nn.Dense(16, param_dtype=DT, dtype=DT)(x.reshape(x.shape[0], -1))
        x = nn.Dense(8, param_dtype=DT, dtype=DT)(jnp.tanh(x))
        return nn.Dense(3, param_dtype=DT, dtype=DT)(jnp.tanh(x))  # 3 rows: left unsharded


def spec_of(path, leaf, mesh_size):
    """Shard the output axis (last) of kernels and biases whose output size the mesh divides."""
    if leaf.shape[-1] % mesh_size == 0:
        return P(*([None] * (leaf.ndim - 1)), "model")
    return P()


def main():
    assert len(jax.devices()) == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("model",))
    rng = np.random.default_rng(0)
    n = 8
    xs = [jnp.asarray(rng.standard_normal((n, 4, 4, 2)), DT) for _ in range(STEPS)]
    ys = [jnp.asarray(rng.integers(0, 3, n)) for _ in range(STEPS)]
    model = Net()
    params = model.init(jax.random.key(0), xs[0])["params"]
    specs = mj.linen.layer_specs(model, {"params": params}, xs[0])
    shardings = jax.tree_util.tree_map_with_path(
        lambda p, leaf: NamedSharding(mesh, spec_of(p, leaf, 4)), params)
    sharded_params = jax.device_put(params, shardings)
    n_sharded = sum(not s.is_fully_replicated for s in jax.tree.leaves(shardings))
    assert n_sharded == 6, n_sharded  # conv, dense 16, dense 8: kernel and bias each

    def grads_of(p, x, y):
        perts = mj.linen.output_zeros(model, {"params": p}, x)

        def loss(p, q):
            out, acts = mj.linen.apply(model, {"params": p}, x, perturbations=q)
            return optax.softmax_cross_entropy_with_integer_labels(out, y).mean(), acts

        (_, acts), (g, go) = jax.value_and_grad(loss, (0, 1), has_aux=True)(p, perts)
        return g, acts, go

    makers = {
        "mac": lambda: mj.mac(0.1, layers=specs, t_cov=1, t_inv=2, damping=0.5, weight_decay=0.01),
        "smac": lambda: mj.mac(0.1, layers=specs, t_cov=1, t_inv=2, damping=0.5, diagonal=True),
        "kfac": lambda: mj.kfac(0.05, layers=specs, t_cov=1, t_inv=2, damping=0.1),
        "singd": lambda: mj.singd(0.05, layers=specs, T=1, damping=0.1, lr_cov=0.05),
        "singd-diag": lambda: mj.singd(0.05, layers=specs, T=2, damping=0.1, lr_cov=0.05,
                                       structures=("diagonal", "diagonal")),
    }
    baseline = None  # the shardings XLA gives plain SGD's updates (replicated leaves may come out
    #                  sharded along an axis their neighbours are sharded on: propagation, not us)
    for name, make in [("sgd", lambda: optax.sgd(0.1))] + list(makers.items()):
        tx = make()

        @jax.jit
        def step(p, s, x, y):
            g, acts, go = grads_of(p, x, y)
            u, s = tx.update(g, s, p, activations=acts, output_grads=go)
            return optax.apply_updates(p, u), s, u

        if baseline is None:
            _, _, u = step(sharded_params, tx.init(sharded_params), xs[0], ys[0])
            baseline = [leaf.sharding for leaf in jax.tree.leaves(u)]
            for s, b in zip(jax.tree.leaves(shardings), baseline):
                assert s.is_fully_replicated or b.is_equivalent_to(s, len(s.spec)), (b, s)
            continue
        p1, s1 = params, tx.init(params)
        p2, s2 = sharded_params, tx.init(sharded_params)
        worst = 0.0
        for x, y in zip(xs, ys):
            p1, s1, u1 = step(p1, s1, x, y)
            p2, s2, u2 = step(p2, s2, x, y)
            for path_u, a, b in zip(jax.tree_util.tree_leaves_with_path(u1), jax.tree.leaves(u1),
                                    jax.tree.leaves(u2)):
                scale = float(jnp.max(jnp.abs(a)))
                err = float(jnp.max(jnp.abs(a - b))) / max(scale, 1e-30)
                worst = max(worst, err)
                assert err <= TOL, (name, jax.tree_util.keystr(path_u[0]), err)
            for tree in (u2, p2):  # the updates and the new parameters keep the sharding
                for s, b, leaf in zip(jax.tree.leaves(shardings), baseline, jax.tree.leaves(tree)):
                    want = b if s.is_fully_replicated else s
                    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (name, leaf.sharding, want)
        moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                    zip(jax.tree.leaves(p1), jax.tree.leaves(params)))
        assert moved > 1e-3, (name, moved)
        for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):  # the curvature states agree
            a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
            np.testing.assert_allclose(b64, a64, rtol=1e-9 if X64 else 1e-4,
                                       atol=1e-12 if X64 else 1e-5 * max(1.0, np.abs(a64).max()))
        print(f"{name} ok {'float64' if X64 else 'float32'} worst relative update error {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
