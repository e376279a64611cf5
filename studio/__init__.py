"""The studio's Gradio UI (studio.app builds it; one `<name>_tab.py` per tab).

Importing gradio defines ~80 component classes, and for each one gradio's ComponentMeta re-parses the
component's source file to regenerate its `.pyi` type stub in site-packages (create_or_modify_pyi): a
tool for authors of custom components, ~1.3 s of every studio start on 2 CPU cores (import gradio:
3.0 s -> 1.7 s). The hook below turns that step off for this process as gradio.component_meta is
first imported; components are built exactly as before (the step only writes stub files beside them).
STUDIO_GRADIO_STUBS=1 keeps gradio's behaviour.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

_TARGET = "gradio.component_meta"


def _no_stub(*_args, **_kwargs) -> None:
    return None


class _SkipStubs(importlib.abc.MetaPathFinder):
    """Finds gradio.component_meta as usual and, once it has run, swaps its stub writer for a no-op."""

    def find_spec(self, name, path=None, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)                  # one use: later imports go the usual way
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            if callable(getattr(module, "create_or_modify_pyi", None)):
                module.create_or_modify_pyi = _no_stub
        spec.loader.exec_module = exec_module
        return spec


if _TARGET not in sys.modules and os.environ.get("STUDIO_GRADIO_STUBS") != "1":
    sys.meta_path.insert(0, _SkipStubs())
