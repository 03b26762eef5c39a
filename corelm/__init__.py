"""corelm: large language models from first principles to fast execution.

The public API is small and asserted by ``tests/test_api.py``::

    import corelm
    llm = corelm.load("smollm2-135m-instruct")
    llm.generate("hello", max_new_tokens=20)

Every ``corelm <command>`` is also a function of an options dataclass in ``corelm.commands.<command>``
(the same function the command line calls)::

    from corelm.commands.quantize import QuantizeOptions, quantize
    quantize(QuantizeOptions("smollm2-135m-instruct", "q4", method="int4"))
"""

from __future__ import annotations

__version__ = "0.1.0"

from corelm.config import ModelConfig
from corelm.errors import CorelmError


def load(name_or_path: str, **kwargs):
    """Load a model by preset/embedded name or path (HF dir, safetensors dir, .gguf). See :func:`corelm.api.load`."""
    from corelm.api import load as _load

    return _load(name_or_path, **kwargs)


__all__ = ["CorelmError", "ModelConfig", "__version__", "load"]
