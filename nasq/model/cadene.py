"""Cadene's NASNet-A module file, ``pretrainedmodels/models/nasnet.py``, loaded by itself.

``import pretrainedmodels`` runs the package's ``__init__``, which imports every model family it
offers and, through them, torchvision and ``torch._dynamo``: about 2.3 s of CPU in each process
that loads a model, for one module that needs only torch. The file is the installed package's
own, unmodified, registered under its usual name (so ``pretrainedmodels.models.nasnet`` imported
later is this same module).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

from ..errors import CheckpointError

NAME = "pretrainedmodels.models.nasnet"


def nasnet() -> ModuleType:
    """The module ``pretrainedmodels.models.nasnet`` (``NASNetALarge``, its cells and branches)."""
    loaded = sys.modules.get(NAME)
    if loaded is not None:
        return loaded
    package = importlib.util.find_spec("pretrainedmodels")  # finds the folder; runs no __init__
    if package is None or not package.submodule_search_locations:
        raise CheckpointError("the pretrainedmodels package is not installed: pip install 'nasq[torch]'")
    path = os.path.join(list(package.submodule_search_locations)[0], "models", "nasnet.py")
    spec = importlib.util.spec_from_file_location(NAME, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[NAME]
        raise
    return module
