"""Write a converted model as readable Python code plus weights (torch.fx ``to_folder``)."""

from __future__ import annotations

import warnings
from pathlib import Path

from torch import fx, nn

from .._atomic import atomic_dir
from ..analysis.tracing import trace_module
from ..errors import BnmoveError
from ..moving.surgery import first_line

_PREAMBLE = "import os\n_HERE = os.path.dirname(os.path.abspath(__file__))\n"


def require_graph_module(model: nn.Module) -> fx.GraphModule:
    """``model`` traced whole with torch.fx (a GraphModule passes through)."""
    if isinstance(model, fx.GraphModule):
        return model
    try:
        return trace_module(model)
    except Exception as exc:
        raise BnmoveError(
            f"--code-dir needs a model whose whole forward traces with torch.fx; this one does not "
            f"({first_line(exc)})"
        ) from None


def write_code_folder(model: nn.Module, folder: Path, class_name: str = "ConvertedModel") -> Path:
    """``folder/module.py`` defines ``class_name``; its weights sit beside it.

    fx's ``to_folder`` writes absolute paths to the files it pickles; they are
    rewritten relative to ``module.py`` so the folder can be moved (and so the
    atomic write's temporary name does not leak into the code).
    """
    model = require_graph_module(model)
    with atomic_dir(folder) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "saved as pickled files instead of reprs": expected
            model.to_folder(tmp, class_name)
        module_py = tmp / "module.py"
        code = module_py.read_text()
        code = code.replace(f"r'{tmp}/", "_HERE + r'/").replace(f"r'{tmp}", "_HERE + r'")
        module_py.write_text(_PREAMBLE + code)
    return folder
