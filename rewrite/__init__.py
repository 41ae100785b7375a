"""rewrite: a compiler for attention.

Capture a PyTorch transformer, find every attention site by graph structure, rewrite it with
passes from recent research, lower it to eager/Triton/ONNX Runtime and verify every step.

    conv = rewrite.convert(model, passes="gqa{kv_heads=2}", example_inputs=(input_ids,))
"""
from __future__ import annotations

import importlib.util as _ilu
import os as _os
import sys as _sys
import warnings as _warnings

from .errors import (BackendError, CaptureError, EvaluationError, NoAttentionError, PassError, RewriteError,
                     SpecError, VerificationError)

__version__ = "0.1.0"


def _mount(sub: str) -> None:
    """Expose the top-level ``passes/`` and ``backends/`` folders as ``rewrite.passes``/``rewrite.backends``.

    An installed wheel has them inside the package already; a source checkout or an editable
    install keeps them beside it, and this loads them from there under the ``rewrite.`` name.
    """
    full = f"{__name__}.{sub}"
    here = _os.path.dirname(_os.path.abspath(__file__))
    if full in _sys.modules or _os.path.isfile(_os.path.join(here, sub, "__init__.py")):
        return
    folder = _os.path.join(_os.path.dirname(here), sub)
    init = _os.path.join(folder, "__init__.py")
    if not _os.path.isfile(init):
        return
    spec = _ilu.spec_from_file_location(full, init, submodule_search_locations=[folder])
    module = _ilu.module_from_spec(spec)
    _sys.modules[full] = module
    setattr(_sys.modules[__name__], sub, module)
    spec.loader.exec_module(module)


# torch's own pytree emits this when a captured graph is deep-copied (every stage); nothing for users to act on
_warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)

from .api import Converted, convert, inspect, load  # noqa: E402
from .pipeline import parse as parse_pipeline  # noqa: E402

_mount("backends")
_mount("passes")

from .hf_remote import register_on_demand as _register_on_demand  # noqa: E402

_register_on_demand()  # saved custom-code folders load without trust_remote_code where rewrite is installed

__all__ = ["convert", "inspect", "load", "Converted", "parse_pipeline", "RewriteError", "CaptureError",
           "NoAttentionError", "SpecError", "PassError", "VerificationError", "BackendError", "EvaluationError",
           "load_onnx_decoder", "evaluate", "distill", "analyze"]


def __getattr__(name):  # lazy: analysis and distillation pull in more code
    if name == "analyze":
        from .analysis import analyze
        return analyze
    if name == "evaluate":
        from .evaluate import evaluate
        return evaluate
    if name == "distill":
        from .distill import distill
        return distill
    if name == "load_onnx_decoder":
        from .backends.onnx_generate import load_onnx_decoder
        return load_onnx_decoder
    raise AttributeError(f"module 'rewrite' has no attribute {name!r}")
