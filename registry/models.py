"""Model registry: architecture name -> model class, built-in, plugin or registered by code.

Built-ins are ``"module:Class"`` strings, imported only when asked for. Out-of-tree
models come from the entry-point group ``parcap.models`` (entry name = architecture,
value = ``"module:Class"``), scanned once on first use. An entry that cannot be
registered or imported is kept as an error naming it; it is never dropped silently.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Mapping
from typing import Any

from attrs import field, frozen

from registry.capabilities import ParallelCapabilities

# re-exported: other modules import the typed registry from here
from registry.typed_registry import DuplicateName, Registry

GROUP = "parcap.models"
BUILTIN_MODELS: Mapping[str, str] = {
    "LlamaForCausalLM": "models.llama:LlamaForCausalLM",
    "Qwen3MoeForCausalLM": "models.qwen3_moe:Qwen3MoeForCausalLM",
    "DeepseekV3ForCausalLM": "models.deepseek_v3:DeepseekV3ForCausalLM",
    "DeepseekV4ForCausalLM": "models.deepseek_v4:DeepseekV4ForCausalLM",
}


class UnknownArchitecture(LookupError):
    def __init__(self, architecture: str, known: list[str]):
        self.architecture = architecture
        self.known = known
        super().__init__(
            f"unknown architecture {architecture!r} (known: {', '.join(known) or 'none'})"
        )


class ModelLoadError(RuntimeError):
    """A registered architecture whose class cannot be imported or is ill-declared."""

    def __init__(self, architecture: str, error: str):
        self.architecture = architecture
        self.error = error
        super().__init__(f"model {architecture!r}: {error}")


@frozen
class ModelEntry:
    """A registration: the class itself or a lazy ``"module:Class"`` path, and its origin."""

    architecture: str
    target: str | type = field(repr=lambda t: t if isinstance(t, str) else _path(t))
    origin: str  # "builtin", "plugin:<distribution>" or "code"

    @property
    def path(self) -> str:
        return self.target if isinstance(self.target, str) else _path(self.target)

    def __str__(self) -> str:
        return f"{self.origin} ({self.path})"


@frozen
class ModelInfo:
    """A loaded model class with its capabilities and where they come from."""

    architecture: str
    cls: type
    path: str  # "module:Class"
    capabilities: ParallelCapabilities
    declared_by: str  # "module.Class" of the declaring class, or "default"
    origin: str

    def to_json(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "declared_by": self.declared_by,
            "capabilities": self.capabilities.to_json(),
            "origin": self.origin,
        }


@frozen
class EntryError:
    architecture: str
    error: str

    def to_json(self) -> dict[str, str]:
        return {"architecture": self.architecture, "error": self.error}


def _path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def capabilities_of(cls: type) -> tuple[ParallelCapabilities, str]:
    """The capabilities `cls` declares or inherits, and the declaring class (or "default").

    Reads class dictionaries along the MRO: nothing is instantiated.
    """
    for klass in cls.__mro__:
        if "parallel_capabilities" in vars(klass):
            caps = vars(klass)["parallel_capabilities"]
            where = f"{klass.__module__}.{klass.__qualname__}"
            if not isinstance(caps, ParallelCapabilities):
                raise TypeError(
                    f"{where}.parallel_capabilities must be a ParallelCapabilities (got {caps!r})"
                )
            return caps, where
    return ParallelCapabilities(), "default"


def _check_path(path: str) -> None:
    module, sep, attr = path.partition(":")
    if not (sep and module and attr) or ":" in attr:
        raise ValueError(f"model path must be 'module:Class' (got {path!r})")


class ModelRegistry:
    """Architectures to model classes. Build one per test to re-scan plugins."""

    def __init__(
        self,
        builtins: Mapping[str, str] = BUILTIN_MODELS,
        *,
        group: str | None = GROUP,
    ):
        self._builtins = dict(builtins)
        self._group = group
        self.reset()

    def reset(self) -> None:
        """Forget plugins, code registrations and loaded classes; the next use re-scans."""
        self._entries: Registry[ModelEntry] = Registry("architecture")
        self._errors: dict[str, list[str]] = {}
        self._loaded: dict[str, ModelInfo] = {}
        self._scanned = False
        for arch, path in self._builtins.items():
            _check_path(path)
            self._entries.add(arch, ModelEntry(arch, path, "builtin"))

    # -- registration -------------------------------------------------------------

    def register(self, architecture: str, cls_or_path: type | str, *, origin: str = "code") -> None:
        """Register a class or a lazy ``"module:Class"`` path under `architecture`.

        A name already taken raises `DuplicateName` naming both sides (registering the
        very same target again from the same origin is a no-op).
        """
        self._scan()
        if isinstance(cls_or_path, str):
            _check_path(cls_or_path)
        elif isinstance(cls_or_path, type):
            capabilities_of(cls_or_path)  # an ill-declared class fails here, not at launch
        else:
            raise TypeError(
                f"'cls_or_path' must be a class or 'module:Class' (got {cls_or_path!r})"
            )
        entry = ModelEntry(architecture, cls_or_path, origin)
        if architecture in self._entries:
            old = self._entries[architecture]
            if old.origin == origin and old.path == entry.path:
                return
        self._entries.add(architecture, entry)

    def _scan(self) -> None:
        if self._scanned:
            return
        self._scanned = True
        if self._group is None:
            return
        eps = importlib.metadata.entry_points(group=self._group)
        for ep in sorted(eps, key=lambda e: (_dist_name(e), e.name)):
            origin = f"plugin:{_dist_name(ep)}"
            try:
                _check_path(ep.value)
            except ValueError as e:
                self._errors.setdefault(ep.name, []).append(f"{origin}: {e}")
                continue
            try:
                self._entries.add(ep.name, ModelEntry(ep.name, ep.value, origin))
            except DuplicateName as e:
                self._errors.setdefault(ep.name, []).append(str(e))

    # -- lookup -------------------------------------------------------------------

    def names(self) -> list[str]:
        """Every registered architecture, loadable or not, sorted."""
        self._scan()
        return self._entries.names()

    def entry(self, architecture: str) -> ModelEntry:
        self._scan()
        if architecture not in self._entries:
            if architecture in self._errors:
                raise ModelLoadError(architecture, "; ".join(self._errors[architecture]))
            raise UnknownArchitecture(architecture, self.names())
        return self._entries[architecture]

    def load(self, architecture: str) -> ModelInfo:
        """Import the class of `architecture` and read its capabilities (no instance)."""
        if architecture in self._loaded:
            return self._loaded[architecture]
        entry = self.entry(architecture)
        try:
            cls = _import(entry.target)
            caps, declared_by = capabilities_of(cls)
        except Exception as e:
            raise ModelLoadError(
                architecture, f"{entry} failed to load: {type(e).__name__}: {e}"
            ) from e
        info = ModelInfo(architecture, cls, entry.path, caps, declared_by, entry.origin)
        self._loaded[architecture] = info
        return info

    def get_class(self, architecture: str) -> type:
        return self.load(architecture).cls

    def scan(self) -> tuple[list[ModelInfo], list[EntryError]]:
        """Load every entry: the loadable ones, and an error for each one that is not."""
        self._scan()
        infos: list[ModelInfo] = []
        errors = [EntryError(a, msg) for a, msgs in self._errors.items() for msg in msgs]
        for arch in self.names():
            try:
                infos.append(self.load(arch))
            except ModelLoadError as e:
                errors.append(EntryError(arch, e.error))
        errors.sort(key=lambda e: e.architecture)
        return infos, errors


def _dist_name(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None and dist.name else "unknown"


def _import(target: str | type) -> type:
    if isinstance(target, type):
        return target
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise TypeError(f"{target} is not a class (got {obj!r})")
    return obj


_default: ModelRegistry | None = None


def model_registry() -> ModelRegistry:
    """The process-wide registry (built-ins + installed plugins + code registrations)."""
    global _default
    if _default is None:
        _default = ModelRegistry()
    return _default


def reset_model_registry() -> None:
    """Drop the process-wide registry; the next use re-scans plugins."""
    global _default
    _default = None


def register_model(architecture: str, cls_or_path: type | str) -> None:
    model_registry().register(architecture, cls_or_path)


def get_model_info(architecture: str) -> ModelInfo:
    return model_registry().load(architecture)


def get_model_class(architecture: str) -> type:
    return model_registry().get_class(architecture)
