"""The OpenAI wire format's pure parts, without a server: chat templates and incremental
detokenization."""

from __future__ import annotations

import json

import pytest

from engine.frontend.tokenizer import ByteTokenizer
from engine.http.chat import ChatError, ChatFormat
from engine.http.detokenize import TextStream

CHATML = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}"
    "{{ raise_exception('no tools here') }}{% endif %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_template_renders_like_transformers(tmp_path):
    from transformers.utils.chat_template_utils import render_jinja_template

    config = {"chat_template": CHATML, "bos_token": {"content": "<s>"}, "eos_token": "</s>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    chat = ChatFormat(str(tmp_path))
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "!"}],
        },
    ]
    flat = [messages[0], {"role": "user", "content": "Hi !"}]
    want = render_jinja_template(
        [flat], chat_template=CHATML, add_generation_prompt=True, bos_token="<s>"
    )[0][0]
    assert chat.kind == "template" and chat.prompt(messages) == want
    # the template writes BOS as text; a tokenizer that adds BOS itself must not double it
    ids = chat.encode(messages, ByteTokenizer())
    assert ids == ByteTokenizer().encode(want.removeprefix("<s>"))
    with pytest.raises(ChatError, match="no tools here"):
        chat.prompt([{"role": "tool", "content": "x"}])
    with pytest.raises(ChatError, match="only text parts"):
        chat.prompt([{"role": "user", "content": [{"type": "image_url"}]}])


def test_text_stream_releases_only_final_text():
    tok = ByteTokenizer()
    ids = list("añ€ STOP b".encode())  # multi-byte characters split across byte tokens
    stream = TextStream(tok, ("STOP",))
    pieces = []
    for i in ids:
        pieces.append(stream.add(i))
        assert "\ufffd" not in pieces[-1]
        if stream.stopped:
            break
    assert "".join(pieces) == "añ€ " and stream.stopped
    # a tail that could start a stop string is held until it cannot
    stream = TextStream(tok, ("STOP",))
    assert [stream.add(i) for i in b"xST"] == ["x", "", ""]
    assert stream.add(ord("x")) == "STx" and not stream.stopped
    assert stream.add(257) == "" and stream.flush() == ""
