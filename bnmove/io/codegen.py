"""Write a converted model as readable Python code plus weights (torch.fx ``to_folder``)."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import fx, nn

from ..analysis.tracing import trace_module
from ..core.atomic import atomic_dir
from ..core.modules import first_line
from ..errors import BnmoveError

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


def _weightless_copy(model: fx.GraphModule) -> fx.GraphModule:
    """``model`` with every state-dict tensor on the meta device (no bytes), all else copied.

    Non-persistent buffers are not in the state dict, so they keep their values.
    """
    persistent = {id(t) for t in model.state_dict(keep_vars=True).values()}
    memo: dict[int, object] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) in persistent:
            meta = torch.empty_like(tensor, device="meta")
            memo[id(tensor)] = (
                nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
            )
    return copy.deepcopy(model, memo)


def write_code_folder(model: nn.Module, folder: Path, class_name: str = "ConvertedModel") -> Path:
    """``folder/module.py`` defines ``class_name``; its weights sit beside it, each stored once.

    fx's ``to_folder`` writes the state dict and, for every child it cannot write
    as code, a pickle of that child with its weights: every weight twice. Here the
    children are pickled weightless (meta tensors) and ``module.py`` loads the one
    ``state_dict.pt`` with ``assign=True``, which puts the real tensors in place.
    fx's absolute paths are rewritten relative to ``module.py`` so the folder can
    be moved (and so the atomic write's temporary name does not leak into the code).
    """
    model = require_graph_module(model)
    with atomic_dir(folder) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "saved as pickled files instead of reprs": expected
            _weightless_copy(model).to_folder(tmp, class_name)
        torch.save(model.state_dict(), tmp / "state_dict.pt")
        module_py = tmp / "module.py"
        code = module_py.read_text()
        load = f"self.load_state_dict(torch.load(r'{tmp}/state_dict.pt'))"
        if load not in code:
            raise BnmoveError("--code-dir: torch.fx wrote code this version of bnmove does not recognise")
        code = code.replace(load, f"self.load_state_dict(torch.load(r'{tmp}/state_dict.pt'), assign=True)")
        code = code.replace(f"r'{tmp}/", "_HERE + r'/").replace(f"r'{tmp}", "_HERE + r'")
        module_py.write_text(_PREAMBLE + code)
    return folder
