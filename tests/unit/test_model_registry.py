"""Model registry: lazy built-ins, code registration, entry-point plugins, errors."""

import sys

import pytest

import registry.models
from registry import (
    DuplicateName,
    ModelLoadError,
    ModelRegistry,
    ParallelCapabilities,
    UnknownArchitecture,
    get_model_class,
    get_model_info,
    register_model,
)
from tests.support.sandbox import BROKEN, DECLARES_NOTHING, SELF_MANAGED, sandbox

__all__ = ["sandbox"]  # the fixture

ILL_DECLARED = """
class Model:
    parallel_capabilities = True
"""


@pytest.fixture
def builtins(sandbox):
    return {
        "PlainForCausalLM": sandbox.module("plain", DECLARES_NOTHING) + ":Model",
        "OwnSpForCausalLM": sandbox.module("own_sp", SELF_MANAGED) + ":Model",
    }


def test_builtins_are_lazy(builtins):
    reg = ModelRegistry(builtins, group=None)
    module = builtins["OwnSpForCausalLM"].partition(":")[0]
    assert reg.names() == ["OwnSpForCausalLM", "PlainForCausalLM"]
    assert module not in sys.modules
    info = reg.load("OwnSpForCausalLM")
    assert module in sys.modules
    assert info.capabilities == ParallelCapabilities(self_managed_sp=True)
    assert info.declared_by == f"{module}.Base"
    assert info.origin == "builtin"
    assert info.path == builtins["OwnSpForCausalLM"]
    assert reg.load("OwnSpForCausalLM") is info  # cached


def test_default_capabilities_when_nothing_declared(builtins):
    info = ModelRegistry(builtins, group=None).load("PlainForCausalLM")
    assert (info.capabilities, info.declared_by) == (ParallelCapabilities(), "default")
    assert info.to_json() == {
        "architecture": "PlainForCausalLM",
        "declared_by": "default",
        "capabilities": {"self_managed_sp": False},
        "origin": "builtin",
    }


def test_unknown_architecture_lists_the_known_ones(builtins):
    reg = ModelRegistry(builtins, group=None)
    with pytest.raises(UnknownArchitecture) as e:
        reg.load("GPT2LMHeadModel")
    assert "'GPT2LMHeadModel'" in str(e.value)
    assert "OwnSpForCausalLM, PlainForCausalLM" in str(e.value)
    assert e.value.known == ["OwnSpForCausalLM", "PlainForCausalLM"]


def test_register_class_and_path(builtins, sandbox):
    reg = ModelRegistry(builtins, group=None)

    class Mine:
        parallel_capabilities = ParallelCapabilities(self_managed_sp=True)

    reg.register("MineForCausalLM", Mine)
    info = reg.load("MineForCausalLM")
    assert info.cls is Mine and info.origin == "code" and info.capabilities.self_managed_sp
    path = sandbox.module("by_path", DECLARES_NOTHING) + ":Model"
    reg.register("ByPathForCausalLM", path)
    assert path.partition(":")[0] not in sys.modules  # still lazy
    assert reg.get_class("ByPathForCausalLM").__name__ == "Model"
    reg.register("MineForCausalLM", Mine)  # the very same registration again: no-op


def test_duplicate_is_refused_naming_both_sides(builtins):
    reg = ModelRegistry(builtins, group=None)

    class Other:
        pass

    with pytest.raises(DuplicateName) as e:
        reg.register("PlainForCausalLM", Other)
    msg = str(e.value)
    assert "'PlainForCausalLM'" in msg
    assert f"builtin ({builtins['PlainForCausalLM']})" in msg
    assert "code (" in msg and "Other" in msg
    assert reg.load("PlainForCausalLM").path == builtins["PlainForCausalLM"]


def test_register_rejects_bad_targets(builtins):
    reg = ModelRegistry(builtins, group=None)
    with pytest.raises(ValueError, match="'module:Class'"):
        reg.register("X", "just.a.module")
    with pytest.raises(TypeError, match="class or 'module:Class'"):
        reg.register("X", object())

    class Wrong:
        parallel_capabilities = "self_managed"

    with pytest.raises(TypeError, match="must be a ParallelCapabilities"):
        reg.register("X", Wrong)
    assert "X" not in reg.names()


def test_import_failure_is_reported_with_name_and_error(builtins, sandbox):
    builtins = builtins | {
        "BrokenForCausalLM": sandbox.module("broken", BROKEN) + ":Model",
        "MissingForCausalLM": "pcfx_does_not_exist:Model",
        "NotAClassForCausalLM": sandbox.module("not_class", "Model = 3\n") + ":Model",
        "IllDeclaredForCausalLM": sandbox.module("ill", ILL_DECLARED) + ":Model",
    }
    reg = ModelRegistry(builtins, group=None)
    with pytest.raises(ModelLoadError) as e:
        reg.load("BrokenForCausalLM")
    assert "'BrokenForCausalLM'" in str(e.value)
    assert "RuntimeError: plugin exploded on import" in str(e.value)
    assert isinstance(e.value.__cause__, RuntimeError)

    infos, errors = reg.scan()
    assert [i.architecture for i in infos] == ["OwnSpForCausalLM", "PlainForCausalLM"]
    by_arch = {e.architecture: e.error for e in errors}
    assert set(by_arch) == {
        "BrokenForCausalLM",
        "MissingForCausalLM",
        "NotAClassForCausalLM",
        "IllDeclaredForCausalLM",
    }
    assert "ModuleNotFoundError" in by_arch["MissingForCausalLM"]
    assert "is not a class" in by_arch["NotAClassForCausalLM"]
    assert "must be a ParallelCapabilities" in by_arch["IllDeclaredForCausalLM"]


