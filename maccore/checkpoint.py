"""Portable checkpoints: the curvature state of an optimizer in one framework-neutral ``.npz`` file.

A checkpoint written by ``maccore_torch.save_portable`` loads into ``maccore_jax.load_portable``
(and the reverse), or into NumPy arrays with :func:`unflatten_state`: it holds the per-layer core
states (running averages with their counts and weights, the caches ``apply`` reads), the step
count and the momentum buffers, all in the core's canonical layouts. NumPy is imported lazily,
inside the functions that read or write files.

This module takes and returns NumPy arrays (or anything ``numpy.asarray`` / ``numpy.from_dlpack``
reads, see :func:`to_numpy`) and knows no framework: the adapters convert their tensors to NumPy
before :func:`save` and back after :func:`load`. :func:`unflatten_state` rebuilds a state in the
namespace of a template state through the Array API.

Layout, ``format_version`` 1 — an uncompressed NumPy ``.npz`` archive with

- ``"__maccore__"``: a 0-d string array holding the JSON header::

      {"format": "maccore-portable", "format_version": 1,
       "method": "MAC",            # "MAC", "SMAC", "KFAC", ... (upper case)
       "step": 12,                 # completed optimizer steps (skipped steps do not count)
       "source": "torch",          # the writer, informational
       "hyperparameters": {...},   # the writer's settings, informational (not checked on load)
       "layers": {"fc1": {"kind": "linear", "d_out": 6, "d_tilde": 5, "has_bias": true,
                          "updates": 6, "state_types": {"": "MacState", "mean": "EmaState"},
                          "arrays": {"state/mean/count": "a0", "state/mean/value": "a1", ...,
                                     "momentum": "a4"}}},
       "params": {"ln.weight": {"arrays": {"momentum": "a9"}}}}

- ``"a0"``, ``"a1"``, ...: the arrays the header points to.

Per layer, ``state/<field path>`` are the leaves of the core state NamedTuple (``mean/value``,
``mean/count``, ``mean/weight``, ``mean_hat`` for MAC; ``a/value``, ..., ``a_inv``, ``g_inv`` for
KFAC; fields that are ``None`` are absent), ``momentum`` is the layer's momentum buffer in the
canonical gradient-matrix layout ``[d_out, d̃]`` (weight flattened row-major, bias last: the same
for a torch ``[d_out, d_in]`` weight and a Flax ``[d_in, d_out]`` kernel), and other entries are
method extras (e.g. ``first_inv``, MAC's fixed first-layer inverse). ``params`` holds the momentum
buffers of parameters outside the preconditioned layers, in their own shape. Low-precision arrays
(bfloat16, float16) are stored as float32; arrays are cast to the target's dtype on load.

Layer names are the writer's (torch module names, Flax parameter paths ``"Dense_0"``); loading
under other names takes a ``names={saved name: target name}`` mapping. A checkpoint loads only
into an optimizer of the same method whose layers have the same names (after mapping), kinds and
sizes; anything else raises ``ValueError`` naming the layers and shapes that differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import array_api_compat as compat

from maccore._xp import Array

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LayerEntry",
    "Checkpoint",
    "flatten_state",
    "unflatten_state",
    "to_numpy",
    "save",
    "load",
    "rename_entries",
]

FORMAT = "maccore-portable"
FORMAT_VERSION = 1
_HEADER = "__maccore__"


@dataclass
class LayerEntry:
    """One layer of a :class:`Checkpoint` (NumPy arrays).

    ``state``: the flattened core state (:func:`flatten_state`), ``state_types``: the NamedTuple
    type of each nested node (``""`` is the root), ``updates``: number of statistics folds,
    ``momentum``: ``[d_out, d_tilde]`` or ``None``, ``extra``: method-specific arrays.
    """

    kind: str
    d_out: int
    d_tilde: int
    has_bias: bool
    state: dict[str, Any]
    state_types: dict[str, str]
    updates: int = 0
    momentum: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        bias = " + bias" if self.has_bias else ""
        return f"{self.kind} [{self.d_out}, {self.d_tilde}]{bias}"


@dataclass
class Checkpoint:
    """The content of a portable checkpoint (see the module docstring for the file layout)."""

    method: str
    step: int
    layers: dict[str, LayerEntry]
    params: dict[str, Any] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    source: str = "numpy"
    format_version: int = FORMAT_VERSION

    def select(
        self,
        target: Mapping[str, tuple[str, int, int]],
        *,
        method: str,
        names: Mapping[str, str] | None = None,
        where: str = "load_portable",
    ) -> dict[str, LayerEntry]:
        """The saved layers under the target's names, checked against ``target``
        (``{name: (kind, d_out, d_tilde)}``) and the target's ``method``.

        Raises ``ValueError`` when the method differs, when layer names differ (listing the
        missing and unexpected ones) or when a layer's kind or size differs.
        """
        if self.method.upper() != method.upper():
            raise ValueError(
                f"{where}: the checkpoint holds a {self.method} state but the optimizer is "
                f"{method.upper()}"
            )
        layers = rename_entries(self.layers, names, where, "layers")
        missing = sorted(set(target) - set(layers))
        unexpected = sorted(set(layers) - set(target))
        if missing or unexpected:
            raise ValueError(
                f"{where}: layer names differ — in the optimizer but not in the checkpoint: "
                f"{missing}; in the checkpoint but not in the optimizer: {unexpected}. Pass "
                "names={saved name: optimizer name} to map them (checkpoint layers: "
                f"{sorted(self.layers)})"
            )
        for name, (kind, d_out, d_tilde) in target.items():
            e = layers[name]
            if (e.kind, e.d_out, e.d_tilde) != (kind, d_out, d_tilde):
                raise ValueError(
                    f"{where}: layer {name!r} is {kind} [{d_out}, {d_tilde}] ([d_out, d̃]) in the "
                    f"optimizer but {e.describe()} in the checkpoint"
                )
        return layers

    def select_params(
        self, names: Mapping[str, str] | None = None, *, where: str = "load_portable"
    ) -> dict[str, Any]:
        """Momentum buffers of the other parameters under the target's names."""
        return rename_entries(self.params, names, where, "params")


