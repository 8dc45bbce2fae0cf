"""Chat messages to one prompt string: the checkpoint's chat template, else a plain format.

The template is the checkpoint's `chat_template.jinja`, or `chat_template` in its
`tokenizer_config.json`, rendered with jinja2 in a sandbox the way transformers renders
it. Without a template (the embedded models, or jinja2 not installed) the fallback is::

    system: You are terse.
    user: Hi!
    assistant:

one ``role: content`` line per message, then ``assistant:`` for the reply.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from engine.frontend.tokenizer import Tokenizer


class ChatError(ValueError):
    """Messages that cannot be rendered; the message says why (for a 400)."""


Renderer = Callable[[list[dict[str, Any]]], str]


def message_text(content: Any, where: str) -> str:
    """A message's content as text: a string, or a list of {"type": "text"} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ChatError(f"{where}.content[{i}]: only text parts are supported")
            if not isinstance(part.get("text"), str):
                raise ChatError(f"{where}.content[{i}].text must be a string")
            parts.append(part["text"])
        return "".join(parts)
    raise ChatError(f"{where}.content must be a string or a list of text parts")


def normalize(messages: Any) -> list[dict[str, Any]]:
    """Validated messages with text content (templates expect plain strings)."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ChatError(f"{where} must be an object")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise ChatError(f"{where}.role must be a non-empty string")
        out.append({**m, "role": role, "content": message_text(m.get("content"), where)})
    return out


def plain(messages: list[dict[str, Any]]) -> str:
    lines = [f"{m['role']}: {m['content']}\n" for m in messages]
    return "".join(lines) + "assistant:"


def _token_text(value: Any) -> str:
    # tokenizer_config stores special tokens as a string or as {"content": ...}
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _template_source(model_path: Path) -> tuple[str | None, dict[str, Any]]:
    config: dict[str, Any] = {}
    file = model_path / "tokenizer_config.json"
    if file.is_file():
        loaded = json.loads(file.read_text())
        config = loaded if isinstance(loaded, dict) else {}
    jinja_file = model_path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(), config
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name", "template"}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return (template if isinstance(template, str) else None), config


def _jinja(template: str, config: dict[str, Any]) -> Renderer:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ChatError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    compiled = env.from_string(template)
    tokens = {
        name: _token_text(config.get(name))
        for name in ("bos_token", "eos_token", "unk_token", "pad_token")
    }

    def render(messages: list[dict[str, Any]]) -> str:
        try:
            return compiled.render(messages=messages, add_generation_prompt=True, **tokens)
        except TemplateError as e:
            raise ChatError(f"the model's chat template failed: {e}") from None

    return render


class ChatFormat:
    """How a launch turns messages into prompt ids; `kind` is "template" or "plain"."""

    def __init__(self, model_path: str | None) -> None:
        self.render: Renderer = plain
        self.kind = "plain"
        self.bos_token = ""
        if model_path is None:
            return
        template, config = _template_source(Path(model_path))
        if template is None:
            return
        try:
            self.render = _jinja(template, config)
        except ImportError:
            return  # jinja2 is optional: the documented plain format instead
        self.kind = "template"
        self.bos_token = _token_text(config.get("bos_token"))

    def prompt(self, messages: Any) -> str:
        return self.render(normalize(messages))

    def encode(self, messages: Any, tokenizer: Tokenizer) -> list[int]:
        text = self.prompt(messages)
        # Templates write BOS themselves; a tokenizer that adds it too would double it
        # (transformers encodes the rendered text without special tokens).
        if self.bos_token and text.startswith(self.bos_token) and tokenizer.encode(""):
            text = text[len(self.bos_token) :]
        return tokenizer.encode(text)