def test_real_builtins_are_registered_lazily():
    reg = ModelRegistry(group=None)
    assert reg.names() == sorted(registry.models.BUILTIN_MODELS)
    assert reg.entry("DeepseekV3ForCausalLM").path == "models.deepseek_v3:DeepseekV3ForCausalLM"
    assert reg.entry("LlamaForCausalLM").origin == "builtin"


# -- entry-point plugins through real .dist-info directories ---------------------------


def test_plugins_good_broken_duplicate_and_malformed(builtins, sandbox):
    good = sandbox.module("good_plugin", SELF_MANAGED) + ":Model"
    broken = sandbox.module("broken_plugin", BROKEN) + ":Model"
    sandbox.dist("parcap-good", {"GoodForCausalLM": good})
    sandbox.dist("parcap-broken", {"BrokenPluginForCausalLM": broken})
    sandbox.dist("parcap-dup", {"PlainForCausalLM": good, "NoColonForCausalLM": "nocolon"})

    reg = ModelRegistry(builtins)
    info = reg.load("GoodForCausalLM")
    assert info.origin == "plugin:parcap-good"
    assert info.capabilities.self_managed_sp
    assert info.declared_by == good.partition(":")[0] + ".Base"

    infos, errors = reg.scan()
    assert {i.architecture: i.origin for i in infos} == {
        "GoodForCausalLM": "plugin:parcap-good",
        "OwnSpForCausalLM": "builtin",
        "PlainForCausalLM": "builtin",  # the duplicate did not replace it
    }
    by_arch: dict[str, list[str]] = {}
    for e in errors:
        by_arch.setdefault(e.architecture, []).append(e.error)
    assert set(by_arch) == {"BrokenPluginForCausalLM", "PlainForCausalLM", "NoColonForCausalLM"}
    [err] = by_arch["BrokenPluginForCausalLM"]
    assert "plugin:parcap-broken" in err and "plugin exploded on import" in err
    [err] = by_arch["PlainForCausalLM"]
    assert f"builtin ({builtins['PlainForCausalLM']})" in err
    assert f"plugin:parcap-dup ({good})" in err
    [err] = by_arch["NoColonForCausalLM"]
    assert "plugin:parcap-dup" in err and "'module:Class'" in err
    with pytest.raises(ModelLoadError, match="'module:Class'"):
        reg.load("NoColonForCausalLM")


def test_plugin_duplicating_a_real_builtin_name(sandbox):
    good = sandbox.module("llama_clone", DECLARES_NOTHING) + ":Model"
    sandbox.dist("parcap-llama-clone", {"LlamaForCausalLM": good})
    _, errors = ModelRegistry().scan()
    [dup] = [e for e in errors if "plugin:parcap-llama-clone" in e.error]
    assert dup.architecture == "LlamaForCausalLM"
    assert "builtin (models.llama:LlamaForCausalLM)" in dup.error


def test_plugins_are_scanned_once_until_reset(builtins, sandbox):
    reg = ModelRegistry(builtins)
    assert "LateForCausalLM" not in reg.names()
    late = sandbox.module("late", SELF_MANAGED) + ":Model"
    sandbox.dist("parcap-late", {"LateForCausalLM": late})
    assert "LateForCausalLM" not in reg.names()  # cached scan
    reg.reset()
    assert "LateForCausalLM" in reg.names()
    assert ModelRegistry(builtins).load("LateForCausalLM").origin == "plugin:parcap-late"


def test_code_registration_after_plugin_is_a_duplicate(builtins, sandbox):
    path = sandbox.module("p", DECLARES_NOTHING) + ":Model"
    sandbox.dist("parcap-p", {"PForCausalLM": path})
    reg = ModelRegistry(builtins)
    with pytest.raises(DuplicateName, match="plugin:parcap-p"):
        reg.register("PForCausalLM", sandbox.module("q", DECLARES_NOTHING) + ":Model")


def test_process_wide_helpers(builtins, monkeypatch):
    monkeypatch.setattr(registry.models, "_default", ModelRegistry(builtins, group=None))

    class Extra:
        pass

    register_model("ExtraForCausalLM", Extra)
    assert get_model_class("ExtraForCausalLM") is Extra
    assert get_model_info("OwnSpForCausalLM").capabilities.self_managed_sp
    registry.models.reset_model_registry()
    assert registry.models._default is None
    assert "ExtraForCausalLM" not in registry.models.model_registry().names()


def test_registry_names_feed_choices():
    reg = registry.models.Registry[int]("backend")
    reg.add("b", 2)
    reg.add("a", 1)
    assert reg.names() == ["a", "b"] and "a" in reg and reg["b"] == 2 and len(reg) == 2
    with pytest.raises(DuplicateName, match="backend 'a' is already registered by 1; refusing 3"):
        reg.add("a", 3)
