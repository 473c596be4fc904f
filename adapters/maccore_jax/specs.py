"""Layer discovery and layout conversion: pytrees of Flax/Equinox parameters ↔ the core's canonical arrays.

A *layer* is a node of the parameter tree that holds a weight leaf — ``kernel`` in the Flax layout
(``[d_in, d_out]`` dense, HWIO conv, NHWC inputs), ``weight`` in the Equinox layout (``[d_out, d_in]``
dense, OIHW conv, NCHW inputs) — and optionally a ``bias`` leaf. Layers are named by their path in
the tree joined with ``/`` (``"Block_0/Dense_1"``, ``"layers/0"``). The layout is declared, never
inferred; conv geometry is declared per layer (:class:`Conv`) because parameters do not carry it.
Everything here is shape bookkeeping; the maths is in :mod:`maccore`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import maccore
from maccore import LayerKind, QkvSpec

__all__ = [
    "AttentionInput", "Dense", "Conv", "QKV", "Layer", "LAYOUTS", "Skipped", "coverage",
    "layer_name", "discover", "lookup", "skip_names", "split_attention",
]

LAYOUTS = {"flax": "kernel", "equinox": "weight"}
QKV = QkvSpec  # maccore_jax.QKV(num_heads=..., mode="reference"|"per_head"|"off", causal=False)
# a value projection of separate q/k/v projections: QKV(num_heads=H, layout="v", num_kv_heads=...)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class AttentionInput:
    """The activation entry of an attention VALUE projection (``QKV(..., layout="v")``): its input
    ``x`` ``[B, N, d]`` and the attention probabilities ``probs`` ``[B, H, N, N]`` of its attention
    module (as the model computed them: masks, causal flags and key padding included). The capture
    helpers (:mod:`maccore_jax.nnx`, :mod:`maccore_jax.equinox`) return it in ``acts``; a layer
    declared as a plain :class:`Dense` uses ``x`` only."""

    x: Any
    probs: Any


def _is_attention_input(x: Any) -> bool:
    return isinstance(x, AttentionInput)


def split_attention(entries: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``{name: array | AttentionInput}`` → ``({name: array}, {name: probabilities})``."""
    xs, probs = {}, {}
    for n, a in entries.items():
        if isinstance(a, AttentionInput):
            xs[n], probs[n] = a.x, a.probs
        else:
            xs[n] = a
    return xs, probs


@dataclass(frozen=True)
class Dense:
    """A dense layer (the default for every 2-D weight); inputs ``[..., d_in]``.

    ``in_ndim``: for a Flax ``DenseGeneral`` / NNX ``LinearGeneral`` kernel ``[*in, *out]`` (e.g.
    ``[E, H, d_h]`` with ``in_ndim=1``, ``[H, d_h, E]`` with ``in_ndim=2``), the number of leading
    kernel axes contracted with the TRAILING axes of the input; the kernel is flattened to the
    matrix ``[prod(in), prod(out)]``, the input to ``[..., prod(in)]`` and the output gradient to
    ``[..., prod(out)]``."""

    in_ndim: int = 1


@dataclass(frozen=True, kw_only=True)
class Conv:
    """Geometry of a 2-D convolution. ``padding``: ``"SAME"``/``"VALID"`` (``lax`` semantics, any
    stride), an int, ``(ph, pw)`` or ``((top, bottom), (left, right))``. ``groups`` 1 or C_in."""

    padding: Any
    stride: Any = 1
    dilation: Any = 1
    groups: int = 1


