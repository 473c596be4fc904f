"""Layer discovery by module TYPE (never by name substrings): which modules get a preconditioner.

``layer_spec(module, name="")`` is a :func:`functools.singledispatch` function returning the core
:class:`maccore.LayerSpec` of a module, or ``None`` for types maccore has no rule for (their
parameters are trained unpreconditioned). Registered: ``nn.Linear`` (any leading dims) and
``nn.Conv2d`` (stride, padding incl. ``"same"``, dilation, depthwise). ``nn.MultiheadAttention`` is
recognised by type in :func:`discover_layers` (its ``in_proj`` as a fused qkv projection, its
``out_proj`` fed from the recomputed attention context). Register your own type with::

    @maccore_torch.layer_spec.register(MyDense)
    def _(module, name=""):
        return maccore.LayerSpec(maccore.LayerKind.LINEAR, module.d_in, module.d_out,
                                 has_bias=module.bias is not None, name=name)

(the module must hold ``weight`` ``[d_out, ...]`` and optional ``bias`` and compute
``x @ weight.T + bias`` resp. a zero-padded NCHW convolution). A module storing its weight
TRANSPOSED (``[d_in, d_out]``, computing ``x @ weight + bias``, e.g. ``transformers``'
``Conv1D``, registered here automatically) also registers ``weight_layout`` returning
``"in_out"``: the driver then hands the core ``weight.grad.T`` (a view; no formula changes).

Coverage (:func:`coverage`): every trainable parameter that no layer claims is listed with the
reason it is skipped; a parameter that LOOKS like a linear map (a weight of rank >= 2 in a module
type without a rule) is "suspicious": a warning by default, an error with ``strict=True``.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from maccore import ConvSpec, LayerKind, LayerSpec, QkvSpec
from maccore.engine import with_first_layer

from maccore_torch.attention import AttentionModule, AttentionSource, check_recomputable, module_heads

__all__ = ["Skipped", "UnsupportedLayerError", "coverage", "discover_layers", "find_attention",
           "layer_spec", "weight_layout"]


class UnsupportedLayerError(ValueError):
    """A recognised layer type in a configuration maccore cannot precondition (names the layer)."""


def _skip_hint(name: str) -> str:
    return f" Pass skip_layers=[{name!r}] to train it unpreconditioned." if name else ""


@functools.singledispatch
def layer_spec(module: nn.Module, name: str = "") -> LayerSpec | None:
    """The core ``LayerSpec`` of ``module``, or ``None`` when its type is not supported."""
    return None


@layer_spec.register(nn.Linear)
def _linear_spec(module: nn.Linear, name: str = "") -> LayerSpec | None:
    if module.in_features == 0:  # an uninitialised LazyLinear
        return None
    return LayerSpec(LayerKind.LINEAR, module.in_features, module.out_features,
                     module.bias is not None, name=name)


@functools.singledispatch
def weight_layout(module: nn.Module) -> str:
    """How ``module.weight`` is stored: ``"out_in"`` (``[d_out, d_in, ...]``, the torch default)
    or ``"in_out"`` (``[d_in, d_out]``, computing ``x @ weight``)."""
    return "out_in"


def _conv1d_spec(module: nn.Module, name: str = "") -> LayerSpec | None:
    """``transformers.pytorch_utils.Conv1D``: a dense layer ``x @ weight + bias``, weight
    ``[nx, nf]`` = ``[d_in, d_out]`` (transposed w.r.t. ``nn.Linear``)."""
    d_in, d_out = (int(s) for s in module.weight.shape)
    return LayerSpec(LayerKind.LINEAR, d_in, d_out, getattr(module, "bias", None) is not None,
                     name=name)


# Third-party types registered the first time discovery meets them (no import of their package).
_LAZY_TYPES = {("transformers.pytorch_utils", "Conv1D"): (_conv1d_spec, "in_out")}


def _register_lazy(cls: type) -> None:
    for klass in cls.__mro__:
        entry = _LAZY_TYPES.get((klass.__module__, klass.__name__))
        if entry is not None and klass not in layer_spec.registry:
            spec_fn, layout = entry
            layer_spec.register(klass)(spec_fn)
            weight_layout.register(klass)(lambda module, _layout=layout: _layout)


@layer_spec.register(nn.Conv2d)
def _conv2d_spec(module: nn.Conv2d, name: str = "") -> LayerSpec | None:
    label = name or "Conv2d"
    if module.padding_mode != "zeros":
        raise UnsupportedLayerError(
            f"{label}: Conv2d with padding_mode={module.padding_mode!r} is not supported (only "
            f"zero padding).{_skip_hint(name)}"
        )
    groups, cin = module.groups, module.in_channels
    if groups != 1 and groups != cin:
        raise UnsupportedLayerError(
            f"{label}: grouped Conv2d with groups={groups} and in_channels={cin} is not supported "
            f"(only groups=1 and depthwise groups=in_channels).{_skip_hint(name)}"
        )
    kh, kw = module.kernel_size
    conv = ConvSpec(kernel_size=module.kernel_size, stride=module.stride, padding=module.padding,
                    dilation=module.dilation, groups=groups, in_channels=cin)
    d_in = kh * kw if groups > 1 else cin * kh * kw
    return LayerSpec(LayerKind.CONV2D, d_in, module.out_channels, module.bias is not None,
                     conv=conv, name=name)


@dataclass(eq=False)
class Layer:
    """One preconditioned weight (plus optional bias) and the modules whose forwards feed it.

    role: ``"linear"``, ``"conv2d"``, ``"qkv"`` (declared fused qkv Linear), ``"mha"`` (the
    in-projection of an ``nn.MultiheadAttention``) or ``"mha_out"`` (its out-projection).
    Several modules share one Layer when they share the weight (tied / reused weights).
    """

    name: str
    role: str
    modules: list
    specs: dict  # id(module) -> LayerSpec (tied modules may differ in conv geometry)
    weight: nn.Parameter
    bias: nn.Parameter | None
    transposed: bool = False  # weight stored [d_in, d_out] (weight_layout "in_out")
    tied: list = field(default_factory=list)  # names of other modules (embeddings) sharing the weight
    # declared with AttentionModule: the module whose returned probabilities feed the V statistics
    attention: AttentionSource | None = None
    state: Any = None  # the layer's state of the preconditioner's maccore.engine.CurvatureMethod
    updates: int = 0  # number of statistics folds (Python mirror of the EMA count: no device sync)
    acc: dict = field(default_factory=dict)  # {key: maccore.engine.Stat} of this step's forwards
    grad_acc: dict = field(default_factory=dict)  # ... and of its backwards (zero_grad drops them)

    @property
    def spec(self) -> LayerSpec:
        return self.specs[id(self.modules[0])]

    @property
    def first_inv(self) -> torch.Tensor | None:
        """MAC: the first layer's fixed inverse ``(A + λI)⁻¹``, kept in the state
        (``MacState.first_inv``); ``None`` otherwise."""
        return getattr(self.state, "first_inv", None)

    @first_inv.setter
    def first_inv(self, inverse: torch.Tensor | None) -> None:
        if inverse is None:
            if self.first_inv is not None:
                self.state = self.state._replace(first_inv=None)
        else:
            self.state = with_first_layer(self.state, inverse)


def _mha_layers(name: str, m: nn.MultiheadAttention, qkv: QkvSpec | None) -> list[Layer]:
    label = name or "MultiheadAttention"
    if not m._qkv_same_embed_dim:
        raise UnsupportedLayerError(
            f"{label}: MultiheadAttention with kdim/vdim != embed_dim (separate q/k/v projection "
            f"weights) is not supported.{_skip_hint(name)}"
        )
    if m.bias_k is not None or m.add_zero_attn:
        raise UnsupportedLayerError(
            f"{label}: MultiheadAttention with add_bias_kv/add_zero_attn is not supported."
            f"{_skip_hint(name)}"
        )
    heads, e = m.num_heads, m.embed_dim
    qkv = QkvSpec(num_heads=heads) if qkv is None else qkv
    if qkv.num_heads != heads:
        raise ValueError(f"attention[{name!r}]: num_heads={qkv.num_heads} but the module has {heads}")
    in_spec = LayerSpec(LayerKind.LINEAR, e, 3 * e, m.in_proj_bias is not None, qkv=qkv,
                        name=f"{name}.in_proj" if name else "in_proj")
    out = m.out_proj
    out_name = f"{name}.out_proj" if name else "out_proj"
    out_spec = LayerSpec(LayerKind.LINEAR, e, e, out.bias is not None, name=out_name)
    return [
        Layer(in_spec.name, "mha", [m], {id(m): in_spec}, m.in_proj_weight, m.in_proj_bias),
        Layer(out_name, "mha_out", [m], {id(m): out_spec}, out.weight, out.bias),
    ]


def discover_layers(
    model: nn.Module,
    *,
    attention: Mapping[str, QkvSpec | AttentionModule] | str | None = None,
    skip: Iterable[str] | None = None,
    param_ids: set[int] | None = None,
) -> list[Layer]:
    """All supported layers of ``model`` in ``named_modules`` order.

    Args:
        attention: ``{module name: QkvSpec}`` declaring fused qkv ``nn.Linear`` layers (output
            layout (3, H, d_h); their probabilities are recomputed from the output); a
            ``MultiheadAttention`` name here sets its mode; ``{attention module name:
            AttentionModule(value=... | qkv=...)}`` declares an attention module whose own
            returned probabilities feed its value (or fused qkv) projection's statistics;
            ``"auto"``: :func:`find_attention` (Hugging Face attention modules).
        skip: module names left unpreconditioned.
        param_ids: ids of the parameters being optimised; layers whose weight is not among them are
            left out (a layer with only one of weight/bias among them is an error).

    Raises:
        UnsupportedLayerError: a recognised type in an unsupported configuration.
        ValueError: unknown names, or parameters tied to a module that is not the same kind of
            layer (e.g. an ``nn.Embedding`` weight reused by an ``nn.Linear`` head).
    """
    if isinstance(attention, str):
        if attention != "auto":
            raise ValueError(f"attention must be a mapping or 'auto', got {attention!r}")
        attention = find_attention(model)
    attention = dict(attention or {})
    skip = set(skip or ())
    named = list(model.named_modules())
    names = {n for n, _ in named}
    for kind, keys in (("attention", attention), ("skip_layers", skip)):
        unknown = sorted(k for k in keys if k not in names)
        if unknown:
            raise ValueError(f"{kind}: no submodule named {unknown} in the model")
    declared = _declared_modules(dict(named), attention)  # projection name -> (QkvSpec, role, source)
    layers: list[Layer] = []
    consumed: set[int] = set()
    for _, m in named:
        if _LAZY_TYPES:
            _register_lazy(type(m))
    for name, m in named:
        if id(m) in consumed:
            continue
        if isinstance(m, nn.MultiheadAttention):
            consumed.add(id(m.out_proj))  # its forward never runs (F.linear on its weight)
            if name not in skip:
                layers += _mha_layers(name, m, attention.get(name))
            continue
        if name in skip:
            continue
        if name in declared:
            qkv, role, source = declared[name]
            spec = layer_spec(m, name)
            layers.append(Layer(name, role, [m], {id(m): dataclasses.replace(spec, qkv=qkv)},
                                m.weight, getattr(m, "bias", None),
                                transposed=weight_layout(m) == "in_out", attention=source))
            continue
        if name in attention:
            spec = layer_spec(m, name)
            if spec is None or spec.kind is not LayerKind.LINEAR:
                raise ValueError(f"attention[{name!r}]: expected a dense layer (nn.Linear, Conv1D or a "
                                 f"type registered with layer_spec), got {type(m).__name__}")
            qkv = attention[name]
            if not isinstance(qkv, QkvSpec):
                raise ValueError(f"attention[{name!r}]: expected maccore_torch.QKV(...) for a dense "
                                 f"layer, got {type(qkv).__name__}")
            if spec.d_out % (3 * qkv.num_heads):
                raise ValueError(
                    f"attention[{name!r}]: out_features={spec.d_out} is not divisible by "
                    f"3 * num_heads = {3 * qkv.num_heads}"
                )
            if qkv.mode != "off":  # probabilities recomputed from the output: q/k must be plain
                parent = name.rsplit(".", 1)[0] if "." in name else ""
                check_recomputable(name, parent, model.get_submodule(parent))
            layers.append(Layer(name, "qkv", [m], {id(m): dataclasses.replace(spec, qkv=qkv)},
                                m.weight, getattr(m, "bias", None),
                                transposed=weight_layout(m) == "in_out"))
            continue
        spec = layer_spec(m, name)
        if spec is None:
            continue
        layers.append(Layer(name, spec.kind.value, [m], {id(m): spec}, m.weight,
                            getattr(m, "bias", None), transposed=weight_layout(m) == "in_out"))
    layers = _filter_params(layers, param_ids)
    layers = _merge_tied(layers)
    _check_foreign_ties(model, layers)
    return layers


def _declared_modules(modules: dict, attention: dict) -> dict:
    """Resolve the :class:`AttentionModule` entries of ``attention`` (removed from it):
    ``{projection name: (QkvSpec, role, AttentionSource)}``."""
    out: dict = {}
    for name in [k for k, v in attention.items() if isinstance(v, AttentionModule)]:
        decl = attention.pop(name)
        m = modules[name]
        label = f"attention[{name!r}]"
        if isinstance(m, nn.MultiheadAttention):
            raise ValueError(f"{label}: nn.MultiheadAttention is recognised by type; set its mode "
                             f"with maccore_torch.QKV(num_heads=..., mode=...)")
        if layer_spec(m, name) is not None:
            raise ValueError(f"{label}: AttentionModule names the attention MODULE (whose forward "
                             f"returns the probabilities), not a projection; got the dense layer "
                             f"{type(m).__name__}")
        child = f"{name}.{decl.projection}" if name else decl.projection
        proj = modules.get(child)
        if proj is None:
            raise ValueError(f"{label}: {type(m).__name__} has no submodule {decl.projection!r}")
        if _LAZY_TYPES:
            _register_lazy(type(proj))
        spec = layer_spec(proj, child)
        if spec is None or spec.kind is not LayerKind.LINEAR:
            raise ValueError(f"{label}: {decl.projection!r} must be a dense layer (nn.Linear, Conv1D "
                             f"or a type registered with layer_spec), got {type(proj).__name__}")
        if child in out or child in attention:
            raise ValueError(f"{label}: {child!r} is declared twice")
        h, kv = module_heads(name, m, decl)
        if decl.qkv is not None:
            if spec.d_out % (3 * h):
                raise ValueError(f"{label}: {child} has {spec.d_out} outputs, not divisible by "
                                 f"3 * num_heads = {3 * h} (a fused (3, H, d_h) qkv projection)")
            qkv, role = QkvSpec(num_heads=h, mode=decl.mode), "qkv"
        else:
            if decl.mode == "per_head" and spec.d_out % kv:
                raise ValueError(f"{label}: {child} has {spec.d_out} outputs, not divisible by the "
                                 f"{kv} value heads (num_kv_heads)")
            qkv = QkvSpec(num_heads=h, mode=decl.mode, layout="v",
                          num_kv_heads=None if kv == h else kv)
            role = "linear"  # a dense layer; MAC gives it the attention-weighted mean
        out[child] = (qkv, role, AttentionSource(name, m, decl))
    return out


_AUTO_PROJECTIONS = ((("q_proj", "k_proj", "v_proj"), "value", "v_proj"),
                     (("query", "key", "value"), "value", "value"),
                     (("c_attn",), "qkv", "c_attn"))


def find_attention(model: nn.Module, *, mode: str = "reference") -> dict[str, AttentionModule]:
    """``attention="auto"``: the Hugging Face attention modules of ``model`` as
    ``{name: AttentionModule(...)}`` (inspect or edit it, then pass it as ``attention=``).

    Found: modules of a ``transformers`` class whose name contains ``Attention`` with dense
    children ``q_proj/k_proj/v_proj`` (Llama, Mistral, ViT, ...), ``query/key/value`` (BERT) or
    a fused ``c_attn`` without ``q_attn`` (GPT-2 self-attention): modules returning
    ``(attn_output, attn_weights)``. Their probabilities are read from the forward output, so the
    model must be built with ``attn_implementation="eager"`` (an error says so otherwise). Other
    modules (T5 returns ``(output, position_bias, weights)``) are declared by hand with
    ``AttentionModule(..., probs=...)``."""
    out = {}
    for name, m in model.named_modules():
        cls = type(m)
        if not cls.__module__.startswith("transformers.") or "Attention" not in cls.__name__:
            continue
        kids = dict(m.named_children())
        for names, kind, proj in _AUTO_PROJECTIONS:
            if all(k in kids for k in names) and all(_is_dense(kids[k]) for k in names):
                if kind == "qkv" and "q_attn" in kids:
                    continue  # GPT-2 cross-attention: c_attn holds only k and v
                out[name] = AttentionModule(mode=mode, **{kind: proj})
                break
    return out


def _is_dense(m: nn.Module) -> bool:
    if _LAZY_TYPES:
        _register_lazy(type(m))
    spec = layer_spec(m)
    return spec is not None and spec.kind is LayerKind.LINEAR


def _filter_params(layers: list[Layer], param_ids: set[int] | None) -> list[Layer]:
    """Layers whose weight is optimised. A layer whose weight is frozen / not optimised while its
    bias is (bias-only fine-tuning) is left out: :func:`coverage` lists its bias as skipped. A
    trainable weight with a frozen bias is preconditioned with the bias column (its gradient is
    simply not used)."""
    out = []
    for layer in layers:
        w = layer.weight
        if (param_ids is None or id(w) in param_ids) and w.requires_grad:
            out.append(layer)
    return out


def _merge_tied(layers: list[Layer]) -> list[Layer]:
    """Modules sharing one weight become one Layer whose statistics pool the rows of all uses
    (exact KFAC-expand for weight sharing, docs/math.md P-K12)."""
    by_weight: dict[int, Layer] = {}
    out = []
    for layer in layers:
        first = by_weight.get(id(layer.weight))
        if first is None:
            by_bias = [l for l in out if layer.bias is not None and l.bias is layer.bias]
            if by_bias:
                raise ValueError(f"{layer.name} and {by_bias[0].name} share a bias but not the weight")
            by_weight[id(layer.weight)] = layer
            out.append(layer)
            continue
        plain = ("linear", "conv2d")
        if (first.role not in plain or layer.role != first.role or layer.bias is not first.bias
                or first.attention is not None or layer.attention is not None
                or layer.spec.d_in != first.spec.d_in or layer.spec.d_out != first.spec.d_out):
            raise ValueError(
                f"{layer.name} and {first.name} share a weight but differ in kind, bias or shape: "
                f"tied parameters are only supported between layers of the same kind that share "
                f"weight and bias.{_skip_hint(layer.name)}"
            )
        first.modules += layer.modules
        first.specs.update(layer.specs)
        first.name = f"{first.name}+{layer.name}"
    return out


def _module_names(model: nn.Module, layer: Layer) -> list[str]:
    ids = {id(m) for m in layer.modules}
    return [n for n, m in model.named_modules() if id(m) in ids]


def _check_foreign_ties(model: nn.Module, layers: list[Layer]) -> None:
    claimed = {id(p): l for l in layers for p in (l.weight, l.bias) if p is not None}
    owners_ok = {id(m) for l in layers for m in l.modules}
    for l in layers:  # MultiheadAttention owns in_proj_*; its out_proj owns out_proj.*
        if l.role == "mha_out":
            owners_ok.add(id(l.modules[0].out_proj))
    for name, m in model.named_modules():
        if id(m) in owners_ok:
            continue
        for pname, p in m.named_parameters(recurse=False):
            if id(p) in claimed:
                layer = claimed[id(p)]
                if (isinstance(m, nn.Embedding) and layer.role == "linear" and p is layer.weight
                        and not layer.transposed):
                    # tied embedding <-> output head: the head is preconditioned as a linear layer
                    # on its input and its factors precondition the SUMMED gradient (both uses)
                    layer.tied.append(name or type(m).__name__)
                    continue
                if any(n.startswith(name + ".") or not name for n in _module_names(model, layer)):
                    continue  # an ancestor re-registering a child's parameter (BERT's head bias)
                raise ValueError(
                    f"parameter {name + '.' + pname if name else pname} of {type(m).__name__} is tied to "
                    f"layer {layer.name}: its gradient sums both uses but the statistics would see only "
                    f"one, so tied parameters across different module kinds are rejected."
                    f"{_skip_hint(layer.name.split('+')[0])}"
                )


@dataclass(frozen=True)
class Skipped:
    """A trainable parameter no preconditioner handles, and why."""

    parameter: str
    shape: tuple
    module: str
    reason: str
    suspicious: bool = False  # looks like a linear map (rank >= 2) of a type without a rule


_NOT_LINEAR = (nn.Embedding, nn.EmbeddingBag, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
               nn.modules.batchnorm._NormBase)


def coverage(model: nn.Module, layers: list[Layer], params: Iterable[torch.Tensor] | None = None,
             *, skip: Iterable[str] | None = None, other: Mapping[str, str] | None = None
             ) -> list[Skipped]:
    """Every parameter of ``params`` (default: the model's trainable ones) that no layer of
    ``layers`` claims, with the reason. ``skip``: module names the user skipped; ``other``:
    ``{module name: reason}`` for layers discovered but not handled by the method."""
    skip, other = set(skip or ()), dict(other or {})
    claimed = {id(p) for l in layers for p in (l.weight, l.bias) if p is not None}
    plist = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    wanted = {id(p) for p in plist if p.requires_grad and id(p) not in claimed}
    out, seen = [], set()
    for mname, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if id(p) not in wanted or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mname}.{pname}" if mname else pname
            suspicious = False
            inside = [k for k in skip if mname == k or mname.startswith(k + ".")]
            if inside:
                reason = f"skip_layers[{inside[0]!r}]"
            elif mname in other:
                reason = other[mname]
            elif pname == "bias" and getattr(m, "weight", None) is not None and layer_spec(m, mname) is not None:
                reason = "bias of a layer whose weight is frozen / not optimised"
            elif isinstance(m, _NOT_LINEAR):
                reason = f"{type(m).__name__}: not a linear map of the layer input"
            elif p.ndim >= 3 and p.shape[0] == 1:
                reason = (f"{p.ndim}-D parameter {list(p.shape)} of {type(m).__name__} broadcast over the "
                          f"batch (a class token, position embedding, …): added, not a linear map")
            elif p.ndim >= 2:
                suspicious = True
                reason = (f"{type(m).__name__} holds a {p.ndim}-D parameter {list(p.shape)} that looks "
                          f"like a linear map but has no layer_spec rule: register the type with "
                          f"maccore_torch.layer_spec, or pass skip_layers=[{mname!r}]")
            else:
                reason = f"{p.ndim}-D parameter of {type(m).__name__} (scale/shift)"
            out.append(Skipped(full, tuple(p.shape), mname, reason, suspicious))
    return out
