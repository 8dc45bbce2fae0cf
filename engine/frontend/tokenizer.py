"""Text to ids and back: byte-level for embedded models, the checkpoint's own when it has one.

A checkpoint without `tokenizer.json` has no tokenizer here: its text prompts are refused
(token ids still work), since encoding them some other way would feed a real model garbage.
BOS and EOS around a text prompt follow the tokenizer's own settings: what `tokenizer.json`'s
post-processor adds, or, for a tokenizer.json without one, `tokenizer_config.json`'s
`add_bos_token` / `add_eos_token`. Token ids are taken as given.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any, Protocol

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
        _apply_special_token_settings(self.impl, path.parent / "tokenizer_config.json")

    def encode(self, text: str) -> list[int]:
        return self.impl.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.impl.decode(ids, skip_special_tokens=True)


def _apply_special_token_settings(impl: Any, config_file: Path) -> None:
    """A tokenizer.json without a post-processor adds no special tokens by itself; then
    tokenizer_config.json's add_bos_token / add_eos_token (default false) say which."""
    if impl.post_processor is not None or not config_file.is_file():
        return
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise TokenizerError(f"{config_file}: expected a JSON object")
    from tokenizers import processors

    def wanted(key: str) -> tuple[str, int] | None:
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        token_id = impl.token_to_id(token) if isinstance(token, str) else None
        # as transformers: a flag whose token is undefined adds nothing
        return (token, token_id) if config.get(f"add_{key}") and token_id is not None else None

    bos, eos = wanted("bos_token"), wanted("eos_token")
    pieces = ([f"{bos[0]}:0"] if bos else []) + ["$A:0"] + ([f"{eos[0]}:0"] if eos else [])
    single = " ".join(pieces)
    impl.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[t for t in (bos, eos) if t]
    )


def load_tokenizer(model_path: str | None, config: types.SimpleNamespace) -> Tokenizer | None:
    """The tokenizer for a launch, or None when prompts must come as input_ids.

    An embedded model (no `model_path`) uses bytes and BOS, explicitly, when its vocabulary
    has room for them; a checkpoint uses its tokenizer.json, and without one has none.
    """
    if model_path is not None:
        file = Path(model_path) / "tokenizer.json"
        return HFTokenizer(file) if file.exists() else None
    bos = getattr(config, "bos_token_id", None)
    bos = BYTE_BOS if not isinstance(bos, int) else bos
    if config.vocab_size <= max(255, bos):
        return None
    return ByteTokenizer(bos)


def missing_tokenizer(model_path: str | None) -> str:
    """Why text prompts are refused for a launch without a tokenizer (one line)."""
    if model_path is None:
        return "this model's vocabulary has no room for byte tokens; give input_ids instead"
    has_config = (Path(model_path) / "tokenizer_config.json").exists()
    also = " (tokenizer_config.json alone is not enough)" if has_config else ""
    return f"{model_path} has no tokenizer.json{also}, so text cannot be encoded; give input_ids"


def eos_ids(config: types.SimpleNamespace) -> frozenset[int]:
    """The ids that end generation, as transformers' generate reads them from the config."""
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return frozenset({BYTE_EOS}) if config.vocab_size > BYTE_EOS else frozenset()
    return frozenset(eos if isinstance(eos, list) else [eos])