# ---- states <-> flat dictionaries -------------------------------------------------------------
def _is_state(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def flatten_state(state: Any) -> tuple[dict[str, Array], dict[str, str]]:
    """A core state (nested NamedTuples of arrays) → ``({"mean/value": array, ...},
    {"": "MacState", "mean": "EmaState"})``. ``None`` fields are left out."""
    if not _is_state(state):
        raise TypeError(f"flatten_state: expected a core state (NamedTuple), got {type(state).__name__}")
    arrays: dict[str, Array] = {}
    types: dict[str, str] = {}

    def walk(node: Any, path: str) -> None:
        types[path] = type(node).__name__
        for f in node._fields:
            v = getattr(node, f)
            p = f"{path}/{f}" if path else f
            if v is None:
                continue
            if _is_state(v):
                walk(v, p)
            elif compat.is_array_api_obj(v):
                arrays[p] = v
            else:
                raise TypeError(f"flatten_state: field {p!r} is a {type(v).__name__}, not an array")

    walk(state, "")
    return arrays, types


def unflatten_state(
    template: Any,
    arrays: Mapping[str, Any],
    types: Mapping[str, str] | None = None,
    *,
    where: str = "unflatten_state",
) -> Any:
    """Rebuild a core state shaped like ``template`` from flat arrays (e.g. NumPy arrays of a
    :class:`LayerEntry`); every array takes the namespace, dtype and device of the template's leaf.

    Raises ``ValueError`` naming the field when a field is missing, unexpected, of another shape,
    or when the NamedTuple types differ (e.g. a KFAC state loaded into MAC, or damping modes that
    keep different caches).
    """
    if not _is_state(template):
        raise TypeError(f"{where}: template must be a core state (NamedTuple), got {type(template).__name__}")
    _, want_types = flatten_state(template)
    if types is not None and dict(types) != want_types:
        raise ValueError(f"{where}: saved state types {dict(types)} do not match {want_types}")
    used: set[str] = set()

    def build(node: Any, path: str) -> Any:
        values = []
        for f in node._fields:
            v = getattr(node, f)
            p = f"{path}/{f}" if path else f
            if v is None:
                values.append(None)
            elif _is_state(v):
                values.append(build(v, p))
            else:
                if p not in arrays:
                    raise ValueError(f"{where}: field {p!r} of {type(template).__name__} is missing")
                a = arrays[p]
                if tuple(a.shape) != tuple(v.shape):
                    raise ValueError(
                        f"{where}: field {p!r} has shape {list(a.shape)}, expected {list(v.shape)}"
                    )
                used.add(p)
                values.append(_like(a, v))
        return type(node)(*values)

    out = build(template, "")
    extra = sorted(set(arrays) - used)
    if extra:
        raise ValueError(
            f"{where}: fields {extra} are not part of {type(template).__name__} (the state was "
            "saved with other settings, e.g. another damping mode or SMAC's diagonal)"
        )
    return out


def _like(a: Any, leaf: Array) -> Array:
    """``a`` (NumPy) as an array of ``leaf``'s namespace, dtype and device."""
    xp = compat.array_namespace(leaf)
    return xp.asarray(a, dtype=leaf.dtype, device=compat.device(leaf), copy=True)


def to_numpy(x: Any) -> Any:
    """A NumPy array from ``x``: a NumPy array, or any host array that ``numpy.asarray`` reads
    (``__array__``, the buffer protocol) or ``numpy.from_dlpack`` accepts.

    This module knows no framework: each adapter moves its tensors to the host and to a dtype NumPy
    has (e.g. torch's bfloat16 → float32) before calling :func:`save`.

    Raises:
        TypeError: ``x`` cannot be read as a NumPy array (a GPU array, a dtype NumPy lacks, a tensor
            that requires grad): convert it in the caller.
    """
    import numpy as np  # noqa: PLC0415

    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(x)
    except Exception as exc:
        try:
            return np.from_dlpack(x)
        except Exception:
            raise TypeError(
                f"maccore.checkpoint: cannot read a {type(x).__module__}.{type(x).__name__} as a "
                f"NumPy array ({exc}); convert it to a host NumPy array first (the framework "
                "adapters' save_portable do)"
            ) from exc


def _storable(a: Any) -> Any:
    """``a`` as stored: NumPy, low-precision floats (float16, and NumPy extension types such as
    bfloat16, which are not a builtin kind) as float32."""
    import numpy as np  # noqa: PLC0415

    a = to_numpy(a)
    if a.dtype.kind not in "biuf" or (a.dtype.kind == "f" and a.dtype.itemsize < 4):
        a = a.astype(np.float32)
    return a


# ---- files ---------------------------------------------------------------------------------------
def save(path: Any, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` to ``path`` (exactly that path; no suffix is added)."""
    import numpy as np  # noqa: PLC0415

    if not isinstance(ckpt, Checkpoint):
        raise TypeError(f"save: expected a maccore.checkpoint.Checkpoint, got {type(ckpt).__name__}")
    blobs: dict[str, Any] = {}

    def put(a: Any) -> str:
        key = f"a{len(blobs)}"
        blobs[key] = _storable(a)
        return key

    layers = {}
    for name, e in ckpt.layers.items():
        arrays = {f"state/{k}": put(v) for k, v in e.state.items()}
        if e.momentum is not None:
            m = _storable(e.momentum)
            if tuple(m.shape) != (e.d_out, e.d_tilde):
                raise ValueError(
                    f"save: momentum of layer {name!r} has shape {list(m.shape)}, expected the "
                    f"gradient-matrix layout [{e.d_out}, {e.d_tilde}]"
                )
            arrays["momentum"] = put(m)
        for k, v in e.extra.items():
            arrays[k] = put(v)
        layers[name] = {
            "kind": str(e.kind),
            "d_out": int(e.d_out),
            "d_tilde": int(e.d_tilde),
            "has_bias": bool(e.has_bias),
            "updates": int(e.updates),
            "state_types": dict(e.state_types),
            "arrays": arrays,
        }
    params = {name: {"arrays": {"momentum": put(v)}} for name, v in ckpt.params.items()}
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": str(ckpt.method).upper(),
        "step": int(ckpt.step),
        "source": str(ckpt.source),
        "hyperparameters": _jsonable(ckpt.hyperparameters),
        "layers": layers,
        "params": params,
    }
    with open(path, "wb") as f:
        np.savez(f, **{_HEADER: np.asarray(json.dumps(header))}, **blobs)


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    try:
        return float(x)
    except Exception:
        return repr(x)


def load(path: Any) -> Checkpoint:
    """Read a portable checkpoint (NumPy arrays).

    Raises ``ValueError`` when the file is not a maccore portable checkpoint or was written in a
    newer ``format_version`` than this version of maccore reads.
    """
    import zipfile  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    try:
        with np.load(path, allow_pickle=False) as z:
            files = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"load_portable: {path!s} is not a readable .npz file ({exc})") from exc
    if _HEADER not in files:
        raise ValueError(f"load_portable: {path!s} is not a maccore portable checkpoint (no {_HEADER!r} entry)")
    try:
        header = json.loads(str(files[_HEADER]))
    except json.JSONDecodeError as exc:
        raise ValueError(f"load_portable: {path!s}: unreadable header ({exc})") from exc
    if header.get("format") != FORMAT:
        raise ValueError(f"load_portable: {path!s}: format {header.get('format')!r}, expected {FORMAT!r}")
    version = header.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(
            f"load_portable: {path!s}: unknown format_version {version!r} (this maccore reads "
            f"format_version 1..{FORMAT_VERSION}; a newer maccore wrote it?)"
        )

    def get(key: str) -> Any:
        if key not in files:
            raise ValueError(f"load_portable: {path!s}: array {key!r} listed in the header is missing")
        return files[key]

    layers = {}
    for name, h in header["layers"].items():
        arrays = h["arrays"]
        state = {k[len("state/"):]: get(v) for k, v in arrays.items() if k.startswith("state/")}
        extra = {k: get(v) for k, v in arrays.items() if not k.startswith("state/") and k != "momentum"}
        layers[name] = LayerEntry(
            kind=h["kind"], d_out=int(h["d_out"]), d_tilde=int(h["d_tilde"]),
            has_bias=bool(h["has_bias"]), state=state, state_types=dict(h["state_types"]),
            updates=int(h.get("updates", 0)),
            momentum=get(arrays["momentum"]) if "momentum" in arrays else None, extra=extra,
        )
    params = {name: get(h["arrays"]["momentum"]) for name, h in header.get("params", {}).items()}
    return Checkpoint(
        method=header["method"], step=int(header["step"]), layers=layers, params=params,
        hyperparameters=header.get("hyperparameters", {}), source=header.get("source", "?"),
        format_version=version,
    )


def rename_entries(
    entries: Mapping[str, Any], names: Mapping[str, str] | None, where: str, what: str = "entries"
) -> dict[str, Any]:
    """``entries`` with keys renamed by the mapping ``names`` ({old name: new name}; ``None`` keeps
    them). Saving maps framework names onto saved names, loading maps saved names onto the
    target's; both adapters' ``save_portable``/``load_portable`` use it.

    Raises:
        TypeError: ``names`` is not a mapping.
        ValueError: two entries map to the same new name.
    """
    if names is None:
        return dict(entries)
    if not isinstance(names, Mapping):
        raise TypeError(f"{where}: names must be a mapping {{old name: new name}}, got {names!r}")
    out: dict[str, Any] = {}
    for old, entry in entries.items():
        new = names.get(old, old)
        if new in out:
            raise ValueError(f"{where}: names maps two {what} to {new!r}")
        out[new] = entry
    return out
