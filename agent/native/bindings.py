"""The ctypes side of kernels.c, declared once and checked against the library at load time.

`FUNCTIONS` names every exported function's arguments and their kinds (p pointer, l int64_t,
i int, f float, d double; the result first, v for void). kernels.c states each function's kinds
beside its definition (`SIGNATURE(name, "r:args")`); `load()` compares the two and raises
`NativeABIError` on any difference, so a changed C signature cannot be called with stale argument
types. Calls go by argument name (`lib.two_hot_decode(logits=..., stride=..., ...)`), so an argument
cannot be passed in the wrong position.

The structs the value estimate reads (`layer_t`, `value_net_t`) are mirrored by `Layer` and
`ValueNetStruct`, with the C field names; `load()` checks their sizes and every field offset
against `native_layout()` of the library itself.
"""
from __future__ import annotations

import ctypes
from typing import Any

KINDS = {"p": ctypes.c_void_p, "l": ctypes.c_int64, "i": ctypes.c_int, "f": ctypes.c_float,
         "d": ctypes.c_double, "v": None}

# name: (result kind, [(argument, kind), ...]) in the C parameter order
FUNCTIONS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "ln_act_forward": ("v", [
        ("x", "p"), ("out", "p"), ("rows", "l"), ("heads", "l"), ("width", "l"),
        ("x_row_stride", "l"), ("x_head_stride", "l"), ("out_row_stride", "l"), ("out_head_stride", "l"),
        ("add", "p"), ("add_every", "l"), ("gamma", "p"), ("beta", "p"), ("scale", "f"), ("eps", "f"),
        ("act", "i"), ("mean_out", "p"), ("rstd_out", "p"), ("threads", "i")]),
    "ln_act_backward": ("v", [
        ("x", "p"), ("grad_y", "p"), ("grad_x", "p"), ("rows", "l"), ("heads", "l"), ("width", "l"),
        ("x_row_stride", "l"), ("x_head_stride", "l"), ("grad_row_stride", "l"), ("grad_head_stride", "l"),
        ("mean", "p"), ("rstd", "p"), ("gamma", "p"), ("beta", "p"), ("scale", "f"), ("act", "i"),
        ("grad_affine", "p"), ("threads", "i")]),
    "two_hot_decode": ("v", [
        ("logits", "p"), ("stride", "l"), ("out", "p"), ("rows", "l"), ("bins", "l"), ("vmin", "f"), ("vmax", "f")]),
    "ln_simnorm": ("v", [
        ("x", "p"), ("rows", "l"), ("width", "l"), ("gamma", "p"), ("beta", "p"), ("eps", "f"), ("group", "l")]),
    "native_layout": ("l", [("name", "p")]),
    "gemm_selftest": ("i", [("sgemm", "p")]),
    "plan_values": ("i", [
        ("net", "p"), ("z", "p"), ("actions", "p"), ("mask", "p"), ("eps", "p"), ("out", "p"), ("rows", "l"),
        ("block", "l"), ("threads", "i")]),
}


class NativeABIError(RuntimeError):
    """kernels.c and this module disagree on a function signature or a struct layout."""


class Layer(ctypes.Structure):
    """layer_t: one dense layer of the value estimate (see kernels.c)."""
    _c_name = "layer_t"
    _fields_ = [("w", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("gamma", ctypes.c_void_p), ("beta", ctypes.c_void_p),
                ("in", ctypes.c_int64), ("out", ctypes.c_int64), ("per_env", ctypes.c_int64)]


class ValueNetStruct(ctypes.Structure):
    """value_net_t: the planner's value estimate (see kernels.c)."""
    _c_name = "value_net_t"
    _fields_ = [("sgemm", ctypes.c_void_p), ("set_threads_local", ctypes.c_void_p),
                ("first", Layer), ("reward1", Layer), ("reward_out", Layer), ("next1", Layer), ("next_out", Layer),
                ("pi0", Layer), ("pi1", Layer), ("pi_out", Layer),
                ("q", ctypes.POINTER(Layer) * 2), ("q_layers", ctypes.c_int64),
                ("latent", ctypes.c_int64), ("action", ctypes.c_int64), ("mlp", ctypes.c_int64),
                ("bins", ctypes.c_int64), ("simnorm", ctypes.c_int64), ("rows_per_env", ctypes.c_int64),
                ("horizon", ctypes.c_int64), ("discount", ctypes.c_double),
                ("vmin", ctypes.c_float), ("vmax", ctypes.c_float), ("log_std_min", ctypes.c_float),
                ("log_std_max", ctypes.c_float), ("ln_eps", ctypes.c_float)]


STRUCTS = (Layer, ValueNetStruct)


def _named(name: str, arguments: tuple[str, ...], fn: Any) -> Any:
    """A Python function `name(*, arg, ...)` calling `fn` with its keyword-only arguments in C order
    (Python itself rejects a missing or unknown argument, at the cost of a plain call)."""
    namespace = {"_fn": fn}
    exec(f"def {name}(*, {', '.join(arguments)}):\n    return _fn({', '.join(arguments)})\n", namespace)
    return namespace[name]


class Library:
    """The loaded kernels: one attribute per entry of FUNCTIONS, called with every argument by name."""

    def __init__(self, cdll: ctypes.CDLL):
        self.cdll = cdll
        for name, (result, arguments) in FUNCTIONS.items():
            fn = getattr(cdll, name)
            fn.argtypes = [KINDS[kind] for _, kind in arguments]
            fn.restype = KINDS[result]
            setattr(self, name, _named(name, tuple(a for a, _ in arguments), fn))


def _c_signature(cdll: ctypes.CDLL, name: str) -> str | None:
    try:
        symbol = ctypes.c_char.in_dll(cdll, f"{name}__signature")
    except ValueError:
        return None
    return ctypes.string_at(ctypes.addressof(symbol)).decode()


def check_signatures(cdll: ctypes.CDLL) -> None:
    for name, (result, arguments) in FUNCTIONS.items():
        declared = result + ":" + "".join(kind for _, kind in arguments)
        stated = _c_signature(cdll, name)
        if stated != declared:
            raise NativeABIError(f"native {name}: kernels.c states signature {stated!r}, agent/native/bindings.py "
                                 f"declares {declared!r}; update one to match the other")


def check_layouts(layout: Any) -> None:
    """Compare each ctypes mirror's size and field offsets with `layout(name) -> bytes` (-1 unknown)."""
    for struct in STRUCTS:
        c_name = struct._c_name
        pairs = [(c_name, ctypes.sizeof(struct))]
        pairs += [(f"{c_name}.{field}", getattr(struct, field).offset) for field, _ in struct._fields_]
        for name, ours in pairs:
            theirs = layout(name.encode())
            if theirs != ours:
                what = "size" if "." not in name else "offset"
                raise NativeABIError(f"native struct {name}: {what} {theirs} in kernels.c (-1: no such field), {ours} "
                                     f"in agent/native/bindings.py; the ctypes mirror must match the C struct")


def load(path: str) -> Library:
    """Load the built library, check its signatures and struct layouts (NativeABIError on any
    difference) and return it bound."""
    cdll = ctypes.CDLL(path)
    check_signatures(cdll)
    lib = Library(cdll)
    check_layouts(lambda name: lib.native_layout(name=name))
    return lib
