"""Text to ids and back: byte-level for embedded models, the checkpoint's own when it has one."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Protocol

BYTE_BOS = 256
BYTE_EOS = 257


class TokenizerError(ValueError):
    """A checkpoint's tokenizer that cannot be used; reported before any rank starts."""


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """Ids 0-255 are bytes; BOS is prepended; decoding drops every other id."""

    def __init__(self, bos: int = BYTE_BOS) -> None:
        self.bos = bos

    def encode(self, text: str) -> list[int]:
        return [self.bos, *text.encode()]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode(errors="replace")


class HFTokenizer:
    """A checkpoint's tokenizer.json through the `tokenizers` package."""

    def __init__(self, path: Path) -> None:
        try:
            from tokenizers import Tokenizer as Impl
        except ImportError:
            raise TokenizerError(
                f"{path} needs the 'tokenizers' package (pip install tokenizers), or give "
                "prompts as input_ids"
            ) from None
        try:
            self.impl = Impl.from_file(str(path))
        except Exception as e:
            raise TokenizerError(f"{path}: not a tokenizers file ({e})") from None

    def encode(self, text: str) -> list[int]:
        return self.impl.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.impl.decode(ids, skip_special_tokens=True)


def load_tokenizer(model_path: str | None, config: types.SimpleNamespace) -> Tokenizer | None:
    """The tokenizer for a launch, or None when prompts must come as input_ids.

    None happens for a checkpoint without tokenizer.json whose vocabulary is too small for
    bytes and their BOS.
    """
    if model_path is not None and (Path(model_path) / "tokenizer.json").exists():
        return HFTokenizer(Path(model_path) / "tokenizer.json")
    bos = getattr(config, "bos_token_id", None)
    bos = BYTE_BOS if not isinstance(bos, int) else bos
    if config.vocab_size <= max(255, bos):
        return None
    return ByteTokenizer(bos)


def eos_ids(config: types.SimpleNamespace) -> frozenset[int]:
    """The ids that end generation, as transformers' generate reads them from the config."""
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return frozenset({BYTE_EOS}) if config.vocab_size > BYTE_EOS else frozenset()
    return frozenset(eos if isinstance(eos, list) else [eos])
