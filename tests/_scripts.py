"""The repository's scripts (``tools/*.py``, ``datasets/*.py``) as modules, for the tests that call
their functions: scripts are not a package, so each is loaded from its file (once per process)."""
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script(relpath):
    """``load_script("tools/ablation.py")`` -> the module, registered in ``sys.modules`` by its stem."""
    path = REPO / relpath
    name = path.stem
    module = sys.modules.get(name)
    if module is not None and Path(getattr(module, "__file__", "") or "").resolve() == path:
        return module
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
