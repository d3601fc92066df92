"""What counts as an activation: each known as a module class, as ``torch.*``/
``torch.nn.functional.*`` functions, as tensor methods and in their in-place forms, or
recognised by what it computes. What counts as a BatchNorm is `batchnorms`'.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .batchnorms import is_frozen_batchnorm


@dataclass(frozen=True)
class ActivationSpec:
    """One activation family in all the forms a model may call it."""

    kind: str
    modules: tuple[type[nn.Module], ...]
    functions: tuple[Callable[..., Any], ...] = ()
    #: in-place function -> its out-of-place twin
    inplace_functions: dict[Callable[..., Any], Callable[..., Any]] = field(default_factory=dict)
    methods: tuple[str, ...] = ()
    #: f(k*z) = k*f(z) for k > 0
    positively_homogeneous: bool = False


_ACTIVATIONS: tuple[ActivationSpec, ...] = (
    ActivationSpec(
        "ReLU",
        (nn.ReLU,),
        (torch.relu, F.relu),
        {torch.relu_: torch.relu},
        ("relu", "relu_"),
        positively_homogeneous=True,
    ),
    ActivationSpec("ReLU6", (nn.ReLU6,), (F.relu6,)),
    ActivationSpec(
        "LeakyReLU",
        (nn.LeakyReLU,),
        (F.leaky_relu,),
        {F.leaky_relu_: F.leaky_relu},
        positively_homogeneous=True,
    ),
    ActivationSpec("PReLU", (nn.PReLU,), (F.prelu, torch.prelu), positively_homogeneous=True),
    ActivationSpec("ELU", (nn.ELU,), (F.elu,), {F.elu_: F.elu}),
    ActivationSpec("CELU", (nn.CELU,), (F.celu, torch.celu), {torch.celu_: torch.celu}),
    ActivationSpec("SELU", (nn.SELU,), (F.selu, torch.selu), {torch.selu_: torch.selu}),
    ActivationSpec("GELU", (nn.GELU,), (F.gelu,)),
    ActivationSpec("SiLU", (nn.SiLU,), (F.silu,)),
    ActivationSpec("Mish", (nn.Mish,), (F.mish,)),
    ActivationSpec("Hardswish", (nn.Hardswish,), (F.hardswish,)),
    ActivationSpec("Hardsigmoid", (nn.Hardsigmoid,), (F.hardsigmoid,)),
    ActivationSpec("Hardtanh", (nn.Hardtanh,), (F.hardtanh,), {F.hardtanh_: F.hardtanh}),
    ActivationSpec(
        "Sigmoid",
        (nn.Sigmoid,),
        (torch.sigmoid, F.sigmoid),
        {torch.sigmoid_: torch.sigmoid},
        ("sigmoid", "sigmoid_"),
    ),
    ActivationSpec("Tanh", (nn.Tanh,), (torch.tanh, F.tanh), {torch.tanh_: torch.tanh}, ("tanh", "tanh_")),
    ActivationSpec("Softplus", (nn.Softplus,), (F.softplus,)),
)

# Lookup tables built once; ReLU6 and Hardtanh share a base class, so module
# lookups walk the MRO and the most specific class wins.
_BY_MODULE: dict[type[nn.Module], ActivationSpec] = {
    cls: spec for spec in _ACTIVATIONS for cls in spec.modules
}
_BY_FUNCTION: dict[Any, ActivationSpec] = {
    fn: spec for spec in _ACTIVATIONS for fn in (*spec.functions, *spec.inplace_functions)
}
_BY_METHOD: dict[str, ActivationSpec] = {m: spec for spec in _ACTIVATIONS for m in spec.methods}
_BY_KIND: dict[str, ActivationSpec] = {spec.kind.lower(): spec for spec in _ACTIVATIONS}

ACTIVATION_KINDS: tuple[str, ...] = tuple(spec.kind for spec in _ACTIVATIONS)
"""The activation kinds bnmove recognises by class or by what they compute (``Pair.activation_kind``)."""


def activation_spec(kind: str | ActivationSpec) -> ActivationSpec:
    """The spec for an activation kind, by case-insensitive name (specs pass through)."""
    if isinstance(kind, ActivationSpec):
        return kind
    try:
        return _BY_KIND[kind.lower()]
    except KeyError:
        raise KeyError(f"unknown activation kind {kind!r}") from None


def recognise(model: nn.Module) -> None:
    """Decide, once, what every module of ``model`` is, before any tracer patches ``Module.__call__``.

    Recognising a frozen BN or an activation by what it computes runs it on a
    probe; under torch.fx or a recording that call would be traced instead.
    """
    from .layers import custom_affine_layer  # layers sits above patterns

    for module in model.modules():
        if not is_frozen_batchnorm(module):
            module_activation_spec(module)
        custom_affine_layer(module)


def module_activation_spec(module: nn.Module) -> ActivationSpec | None:
    """The activation family of a module instance, or None.

    torch's activation classes are known by class. Any other module with no
    parameters, buffers or children (timm's ``GELU``/``Swish``/``HardSwish``, HF's
    ``ACT2FN`` classes, a user's own) is recognised by what it computes: a
    non-linear elementwise function (see `probe_activation`).
    """
    for cls in type(module).__mro__:
        spec = _BY_MODULE.get(cls)
        if spec is not None:
            return spec
        if cls in _NOT_ACTIVATIONS:
            return None
    if module._parameters or module._buffers or module._modules:
        return None
    key = _probe_key(module)
    if key not in _PROBED:
        _PROBED[key] = probe_activation(module)
    return _PROBED[key]


#: torch classes that are never activations (links, shape changes, pooling...), never probed
_NOT_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.Softmax,
    nn.LogSoftmax,
    nn.Softmin,
    nn.modules.dropout._DropoutNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Upsample,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.ZeroPad2d,
    nn.ConstantPad2d,
    nn.ReflectionPad2d,
    nn.ReplicationPad2d,
    nn.ChannelShuffle,
    nn.Sequential,
    nn.ModuleList,
    nn.ModuleDict,
)

_PROBED: dict[tuple[Any, ...], ActivationSpec | None] = {}

#: known elementwise functions a probed module or a composite may compute, most specific first:
#: (kind, torch function, its keyword arguments)
KNOWN_FUNCTIONS: tuple[tuple[str, Callable[..., torch.Tensor], dict[str, Any]], ...] = (
    ("ReLU", torch.relu, {}),
    ("ReLU6", F.relu6, {}),
    ("LeakyReLU", F.leaky_relu, {}),
    ("ELU", F.elu, {}),
    ("SELU", F.selu, {}),
    ("CELU", F.celu, {}),
    ("GELU", F.gelu, {}),
    ("GELU", F.gelu, {"approximate": "tanh"}),
    ("SiLU", F.silu, {}),
    ("Mish", F.mish, {}),
    ("Hardswish", F.hardswish, {}),
    ("Hardsigmoid", F.hardsigmoid, {}),
    ("Hardtanh", F.hardtanh, {}),
    ("Sigmoid", torch.sigmoid, {}),
    ("Tanh", torch.tanh, {}),
    ("Softplus", F.softplus, {}),
)


def known_function(
    values: torch.Tensor, grid: torch.Tensor
) -> tuple[str, Callable[..., torch.Tensor], dict[str, Any]] | None:
    """The known activation whose values on ``grid`` are ``values`` (to float rounding), or None."""
    for kind, fn, kwargs in KNOWN_FUNCTIONS:
        if torch.allclose(values, fn(grid, **kwargs), atol=1e-5):
            return kind, fn, kwargs
    return None


def _probe_key(module: nn.Module) -> tuple[Any, ...]:
    plain = (bool, int, float, str, type(None))
    state = tuple(
        sorted(
            (k, v)
            for k, v in vars(module).items()
            if not k.startswith("_") and k != "training" and isinstance(v, plain)
        )
    )
    return (type(module), state)


def probe_activation(module: nn.Module) -> ActivationSpec | None:
    """An `ActivationSpec` for a stateless module that computes a non-linear elementwise function.

    The module runs (eval mode, no grad) on a fixed grid of values laid out in
    two shapes; it counts as elementwise when both give the same values
    position by position, and as an activation when the result is not affine.
    The kind is a known function's name when the values match one, else the
    module's class name. Anything that raises, changes shapes or is affine is
    not an activation.
    """
    grid = torch.linspace(-6.0, 6.0, 120)
    flag = module.training
    try:
        module.training = False
        with torch.no_grad():
            flat = module(grid.clone())
            shaped = module(grid.reshape(2, 3, 4, 5).clone())
    except Exception:
        return None
    finally:
        module.training = flag
    if not isinstance(flat, torch.Tensor) or not isinstance(shaped, torch.Tensor):
        return None
    if flat.shape != grid.shape or shaped.shape != (2, 3, 4, 5) or not flat.is_floating_point():
        return None
    flat = flat.float()
    if not torch.allclose(flat, shaped.float().reshape(-1), atol=1e-6) or not torch.isfinite(flat).all():
        return None
    # affine in z (identity, scaling, shifting): a link, not an activation
    design = torch.stack([grid, torch.ones_like(grid)], 1)
    fit = torch.linalg.lstsq(design, flat[:, None]).solution
    if torch.allclose(design @ fit, flat[:, None], atol=1e-5):
        return None
    cls = type(module)
    known = known_function(flat, grid)
    if known is not None:
        base = _BY_KIND[known[0].lower()]
        return ActivationSpec(known[0], (cls,), positively_homogeneous=base.positively_homogeneous)
    return ActivationSpec(cls.__name__, (cls,))


@dataclass(frozen=True)
class ActivationCall:
    """How one graph node applies an activation."""

    spec: ActivationSpec
    inplace: bool


def _function_inplace(fn: Callable[..., Any], node: fx.Node) -> bool:
    if "inplace" in node.kwargs:
        return bool(node.kwargs["inplace"])
    try:
        bound = inspect.signature(fn).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return False
    return bool(bound.arguments.get("inplace", False))


def match_activation(node: fx.Node, modules: dict[str, nn.Module]) -> ActivationCall | None:
    """Recognise an activation in any of its call forms, or return None."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        if module is None:
            return None
        spec = module_activation_spec(module)
        if spec is None:
            return None
        return ActivationCall(spec, bool(getattr(module, "inplace", False)))
    if node.op == "call_function":
        spec = _BY_FUNCTION.get(node.target)
        if spec is None or not callable(node.target):
            return None
        inplace = node.target in spec.inplace_functions or _function_inplace(node.target, node)
        return ActivationCall(spec, inplace)
    if node.op == "call_method":
        spec = _BY_METHOD.get(str(node.target))
        if spec is None:
            return None
        return ActivationCall(spec, str(node.target).endswith("_"))
    return None


def out_of_place_function(target: Any) -> Any:
    """``torch.relu_`` -> ``torch.relu`` and so on; anything else passes through."""
    spec = _BY_FUNCTION.get(target)
    if spec is not None and target in spec.inplace_functions:
        return spec.inplace_functions[target]
    return target


def activation_call(
    target: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f(z)`` for the activation that a method name (``"relu_"``) or a function (``F.gelu``)
    calls with these constant arguments: out of place, whatever ``inplace`` said."""
    options = {k: v for k, v in (kwargs or {}).items() if k != "inplace"}
    if isinstance(target, str):
        method = target.rstrip("_")
        return lambda z: getattr(z, method)(*args, **options)  # type: ignore[no-any-return]
    function = out_of_place_function(target)
    return lambda z: function(z, *args, **options)  # type: ignore[no-any-return]


def make_out_of_place(node: fx.Node, modules: dict[str, nn.Module]) -> None:
    """Rewrite an in-place activation node so it no longer writes over its input.

    Modules get ``inplace=False`` (harmless for every other call site of a
    shared module); functions and methods switch to their out-of-place twin.
    """
    if node.op == "call_module":
        module = modules[str(node.target)]
        if getattr(module, "inplace", False):
            module.inplace = False  # type: ignore[assignment]
        return
    if node.op == "call_method":
        name = str(node.target)
        if name.endswith("_"):
            node.target = name[:-1]
        return
    twin = out_of_place_function(node.target)
    if twin is not node.target:
        node.target = twin
        return
    if "inplace" in node.kwargs:
        node.kwargs = {**node.kwargs, "inplace": False}
        return
    fn = node.target
    assert callable(fn)
    try:
        bound = inspect.signature(fn).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return
    if bound.arguments.get("inplace"):
        bound.arguments["inplace"] = False
        node.args = bound.args
        node.kwargs = bound.kwargs