@dataclass(frozen=True)
class Layer:
    """One discovered layer (static; rebuilt from the tree structure at trace time)."""

    name: str
    kind: LayerKind
    layout: str
    weight_shape: tuple[int, ...]
    d_in: int  # without the bias column
    d_out: int
    has_bias: bool
    weight_index: int  # leaf indices in the flattened tree
    bias_index: int | None
    conv: Conv | None = None
    qkv: QkvSpec | None = None
    bias_shape: tuple[int, ...] | None = None  # equinox conv biases are [C_out, 1, 1]
    in_ndim: int = 1  # dense: kernel axes contracted with the input (DenseGeneral / LinearGeneral)

    @property
    def d_tilde(self) -> int:
        return self.d_in + int(self.has_bias)

    # ---- gradients <-> grad_mat [d_out, d̃] ------------------------------------------------------
    def _canonical_shape(self) -> tuple[int, ...]:
        s = self.weight_shape
        if self.layout == "equinox":
            return s
        return (s[1], s[0]) if self.kind is LayerKind.LINEAR else (s[3], s[2], s[0], s[1])

    @property
    def general(self) -> bool:
        """A dense kernel of rank > 2 (flattened to ``[d_in, d_out]``)."""
        return self.kind is LayerKind.LINEAR and len(self.weight_shape) != 2

    def grad_mat(self, gw: Any, gb: Any) -> Any:
        if self.general:  # flax layout [*in, *out] -> [d_out, d_in]
            return maccore.grad_matrix(jnp.reshape(gw, (self.d_in, self.d_out)).T,
                                       None if gb is None else gb.reshape(-1))
        if self.layout == "flax":
            gw = (
                gw.T if self.kind is LayerKind.LINEAR else jnp.transpose(gw, (3, 2, 0, 1))
            )  # HWIO→OIHW
        return maccore.grad_matrix(gw, None if gb is None else gb.reshape(-1))

    def split(self, mat: Any) -> tuple[Any, Any]:
        if self.general:
            w, b = maccore.split_grad_matrix(mat, (self.d_out, self.d_in), bias=self.has_bias)
            return (jnp.reshape(w.T, self.weight_shape),
                    None if b is None else b.reshape(self.bias_shape))
        w, b = maccore.split_grad_matrix(mat, self._canonical_shape(), bias=self.has_bias)
        if self.layout == "flax":
            w = (
                w.T if self.kind is LayerKind.LINEAR else jnp.transpose(w, (2, 3, 1, 0))
            )  # OIHW→HWIO
        return w, None if b is None else b.reshape(self.bias_shape)

    # ---- inputs and output gradients -------------------------------------------------------------
    def nchw(self, a: Any, *, output: bool = False) -> Any:
        """A conv layer's input or output gradient in the core's NCHW layout (Flax arrays are NHWC);
        a general dense layer's input ``[..., *in]`` (``output=True``: output gradient
        ``[..., *out]``) flattened to ``[..., d_in]`` (``[..., d_out]``); any other array as it
        is."""
        if self.kind is LayerKind.CONV2D and self.layout == "flax":
            return jnp.transpose(a, (0, 3, 1, 2))
        if self.general:
            k = len(self.weight_shape) - self.in_ndim if output else self.in_ndim
            return jnp.reshape(a, tuple(a.shape[: a.ndim - k]) + (self.d_out if output else self.d_in,))
        return a

    def core_spec(self, x_nchw: Any | None = None) -> maccore.LayerSpec:
        """The :class:`maccore.LayerSpec` of this layer. A conv layer's geometry (its padding may
        depend on the input size) needs the NCHW input ``x_nchw``; without it the spec carries the
        sizes only (enough for ``init`` and ``apply``)."""
        conv = None
        if self.kind is LayerKind.CONV2D and x_nchw is not None:
            c = self.conv
            k = self._canonical_shape()[2:]
            conv = maccore.ConvSpec(
                k,
                stride=c.stride,
                dilation=c.dilation,
                groups=c.groups,
                padding=_resolve_padding(c, x_nchw.shape[2:], k),
            )
        return maccore.LayerSpec(
            self.kind, self.d_in, self.d_out, self.has_bias, conv=conv, qkv=self.qkv, name=self.name
        )

    def check_input(self, x: Any, what: str = "activations") -> None:
        shape = list(getattr(x, "shape", ()))
        w = list(self.weight_shape)
        if self.general:
            ins = list(self.weight_shape[: self.in_ndim])
            ok = len(shape) >= len(ins) and shape[len(shape) - len(ins):] == ins
            want = f"[..., {', '.join(map(str, ins))}]"
            if self.qkv is not None:  # an attention value projection: [B, N, *in]
                ok = ok and len(shape) == 2 + len(ins)
                want = f"[B, N, {', '.join(map(str, ins))}]"
        elif self.kind is LayerKind.LINEAR:
            ok = (
                len(shape) >= 1 and shape[-1] == self.d_in and (self.qkv is None or len(shape) == 3)
            )
            want = f"[..., {self.d_in}]" if self.qkv is None else f"[B, N, {self.d_in}]"
        else:
            cin = (
                self.d_in
                // (self._canonical_shape()[2] * self._canonical_shape()[3])
                * self.conv.groups
            )
            ch = 3 if self.layout == "flax" else 1
            ok = len(shape) == 4 and shape[ch] == cin
            want = (
                "[N, H, W, %d] (NHWC)" % cin
                if self.layout == "flax"
                else "[N, %d, H, W] (NCHW)" % cin
            )
        if not ok:
            raise ValueError(
                f"layer {self.name!r}: {what} of shape {shape} do not fit its weight {w} "
                f"(expected {want})"
            )

    def check_output_grad(self, x: Any, g: Any) -> None:
        xs, gs = list(x.shape), list(getattr(g, "shape", ()))
        if self.general:
            want = xs[: len(xs) - self.in_ndim] + list(self.weight_shape[self.in_ndim:])
        elif self.kind is LayerKind.LINEAR:
            want = xs[:-1] + [self.d_out]
        else:
            spec = self.core_spec(self.nchw(x))
            c = spec.conv
            oh, ow = maccore.conv2d_output_size(
                tuple(self.nchw(x).shape[2:]),
                c.kernel_size,
                stride=c.stride,
                padding=c.padding,
                dilation=c.dilation,
            )
            want = (
                [xs[0], oh, ow, self.d_out]
                if self.layout == "flax"
                else [xs[0], self.d_out, oh, ow]
            )
        if gs != want:
            raise ValueError(
                f"layer {self.name!r}: output_grads of shape {gs} do not match its output "
                f"{want} (input {xs}, weight {list(self.weight_shape)})"
            )

    def forward(self, x: Any, w: Any, b: Any) -> Any:
        """Output of a dense layer (used to recompute a fused qkv projection's attention)."""
        y = x @ (w if self.layout == "flax" else w.T)
        return y if b is None else y + b


