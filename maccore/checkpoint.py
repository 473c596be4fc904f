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
import os
import uuid
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
        (``{name: (kind, d_out, d_tilde)}``, or ``(kind, d_out, d_tilde, has_bias)``) and the
        target's ``method``.

        Raises ``ValueError`` when the method differs, when layer names differ (listing the
        missing and unexpected ones) or when a layer's kind, size or bias differs.
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
        for name, want in target.items():
            kind, d_out, d_tilde = want[:3]
            e = layers[name]
            if (e.kind, e.d_out, e.d_tilde) != (kind, d_out, d_tilde):
                raise ValueError(
                    f"{where}: layer {name!r} is {kind} [{d_out}, {d_tilde}] ([d_out, d̃]) in the "
                    f"optimizer but {e.describe()} in the checkpoint"
                )
            if len(want) > 3 and bool(want[3]) != e.has_bias:
                raise ValueError(
                    f"{where}: layer {name!r} {'has' if want[3] else 'has no'} bias in the "
                    f"optimizer but {e.describe()} in the checkpoint (has_bias differs)"
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
                _check_kind(a, v, p, where)
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


def _check_kind(a: Any, leaf: Array, p: str, where: str) -> None:
    """A NumPy array for a field of ``leaf``'s kind: real floating for floating fields, integer
    for counters (never bool or complex: they would be cast silently)."""
    kind = getattr(getattr(a, "dtype", None), "kind", None)
    if kind is None:
        return
    xp = compat.array_namespace(leaf)
    want = "f" if xp.isdtype(leaf.dtype, "real floating") else "iu"
    if kind not in want:
        raise ValueError(
            f"{where}: field {p!r} has dtype {a.dtype}, expected "
            f"{'a real floating' if want == 'f' else 'an integer'} array like {leaf.dtype}"
        )


def _like(a: Any, leaf: Array) -> Array:
    """``a`` (NumPy) as an array of ``leaf``'s namespace, dtype and device: copied as it is, then
    cast (a direct ``asarray(..., dtype=)`` of another width is refused by some namespaces, e.g.
    torch for an int8 counter loaded into an int32 field)."""
    xp = compat.array_namespace(leaf)
    out = xp.asarray(a, device=compat.device(leaf), copy=True)
    return out if out.dtype == leaf.dtype else xp.astype(out, leaf.dtype)


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
    """Write ``ckpt`` to ``path`` (exactly that path; no suffix is added).

    Atomic: the file is written to a temporary file in the same directory, flushed and
    ``fsync``-ed, then renamed over ``path`` (``os.replace``). A save that fails (a full disk, an
    interrupted process) leaves a previous checkpoint at ``path`` intact and no temporary file."""
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
    _write_atomic(path, lambda f: np.savez(f, **{_HEADER: np.asarray(json.dumps(header))}, **blobs))


def _write_atomic(path: Any, write: Any) -> None:
    """``write(file)`` into a fresh file next to ``path``, flush, fsync, then rename it to ``path``;
    on any failure the temporary file is removed and ``path`` is left as it was."""
    target = os.fspath(path)
    folder, base = os.path.split(os.path.abspath(target))
    tmp = os.path.join(folder, f".{base}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # the rename itself is durable once the directory is synced (POSIX; best effort)
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


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


_MAX_STEP = 2**31 - 1  # step counters are int32 in maccore_jax (and in a portable file)
_MAX_HEADER_BYTES = 1 << 28
_ITEMSIZE = 8  # the widest dtype a checkpoint array may have (float64, int64)


def _bad(path: Any, what: str) -> ValueError:
    return ValueError(f"load_portable: {path!s}: {what}")


def _read_member(zf: Any, key: str, limit: int, path: Any, what: str) -> Any:
    """The NumPy array stored as ``key`` (``key.npy``) in the open zip ``zf``, reading no more
    than its ``.npy`` header declares — and refusing, before reading any data, one with more than
    ``limit`` bytes, an object dtype or a header that does not parse."""
    import numpy as np  # noqa: PLC0415

    try:
        info = zf.getinfo(key + ".npy")
    except KeyError:
        raise _bad(path, f"{what}: array {key!r} listed in the header is missing") from None
    with zf.open(info) as fp:
        try:
            version = np.lib.format.read_magic(fp)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        except Exception as exc:
            raise _bad(path, f"{what}: array {key!r} has no readable .npy header ({exc})") from exc
        if dtype.hasobject or dtype.itemsize == 0:
            raise _bad(path, f"{what}: array {key!r} has dtype {dtype}, not a numeric dtype")
        count = 1
        for n in shape:
            count *= int(n)
        nbytes = count * dtype.itemsize
        if nbytes > limit:
            raise _bad(path, f"{what}: array {key!r} of shape {list(shape)} ({nbytes} bytes) is "
                             f"larger than the header implies (at most {limit} bytes)")
        data = fp.read(nbytes)
    if len(data) != nbytes:
        raise _bad(path, f"{what}: array {key!r} is truncated ({len(data)} of {nbytes} bytes)")
    a = np.frombuffer(data, dtype=dtype)
    return a.reshape(shape, order="F" if fortran else "C").copy(order="K")  # (the layout np.load gives)


def _check_array(a: Any, path: Any, what: str, *, integer: bool = False) -> None:
    """A checkpoint array: real floating (finite) or, for counters, integer (>= 0)."""
    import numpy as np  # noqa: PLC0415

    kind = a.dtype.kind
    if integer:
        if kind not in "iu":
            raise _bad(path, f"{what}: a counter must have an integer dtype, got {a.dtype}")
        if a.size and int(a.min()) < 0:
            raise _bad(path, f"{what}: a counter must be >= 0, got {int(a.min())}")
        return
    if kind != "f":
        raise _bad(path, f"{what}: expected a real floating array, got dtype {a.dtype} "
                         "(bool, integer and complex arrays are not state)")
    if not np.isfinite(a).all():
        raise _bad(path, f"{what}: holds NaN or Inf")


def _int_field(h: Mapping, key: str, path: Any, what: str, *, low: int, high: int,
               default: Any = None) -> int:
    v = h.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise _bad(path, f"{what}{key!r} must be an integer in [{low}, {high}], got {v!r}")
    return v


def _mapping(v: Any, path: Any, what: str) -> Mapping:
    if not isinstance(v, Mapping):
        raise _bad(path, f"{what} must be a JSON object, got {type(v).__name__}")
    return v


def load(path: Any) -> Checkpoint:
    """Read a portable checkpoint (NumPy arrays).

    Strict: only the arrays the header lists are read, each bounded by the size its layer's
    header implies (a file cannot make the reader decompress more than that), and every header
    field and array is checked. Raises ``ValueError`` naming the field when the file is not a
    maccore portable checkpoint, was written in a newer ``format_version`` than this version of
    maccore reads, or is malformed: a header field of the wrong type or range (``step`` an
    integer in [0, 2³¹), ``updates`` >= 0, ``has_bias`` a boolean, ``d_out``/``d_tilde``
    positive, ...), a missing, truncated or oversized array, an array that is not real floating
    (counters: integer >= 0), or a NaN/Inf in a state, momentum or extra array.
    """
    import zipfile  # noqa: PLC0415
    import zlib  # noqa: PLC0415

    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise _bad(path, f"not a readable .npz file ({exc})") from exc
    try:
        with zf:
            return _load_open(zf, path)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, OverflowError,
            MemoryError) as exc:
        raise _bad(path, f"not a readable .npz file ({type(exc).__name__}: {exc})") from exc


def _load_open(zf: Any, path: Any) -> Checkpoint:
    names = set(zf.namelist())
    if _HEADER + ".npy" not in names:
        raise _bad(path, f"not a maccore portable checkpoint (no {_HEADER!r} entry)")
    raw = _read_member(zf, _HEADER, _MAX_HEADER_BYTES, path, "header")
    if raw.dtype.kind not in "US" or raw.shape != ():
        raise _bad(path, f"the {_HEADER!r} entry is not a string")
    try:
        header = json.loads(str(raw[()]))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise _bad(path, f"unreadable header ({exc})") from exc
    header = _mapping(header, path, "the header")
    if header.get("format") != FORMAT:
        raise _bad(path, f"format {header.get('format')!r}, expected {FORMAT!r}")
    version = header.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(
            f"load_portable: {path!s}: unknown format_version {version!r} (this maccore reads "
            f"format_version 1..{FORMAT_VERSION}; a newer maccore wrote it?)"
        )
    method = header.get("method")
    if not isinstance(method, str) or not method:
        raise _bad(path, f"header field 'method' must be a non-empty string, got {method!r}")
    step = _int_field(header, "step", path, "header field ", low=0, high=_MAX_STEP)
    source = header.get("source", "?")
    if not isinstance(source, str):
        raise _bad(path, f"header field 'source' must be a string, got {source!r}")
    hyper = _mapping(header.get("hyperparameters", {}), path, "header field 'hyperparameters'")

    from maccore import LayerKind  # noqa: PLC0415  (the layer kinds a checkpoint may hold)

    kinds = sorted(k.value for k in LayerKind)
    layers = {}
    limit_all = 0
    for name, h in _mapping(header.get("layers"), path, "header field 'layers'").items():
        what = f"layer {name!r}: "
        h = _mapping(h, path, f"{what}the entry")
        kind = h.get("kind")
        if kind not in kinds:
            raise _bad(path, f"{what}'kind' must be one of {kinds}, got {kind!r}")
        d_out = _int_field(h, "d_out", path, what, low=1, high=_MAX_STEP)
        d_tilde = _int_field(h, "d_tilde", path, what, low=1, high=_MAX_STEP)
        has_bias = h.get("has_bias")
        if not isinstance(has_bias, bool):
            raise _bad(path, f"{what}'has_bias' must be true or false, got {has_bias!r}")
        updates = _int_field(h, "updates", path, what, low=0, high=_MAX_STEP, default=0)
        types = _mapping(h.get("state_types"), path, f"{what}'state_types'")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in types.items()):
            raise _bad(path, f"{what}'state_types' must map strings to type names")
        arrays = _mapping(h.get("arrays"), path, f"{what}'arrays'")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in arrays.items()):
            raise _bad(path, f"{what}'arrays' must map field names to array names")
        # the largest array a layer holds: a [d, d] factor of its larger side (fused qkv / per
        # head factors are [3H, d̃] with 3H <= d_out), at most 8 bytes an entry
        limit = _ITEMSIZE * (max(d_out, d_tilde) ** 2 + 16)
        limit_all = max(limit_all, limit)

        def get(field: str, key: str, *, integer: bool = False) -> Any:
            a = _read_member(zf, key, limit, path, f"{what}{field!r}")
            _check_array(a, path, f"{what}{field!r}", integer=integer)
            return a

        state = {k[len("state/"):]: get(k, v, integer=k.split("/")[-1] == "count")
                 for k, v in arrays.items() if k.startswith("state/")}
        extra = {k: get(k, v) for k, v in arrays.items() if not k.startswith("state/") and k != "momentum"}
        momentum = None
        if "momentum" in arrays:
            momentum = get("momentum", arrays["momentum"])
            if tuple(momentum.shape) != (d_out, d_tilde):
                raise _bad(path, f"{what}'momentum' has shape {list(momentum.shape)}, expected "
                                 f"the gradient-matrix layout [{d_out}, {d_tilde}]")
        layers[name] = LayerEntry(
            kind=kind, d_out=d_out, d_tilde=d_tilde, has_bias=has_bias, state=state,
            state_types=dict(types), updates=updates, momentum=momentum, extra=extra,
        )
    params = {}
    for name, h in _mapping(header.get("params", {}), path, "header field 'params'").items():
        what = f"parameter {name!r}: "
        arrays = _mapping(_mapping(h, path, f"{what}the entry").get("arrays"), path, f"{what}'arrays'")
        key = arrays.get("momentum")
        if not isinstance(key, str) or set(arrays) != {"momentum"}:
            raise _bad(path, f"{what}'arrays' must be {{'momentum': array name}}, got {dict(arrays)!r}")
        # no size in the header: stored arrays are bounded by the file itself, compressed ones
        # by 16 x their compressed size (no decompression bombs)
        info = zf.getinfo(key + ".npy") if key + ".npy" in names else None
        bound = max(limit_all, 16 * info.compress_size if info is not None else 0)
        if info is not None and info.compress_type == 0:
            bound = max(bound, info.file_size)
        a = _read_member(zf, key, bound, path, f"{what}'momentum'")
        _check_array(a, path, f"{what}'momentum'")
        params[name] = a
    return Checkpoint(
        method=method, step=step, layers=layers, params=params, hyperparameters=dict(hyper),
        source=source, format_version=version,
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
