"""What a model declares about its own parallel communication."""

from __future__ import annotations

from typing import Any

import attrs
from attrs import field, frozen


def is_bool(inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"'{attr.name}' must be a bool (got {value!r})")


@frozen
class ParallelCapabilities:
    """A model's declaration of how it cooperates with the engine's parallel layout.

    A model class sets it as a class attribute::

        class MyModel(nn.Module):
            parallel_capabilities = ParallelCapabilities(self_managed_sp=True)

    Subclasses inherit it through the MRO and refine it with ``attrs.evolve``.
    The plan resolver (``registry.resolve_plan``) reads it together with the server
    arguments; consumers read the plan, never these fields directly.

    Attributes:
        self_managed_sp: The model runs its own all_gather/reduce_scatter across
            attention-TP ranks (it splits the tokens of a step between those ranks
            itself, uneven shards allowed) and consumes no upstream gathered buffer.
            Under ``--attn-tp-gather auto`` it switches the engine's attention-TP
            gather off where the topology would otherwise turn it on, and with it
            the padding of each step's token count to a multiple of
            ``attn_tp_size``, the gathered buffer and (without DP attention) the
            per-step batch sync; ``num_token_non_padded`` is never made shard-local
            for such a model. False (the default) means the model reduce-scatters
            and all-gathers through the engine's communicator and needs the gather
            whenever attention input is scattered.
    """

    self_managed_sp: bool = field(
        default=False,
        validator=is_bool,
        metadata={
            "doc": "the model runs its own all_gather/reduce_scatter across attention-TP "
            "ranks and consumes no upstream gathered buffer"
        },
    )

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def capability_docs() -> dict[str, str]:
    """One line per capability field, for help and ``registry show``."""
    return {f.name: f.metadata.get("doc", "") for f in attrs.fields(ParallelCapabilities)}