def _resolve_padding(c: Conv, hw: tuple[int, ...], k: tuple[int, ...]) -> Any:
    if not isinstance(c.padding, str):
        return c.padding
    mode = c.padding.upper()
    if mode == "VALID":
        return ((0, 0), (0, 0))
    if mode != "SAME":
        raise ValueError(
            f"Conv padding {c.padding!r} is not supported (use 'SAME', 'VALID' or explicit pads)"
        )
    st = maccore.ConvSpec(k, stride=c.stride, dilation=c.dilation)
    pads = []
    for n, kk, s, d in zip(hw, k, st.stride, st.dilation):
        out = -(-n // s)
        total = max((out - 1) * s + d * (kk - 1) + 1 - n, 0)
        pads.append((total // 2, total - total // 2))
    return tuple(pads)


# ---- paths ---------------------------------------------------------------------------------------
def _key(k: Any) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return str(k)


def layer_name(path: Any) -> str:
    """``/``-joined name of a key path (a tuple of jax path entries, or of plain keys)."""
    if isinstance(path, str):
        return path
    return "/".join(str(_key(k)) for k in path)


def _keys(path: tuple) -> tuple:
    keys = tuple(_key(k) for k in path)
    # an nnx Variable leaf is reached through its ``.value`` attribute
    if len(keys) > 1 and keys[-1] == "value" and type(path[-1]).__name__ == "GetAttrKey":
        keys = keys[:-1]
    return keys


def lookup(tree: Any, what: str) -> dict[str, Any]:
    """Map layer names to the arrays of ``tree`` (nested like the params, or a flat ``{name: array}``)."""
    if tree is None:
        return {}
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_attention_input)[0]
    out = {}
    for path, leaf in flat:
        name = "/".join(str(k) for k in _keys(path))
        if name in out:
            raise ValueError(f"{what}: two entries for layer {name!r}")
        out[name] = leaf
    return out


_UNSET = object()


def skip_names(skip: Iterable[str] | None) -> list[str]:
    """The layer names of ``skip_layers`` (an iterable of names, as for ``maccore_torch``)."""
    if skip is None:
        return []
    names = None if isinstance(skip, str) else list(skip)
    if names is None or not all(isinstance(n, str) for n in names):
        raise TypeError(f"skip_layers must be a list of layer names, got {skip!r}")
    return names


def discover(
    tree: Any,
    *,
    layout: str,
    layers: Mapping[str, Any] | None = None,
    attention: Mapping[str, QkvSpec] | None = None,
    skip: Iterable[str] | None = None,
    undeclared: list | None = None,
) -> tuple[dict[str, Layer], list, Any]:
    """Find the preconditioned layers of a params/gradients tree.

    Returns ``(layers, leaves, treedef)``: ``layers`` maps names to :class:`Layer` (in tree order),
    ``leaves`` are the flattened leaves that ``Layer.weight_index``/``bias_index`` index.
    ``layers`` entries: :class:`Dense`, :class:`Conv`, :data:`QKV` or ``None`` (not preconditioned);
    a 2-D weight defaults to :class:`Dense`, a 4-D weight needs a :class:`Conv` entry; an
    undeclared weight of another rank (e.g. a 3-D ``DenseGeneral`` kernel: declare it with
    ``Dense(in_ndim=...)``) is left unpreconditioned and its name appended to ``undeclared`` (for
    :func:`coverage`, which warns). ``skip``: layer names left unpreconditioned (as
    ``layers={name: None}``; wins over ``attention``).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    wkey = LAYOUTS[layout]
    cfg = {layer_name(k): v for k, v in (layers or {}).items()}
    for k, v in (attention or {}).items():
        if not isinstance(v, QkvSpec):
            raise TypeError(f"attention[{layer_name(k)!r}] must be a maccore_jax.QKV, got {v!r}")
        cfg[layer_name(k)] = v
    cfg.update({name: None for name in skip_names(skip)})
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    nodes: dict[tuple, dict[str, int]] = {}
    for i, (path, _) in enumerate(flat):
        keys = _keys(path)
        if keys and keys[-1] in (wkey, "bias"):
            nodes.setdefault(keys[:-1], {})[keys[-1]] = i
    leaves = [leaf for _, leaf in flat]
    found: dict[str, Layer] = {}
    seen = set()
    for node, members in nodes.items():
        if wkey not in members:
            continue
        name = "/".join(str(k) for k in node)
        seen.add(name)
        w = leaves[members[wkey]]
        shape = tuple(int(s) for s in w.shape)
        spec = cfg.get(name, _UNSET)
        if spec is None or (spec is _UNSET and len(shape) < 2):
            continue  # excluded, or a 1-D scale such as a LayerNorm weight
        if spec is _UNSET:
            if len(shape) == 4:
                raise ValueError(
                    f"layer {name!r} has a 4-D {wkey} {list(shape)}: declare it with "
                    f"layers={{{name!r}: maccore_jax.Conv(padding=..., stride=...)}} or "
                    f"exclude it with layers={{{name!r}: None}}"
                )
            if len(shape) != 2:  # e.g. a DenseGeneral / LinearGeneral kernel: declared or skipped
                if undeclared is not None:
                    undeclared.append(name)
                continue
            spec = Dense()
        bias_shape = tuple(leaves[members["bias"]].shape) if "bias" in members else None
        found[name] = _make_layer(name, spec, shape, layout, wkey, members, bias_shape)
    unknown = sorted(set(cfg) - seen)
    if unknown:
        raise ValueError(
            f"layers/attention/skip_layers name unknown layers {unknown}; the tree has layers "
            f"{sorted(seen)} (layout={layout!r})"
        )
    if (
        not found
        and not seen
        and any(_keys(p)[-1:] == ({"kernel": "weight", "weight": "kernel"}[wkey],) for p, _ in flat)
    ):
        other = "equinox" if layout == "flax" else "flax"
        raise ValueError(
            f"no '{wkey}' leaves found for layout={layout!r}; did you mean layout={other!r}?"
        )
    return found, leaves, treedef


def _make_layer(name, spec, shape, layout, wkey, members, bias_shape) -> Layer:
    has_bias = "bias" in members
    common = dict(
        name=name,
        layout=layout,
        weight_shape=shape,
        has_bias=has_bias,
        weight_index=members[wkey],
        bias_index=members.get("bias"),
        bias_shape=bias_shape,
    )
    if isinstance(spec, (Dense, QkvSpec)):
        k = spec.in_ndim if isinstance(spec, Dense) else 1
        value = isinstance(spec, QkvSpec) and spec.layout == "v"
        if (isinstance(spec, Dense) or value) and len(shape) > 2 and layout == "flax" and 1 <= k < len(shape):
            d_in, d_out = _prod(shape[:k]), _prod(shape[k:])
            qkv = _value_spec(name, spec, d_out) if value else None
            return Layer(kind=LayerKind.LINEAR, d_in=d_in, d_out=d_out, in_ndim=k, qkv=qkv, **common)
        if len(shape) != 2 or k != 1:
            raise ValueError(
                f"layer {name!r}: declared {spec!r} but its {wkey} has shape {list(shape)} (expected "
                f"2-D, or a Flax-layout kernel [*in, *out] with 1 <= in_ndim < {len(shape)})"
            )
        d_in, d_out = shape if layout == "flax" else shape[::-1]
        if value:
            return Layer(kind=LayerKind.LINEAR, d_in=d_in, d_out=d_out,
                         qkv=_value_spec(name, spec, d_out), **common)
        qkv = spec if isinstance(spec, QkvSpec) and spec.mode != "off" else None
        if qkv is not None and d_out % (3 * qkv.num_heads):
            raise ValueError(
                f"layer {name!r}: {d_out} outputs are not divisible by 3 · num_heads = "
                f"{3 * qkv.num_heads}"
            )
        return Layer(kind=LayerKind.LINEAR, d_in=d_in, d_out=d_out, qkv=qkv, **common)
    if isinstance(spec, Conv):
        if len(shape) != 4:
            raise ValueError(
                f"layer {name!r}: declared Conv but its {wkey} has shape {list(shape)} "
                "(expected 4-D: HWIO for flax, OIHW for equinox)"
            )
        kh, kw, cin, cout = shape if layout == "flax" else (shape[2], shape[3], shape[1], shape[0])
        if spec.groups != 1 and cin != 1:
            raise ValueError(
                f"layer {name!r}: only groups=1 and depthwise convs are supported, got "
                f"groups={spec.groups} with weight {list(shape)}"
            )
        d_in = kh * kw if spec.groups != 1 else cin * kh * kw
        return Layer(kind=LayerKind.CONV2D, d_in=d_in, d_out=cout, conv=spec, **common)
    raise TypeError(
        f"layers[{name!r}] must be maccore_jax.Dense(), Conv(...), QKV(...) or None, got {spec!r}"
    )


def _value_spec(name: str, spec: QkvSpec, d_out: int) -> QkvSpec | None:
    """The spec of a value projection (``layout="v"``): ``None`` (a plain dense layer) with
    ``mode="off"``; per head, its ``d_out`` rows must split into the H_kv value heads."""
    if spec.mode == "off":
        return None
    if spec.mode == "per_head" and d_out % spec.kv_heads:
        raise ValueError(
            f"layer {name!r}: {d_out} outputs are not divisible by the {spec.kv_heads} value heads "
            "(num_kv_heads) of its per-head attention factors"
        )
    return spec


def _prod(xs: Iterable[int]) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


@dataclass(frozen=True)
class Skipped:
    """A parameter leaf no preconditioner handles, and why."""

    parameter: str
    shape: tuple
    reason: str
    suspicious: bool = False  # looks like a linear map (weight of rank >= 2) but is not handled


def coverage(
    tree: Any,
    *,
    layout: str = "flax",
    layers: Mapping[str, Any] | None = None,
    attention: Mapping[str, QkvSpec] | None = None,
    skip: Iterable[str] | None = None,
) -> tuple[dict[str, Layer], list[Skipped]]:
    """``(layers, skipped)``: the preconditioned layers of ``tree`` and every other leaf with the
    reason it is not preconditioned (``suspicious``: a weight of rank 3 or more nobody declared)."""
    undeclared: list = []
    found, leaves, _ = discover(tree, layout=layout, layers=layers, attention=attention, skip=skip,
                                undeclared=undeclared)
    wkey = LAYOUTS[layout]
    claimed = {i for l in found.values() for i in (l.weight_index, l.bias_index) if i is not None}
    excluded = {layer_name(k) for k, v in (layers or {}).items() if v is None}
    skipped = set(skip_names(skip))
    out = []
    for i, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0]):
        if i in claimed or not hasattr(leaf, "shape"):
            continue
        keys = _keys(path)
        name = "/".join(str(k) for k in keys)
        node = "/".join(str(k) for k in keys[:-1])
        shape = tuple(int(d) for d in leaf.shape)
        suspicious = False
        if node in skipped:
            reason = "skip_layers"
        elif node in excluded:
            reason = "layers[...] = None"
        elif node in undeclared and keys[-1] in (wkey, "bias"):
            suspicious = keys[-1] == wkey
            what = f"{len(shape)}-D {wkey}" if suspicious else f"bias of a {wkey}"
            reason = (f"{what} of rank != 2 not declared: a DenseGeneral/LinearGeneral kernel "
                      f"[*in, *out] is preconditioned with layers={{{node!r}: "
                      f"maccore_jax.Dense(in_ndim=...)}}; or skip_layers=[{node!r}]")
        elif keys[-1] == "embedding":
            reason = "embedding (a lookup, not a linear map of a layer input)"
        elif len(shape) >= 3 and shape[0] == 1:
            reason = (f"{len(shape)}-D leaf {keys[-1]!r} {list(shape)} broadcast over the batch (a class "
                      f"token, position embedding, …): added, not a linear map")
        elif len(shape) >= 2:
            suspicious = True
            reason = (f"{len(shape)}-D leaf {keys[-1]!r} is not a '{wkey}' of a layer "
                      f"(layout={layout!r}); not preconditioned")
        else:
            reason = f"{len(shape)}-D {keys[-1]!r} (scale/shift)"
        out.append(Skipped(name, shape, reason, suspicious))
    return found, out
