"""The project's own modules, reached from this folder's location (the repository root is its parent), as ComfyUI
loads a custom node: `custom_nodes/<pack>/__init__.py` by file path, the repository not on sys.path. Link the folder
(`ln -s /path/to/diffusion-4k/comfyui ComfyUI/custom_nodes/diffusion-4k`) so that its parent is the repository."""
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_from_repository(name):
    """The repository's module `name`, imported with the repository root on sys.path only while it imports. Modules
    of other packs that share a name with one of the repository's (`errors`, ...) are set aside meanwhile and put
    back afterwards: this pack holds its own."""
    if not (ROOT / f"{name}.py").is_file():
        raise ImportError(f"Diffusion-4K nodes: {ROOT} holds no {name}.py. Link the repository's comfyui/ folder "
                          f"into ComfyUI/custom_nodes (ln -s) instead of copying it, so that it finds the repository.")
    own = {path.stem for path in ROOT.glob("*.py")}
    foreign = {key: module for key, module in sys.modules.items() if key.split(".")[0] in own
               and Path(getattr(module, "__file__", None) or "/").resolve().parent != ROOT}
    for key in foreign:
        del sys.modules[key]
    sys.path.insert(0, str(ROOT))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT))
        sys.modules.update(foreign)
