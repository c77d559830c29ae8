"""Startup hook of dualadam-hf: makes `--optim dualadam` known to transformers in every Python process.

Run at interpreter start by dualadam_hf_autoregister.pth. It imports nothing heavy: it only puts a finder on
sys.meta_path which, once transformers.training_args or transformers.trainer has finished importing, hands that
module to dualadam_hf.integrations.transformers to patch. Set DUALADAM_HF_NO_AUTOREGISTER=1 to turn it off.

It is invisible to processes that do not use DualAdam: nothing it does at import can print, warn or raise, also
under `python -W error`, PYTHONWARNINGS=error or pytest's `filterwarnings = error`. A transformers layout the
patch does not know is raised as one error where `dualadam` is asked for, not here.
"""

import os
import sys
import warnings

# The one place that names the opt-out variable. The package reads it from this module where the hook has run
# (to name it in its errors) but never imports this module: the hook imports the package, not the reverse.
OPT_OUT_VARIABLE = "DUALADAM_HF_NO_AUTOREGISTER"
_WATCHED_MODULES = frozenset({"transformers.training_args", "transformers.trainer"})


class _PatchAfterExec:
    """Loader wrapper: runs the real loader, then the patch. Other loader attributes pass through."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __repr__(self):
        return f"<dualadam-hf patch after {self._loader!r}>"

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _patch_quietly(module)


def _patch_quietly(module):
    """Hand the freshly imported module to dualadam-hf without letting anything out of `import transformers`.

    Warnings are ignored, not shown or raised, whatever the filters say: under `-W error` a warning from
    importing the package would otherwise escape as an exception. A failure here (the package removed but this
    file left behind, a broken install) leaves transformers as it is; `dualadam_hf.register()` shows the reason.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from dualadam_hf.integrations.transformers import on_module_loaded

            on_module_loaded(module)
    except Exception:  # noqa: BLE001 (the import of transformers must go on, as if dualadam-hf were absent)
        pass


class _TransformersWatcher:
    """Meta-path finder that only wraps the loader of the watched transformers modules."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _WATCHED_MODULES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchAfterExec(spec.loader)
        return spec


def install():
    """Put the watcher first on sys.meta_path unless opted out or already there."""
    if os.environ.get(OPT_OUT_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on"):
        return
    if any(type(finder).__name__ == _TransformersWatcher.__name__ for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _TransformersWatcher())


install()
