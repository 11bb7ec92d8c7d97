"""The quantizer backend registry: each backend declares its name, options model and capabilities.

A backend declares itself in a light module beside its code (``quantizers/<name>_options.py``:
the options model and the capabilities, no framework imports) by calling :func:`register`
with a :class:`BackendInfo`; the class that does the work is named by an import path and
imported only when the backend is built. The study spec's ``backend`` union, ``get_backend``
and the contract tests all read this registry.

A backend of another package registers the same way, from a module imported before the
spec is loaded, and runs the contract suite of :mod:`quantizers.testing`.

>>> from quantizers.registry import backend_info
>>> backend_info("brevitas").options.__name__
'BrevitasOptions'
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mpq.errors import UserError
from mpq.options import BackendOptions

if TYPE_CHECKING:
    from quantizers.base import Capabilities, QuantizerBackend

#: Modules that declare the bundled backends (imported on first use of the registry).
BUILTIN_DECLARATIONS = ("quantizers.brevitas_options", "quantizers.modelopt_options",
                        "quantizers.modelopt_onnx_options")


@dataclass(frozen=True)
class BackendInfo:
    """What a backend declares.

    Args:
        name: the backend's name in specs and on the command line (``backend: brevitas``).
        options: its options model; a :class:`~mpq.options.BackendOptions` subclass whose
            ``name`` field is ``Literal[name]``.
        capabilities: the precisions it builds per op kind.
        factory: ``"module:Class"`` of the backend class, imported when it is built.
        install_hint: what to install when that import fails.
        fake_quant: ``materialize`` builds a runnable torch fake-quant model (else the
            backend works on ONNX only and ``QuantizedModel.module`` is ``None``).
    """

    name: str
    options: type[BackendOptions]
    capabilities: Capabilities
    factory: str
    install_hint: str = ""
    fake_quant: bool = True


_REGISTRY: dict[str, BackendInfo] = {}
_LOADED = False


def register(info: BackendInfo) -> BackendInfo:
    """Add a backend to the registry (a second registration under the same name replaces the first)."""
    default = info.options.model_fields["name"].default
    if default != info.name:
        raise ValueError(f"backend '{info.name}': its options model {info.options.__name__} has name "
                         f"default {default!r}; it must be {info.name!r}")
    if info.capabilities.backend != info.name:
        raise ValueError(f"backend '{info.name}': its capabilities are declared for '{info.capabilities.backend}'")
    _REGISTRY[info.name] = info
    return info


def backends() -> dict[str, BackendInfo]:
    """Every registered backend by name, the bundled ones first."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for module in BUILTIN_DECLARATIONS:
            importlib.import_module(module)
    return dict(_REGISTRY)


def names() -> list[str]:
    """The names of the registered backends."""
    return list(backends())


def backend_info(name: str) -> BackendInfo:
    """The declaration of backend ``name``; an unknown name is an error listing the known ones."""
    known = backends()
    try:
        return known[name]
    except KeyError:
        raise UserError(f"unknown backend '{name}'; known backends: {', '.join(known)}") from None


def options_models() -> tuple[type[BackendOptions], ...]:
    """The options model of every registered backend (the spec's ``backend`` union)."""
    return tuple(info.options for info in backends().values())


def backend_class(name: str) -> Any:
    """The backend class registered under ``name`` (its framework is imported now)."""
    info = backend_info(name)
    module_name, _, attr = info.factory.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = f" ({info.install_hint})" if info.install_hint else ""
        raise UserError(f"backend '{name}' cannot be imported: {exc}{hint}") from exc
    return getattr(module, attr)


def get_backend(options: BackendOptions | str, device: str = "cpu", **extra: Any) -> QuantizerBackend:
    """Instantiate the backend for a spec's ``backend`` section (or a bare name: default options).

    ``extra`` keyword arguments go to the backends whose constructor takes them and are ignored
    by the others: ``target`` (the study's ``deploy.target``: a backend that can model what the
    target runs, a quantizer on each A8 layer's output for ``ort-cpu``, builds it in its
    fake-quant model so that the lowered file computes what the backend computed),
    ``cache_dir`` (where a backend keeps what it computes once per model and calibration set),
    ``progress``, ``console``.
    """
    import inspect

    if isinstance(options, str):
        options = backend_info(options).options(name=options)
    cls = backend_class(options.name)
    accepted = inspect.signature(cls).parameters
    backend: QuantizerBackend = cls(options=options, device=device,
                                    **{k: v for k, v in extra.items() if k in accepted})
    return backend
