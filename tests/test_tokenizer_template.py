"""The chat template from a model folder renders as transformers' apply_chat_template renders it."""

from __future__ import annotations

import json
import shutil

import pytest

from bitnet_tt.config import ModelConfig
from bitnet_tt.errors import ConfigError, RequestError
from bitnet_tt.tokenizer import ChatMessage, Tokenizer

# Written here in the shape of Llama 3's template: header tokens, trimmed content, a default system message.
LLAMA3_STYLE = (
    "{{ bos_token }}{% set ns = namespace(system=false) %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}{% set ns.system = true %}{% endif %}"
    "{% endfor %}{% if not ns.system %}{{ '<|start_header_id|>system<|end_header_id|>\n\n"
    "You are helpful.<|eot_id|>' }}{% endif %}\n"
    "{% for message in messages %}\n"
    "  {% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}\n"
    "  {{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim "
    "+ '<|eot_id|>' }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Alternating roles enforced with raise_exception, loop controls and tojson, as Mistral-style templates do.
ALTERNATING = (
    "{% for message in messages %}{% if loop.index0 == 0 and message['role'] == 'system' %}"
    "{{ '[SYS]' + message['content'] | tojson + '[/SYS]' }}{% continue %}{% endif %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == (1 if messages[0]['role'] == 'system' else 0)) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
# Assistant turns marked with transformers' {% generation %} tag (for training masks), as some templates do.
GENERATION_TAG = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ 'A: ' }}{% generation %}"
    "{{ message['content'] + eos_token }}{% endgeneration %}{% else %}{{ message['role'][0] | upper + ': ' "
    "+ message['content'] + '\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'A: ' }}{% endif %}"
)
CONVERSATIONS = [
    [("user", "Hi")],
    [("system", "Be brief."), ("user", "Hello there!")],
    [("system", "You are a fox."), ("user", "你好 🙂"), ("assistant", "  Hello!  "), ("user", 'Say "quote" <b>')],
    [("user", "one"), ("assistant", ""), ("user", "three\nlines\n")],
]


@pytest.fixture(scope="module", params=["synthetic", "llama3_style", "alternating", "generation_tag", "jinja_file"])
def folder(request, model_factory, tmp_path_factory):
    """A model folder whose template is the synthetic checkpoint's own, or one written here."""
    source = model_factory("packed")
    if request.param == "synthetic":
        return source
    folder = tmp_path_factory.mktemp(request.param)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, folder / name)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    if request.param == "jinja_file":  # the file wins over tokenizer_config.json, as in transformers
        (folder / "chat_template.jinja").write_text(LLAMA3_STYLE.replace("You are helpful.", "From the file."))
    else:
        settings["chat_template"] = {"llama3_style": LLAMA3_STYLE, "alternating": ALTERNATING,
                                     "generation_tag": GENERATION_TAG}[request.param]
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return folder


@pytest.fixture(scope="module")
def ours_and_theirs(folder):
    from transformers import AutoTokenizer

    return Tokenizer(folder, ModelConfig.from_folder(folder)), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendering_equals_transformers(ours_and_theirs, conversation, add_generation_prompt):
    ours, theirs = ours_and_theirs
    messages = [ChatMessage(role, content) for role, content in conversation]
    as_dicts = [{"role": role, "content": content} for role, content in conversation]
    text = theirs.apply_chat_template(as_dicts, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids = theirs.apply_chat_template(as_dicts, tokenize=True, add_generation_prompt=add_generation_prompt,
                                     return_dict=False)
    assert ours.render_chat(messages, add_generation_prompt) == text
    assert ours.encode_chat(messages, add_generation_prompt) == list(ids)


def test_a_template_that_refuses_is_a_request_error(model_factory, tmp_path):
    source = model_factory("packed")
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(source / name, tmp_path / name)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>",
                                                                "chat_template": ALTERNATING}))
    tokenizer = Tokenizer(tmp_path, ModelConfig.from_folder(tmp_path))
    with pytest.raises(RequestError, match="roles must alternate"):
        tokenizer.encode_chat([ChatMessage("user", "a"), ChatMessage("user", "b")])
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(ConfigError, match="not valid Jinja"):
        Tokenizer(tmp_path, ModelConfig.from_folder(tmp_path))


def test_without_a_template_the_2b4t_format_is_used(model_factory, tmp_path):
    source = model_factory("packed")
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(source / name, tmp_path / name)
    settings = json.loads((source / "tokenizer_config.json").read_text())
    del settings["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    tokenizer = Tokenizer(tmp_path, ModelConfig.from_folder(tmp_path))
    assert tokenizer.chat_template is None
    rendered = tokenizer.render_chat([ChatMessage("system", "S"), ChatMessage("user", "U")])
    assert rendered == "<|begin_of_text|>System: S<|eot_id|>User: U<|eot_id|>Assistant: "
    with pytest.raises(RequestError, match="unknown chat role"):
        tokenizer.render_chat([ChatMessage("robot", "beep")])
