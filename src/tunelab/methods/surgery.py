"""Module surgery shared by the methods: which linear layers a method adapts, and swapping a layer in."""

from __future__ import annotations

from torch import nn

from tunelab.errors import TunelabError
from tunelab.quant import is_linear


def target_linear_names(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Qualified names of the linear layers to adapt: all of them but the LM head, or those whose
    last name component is listed."""
    output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if not is_linear(module) or module is output_head:
            continue
        if target_modules == "all-linear" or name.rsplit(".", 1)[-1] in target_modules:
            names.append(name)
    if not names:
        available = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear(m)})
        raise TunelabError(
            f"method.target_modules {target_modules!r} matches no linear layer; "
            f"available: {', '.join(available)}"
        )
    return names


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
