"""Model files and chat templates come from strangers: loading one must never run its code
(SECURITY.md, "Model files" and "Chat templates")."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers.models import WordLevel

from corelm.errors import CorelmError
from corelm.io.hf import config_to_hf, load_hf_model
from corelm.tokenizer import Tokenizer
from tests.test_io_hf import _model


class _Payload:
    """Unpickling this object calls ``os.system`` -- what a malicious ``pytorch_model.bin`` carries."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_payload_in_pytorch_model_bin_is_refused_with_one_line(tmp_path):
    config, model = _model("gpt2")
    marker = tmp_path / "payload-ran"
    d = tmp_path / "bin"
    d.mkdir()
    state = {k: v for k, v in model.state_dict().items()}
    state["evil"] = _Payload(str(marker))
    torch.save(state, d / "pytorch_model.bin")
    (d / "config.json").write_text(json.dumps(config_to_hf(config)))
    with pytest.raises(CorelmError) as info:
        load_hf_model(d)
    assert not marker.exists()
    assert "pytorch_model.bin" in str(info.value) and len(str(info.value).splitlines()) == 1


def _tokenizer(template: str) -> Tokenizer:
    backend = Backend(WordLevel({"<unk>": 0, "hi": 1}, unk_token="<unk>"))
    return Tokenizer(backend, special_tokens={"eos_token": "<unk>"}, chat_template=template)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",                 # reach object's subclasses
    "{{ messages.__class__.__init__.__globals__['os'].system('id') }}",  # reach a module's globals
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",         # the classic jinja escape
    "{% set x = messages.append({'role': 'x'}) %}{{ x }}",            # mutate the caller's data
])
def test_chat_templates_render_in_a_sandbox(template):
    tok = _tokenizer(template)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(CorelmError, match="chat template error"):
        tok.apply_chat_template(messages)
    assert messages == [{"role": "user", "content": "hi"}]
