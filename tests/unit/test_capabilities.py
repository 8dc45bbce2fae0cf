"""ParallelCapabilities and reading a class's declaration through the MRO."""

import attrs
import pytest

from registry import ParallelCapabilities, capabilities_of
from registry.capabilities import capability_docs


def test_default_declares_nothing():
    caps = ParallelCapabilities()
    assert caps.self_managed_sp is False
    assert caps.to_json() == {"self_managed_sp": False}


def test_frozen_slotted_value():
    caps = ParallelCapabilities(self_managed_sp=True)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        caps.self_managed_sp = False
    assert not hasattr(caps, "__dict__")
    assert caps == ParallelCapabilities(self_managed_sp=True)
    assert caps != ParallelCapabilities()
    assert hash(caps) == hash(ParallelCapabilities(self_managed_sp=True))


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_validator_names_the_field(bad):
    with pytest.raises(TypeError, match=r"'self_managed_sp' must be a bool \(got "):
        ParallelCapabilities(self_managed_sp=bad)


def test_evolve_refines_and_validates():
    base = ParallelCapabilities()
    refined = attrs.evolve(base, self_managed_sp=True)
    assert refined.self_managed_sp and not base.self_managed_sp
    with pytest.raises(TypeError):
        attrs.evolve(base, self_managed_sp="true")


def test_every_field_has_the_one_line_doc_registry_show_prints():
    docs = capability_docs()
    assert set(docs) == {f.name for f in attrs.fields(ParallelCapabilities)}
    assert all(doc and "\n" not in doc for doc in docs.values())


class Plain:
    pass


class Base:
    parallel_capabilities = ParallelCapabilities()


class SelfManaged(Base):
    parallel_capabilities = attrs.evolve(Base.parallel_capabilities, self_managed_sp=True)


class Inherits(SelfManaged):
    pass


class Mixin:
    parallel_capabilities = ParallelCapabilities(self_managed_sp=True)


class WithMixin(Plain, Mixin):
    pass


class Explodes(SelfManaged):
    def __init__(self):
        raise AssertionError("capabilities must be read without an instance")


def _name(cls):
    return f"{__name__}.{cls.__qualname__}"


@pytest.mark.parametrize(
    ("cls", "value", "declared_by"),
    [
        (Plain, False, "default"),
        (Base, False, _name(Base)),
        (SelfManaged, True, _name(SelfManaged)),
        (Inherits, True, _name(SelfManaged)),
        (WithMixin, True, _name(Mixin)),
        (Explodes, True, _name(SelfManaged)),
    ],
)
def test_provenance(cls, value, declared_by):
    caps, where = capabilities_of(cls)
    assert caps.self_managed_sp is value
    assert where == declared_by


def test_subclass_can_declare_back_to_default():
    class Opt(SelfManaged):
        parallel_capabilities = ParallelCapabilities()

    caps, where = capabilities_of(Opt)
    assert not caps.self_managed_sp
    assert where.endswith("Opt")


def test_declaration_of_wrong_type_is_an_error_naming_the_class():
    class Wrong(Base):
        parallel_capabilities = {"self_managed_sp": True}

    with pytest.raises(TypeError, match=r"Wrong\.parallel_capabilities must be a Parallel"):
        capabilities_of(Wrong)
