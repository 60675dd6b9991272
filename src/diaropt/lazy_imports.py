"""Third-party imports the command line defers until they are used (issue 19, start-up).

``import pyannote.core`` (6.1) builds its notebook display at import time (``notebook = Notebook()``
in ``pyannote/core/notebook.py``), which imports ``matplotlib.pyplot``: about 0.4-0.6 s of every
``python -m diaropt diarize`` start-up on the 2-core benchmark host (``benchmarks/startup_profile.py``,
``python -X importtime``), for a display the command never shows. :func:`import_pyannote_core_without_pyplot`
imports pyannote.core with matplotlib hidden, so pyannote.core takes its own "matplotlib is not
installed" path, then gives ``pyannote.core.notebook`` back on first use (it then imports matplotlib).

Used by the command line only; a library import of diaropt (notebooks, tests) imports pyannote.core as is.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Any

__all__ = ["import_pyannote_core_without_pyplot"]


class _HideMatplotlib(importlib.abc.MetaPathFinder):
    """A finder that makes ``matplotlib`` and its submodules unimportable while installed."""

    def find_spec(self, fullname: str, path: object, target: object = None) -> None:
        if fullname == "matplotlib" or fullname.startswith("matplotlib."):
            raise ModuleNotFoundError(f"{fullname} deferred by diaropt.lazy_imports", name=fullname)
        return None


class _CoreWithLazyNotebook(ModuleType):
    """``pyannote.core`` whose ``notebook`` attribute is pyannote.core's ``Notebook`` instance, built on
    first access (importing matplotlib then).

    A property, not a module ``__getattr__``: importing the submodule ``pyannote.core.notebook`` (as
    ``Annotation._repr_png_`` does, or ``import pyannote.core.notebook``) binds the submodule object to
    ``pyannote.core.notebook``; the setter keeps the submodule's ``notebook`` instance instead, as
    pyannote.core's own ``from .notebook import notebook`` does on a plain import.
    """

    @property
    def notebook(self) -> Any:
        state = vars(self)
        if "notebook" not in state:
            try:  # the import system binds the submodule through the setter below
                submodule = importlib.import_module(f"{self.__name__}.notebook")
            except ImportError as error:  # no matplotlib: as on a plain import, pyannote.core has no notebook
                raise AttributeError(f"module {self.__name__!r} has no attribute 'notebook' ({error})") from error
            state.setdefault("notebook", submodule.notebook)
        return state["notebook"]

    @notebook.setter
    def notebook(self, value: Any) -> None:
        if isinstance(value, ModuleType) and value.__name__ == f"{self.__name__}.notebook":
            value = value.notebook  # the submodule, bound by the import system: keep its Notebook instance
        vars(self)["notebook"] = value


def import_pyannote_core_without_pyplot() -> ModuleType:
    """Import and return ``pyannote.core`` without importing matplotlib.

    A no-op (plain import) when pyannote.core or matplotlib is already imported. Afterwards
    ``pyannote.core.notebook`` (``from pyannote.core import notebook``) is still pyannote.core's
    ``Notebook`` instance, also after ``Annotation._repr_png_`` or ``import pyannote.core.notebook``:
    it is built on first access. Raises whatever ``import pyannote.core`` raises.
    """
    if "pyannote.core" in sys.modules or "matplotlib" in sys.modules:
        return importlib.import_module("pyannote.core")
    hide = _HideMatplotlib()
    sys.meta_path.insert(0, hide)
    try:
        core = importlib.import_module("pyannote.core")
    finally:
        sys.meta_path.remove(hide)
    if "notebook" not in vars(core):  # pyannote.core's notebook import failed (as intended) above
        core.__class__ = _CoreWithLazyNotebook
        if "notebook" not in core.__all__ and _findable("matplotlib"):
            core.__all__ = [*core.__all__, "notebook"]  # as a plain import lists it (``import *``)
    return core


def _findable(name: str) -> bool:
    """Whether the top-level module ``name`` could be imported (found, not imported)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
