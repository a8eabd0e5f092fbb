"""Byte accounting that also sees inside torchao's quantized tensor subclasses."""

from __future__ import annotations

import torch


def leaf_tensors(tensor: torch.Tensor):
    """The plain tensors that hold a (possibly quantized, wrapper-subclass) tensor's data."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            yield from leaf_tensors(getattr(tensor, name))
    else:
        yield tensor


def tensor_bytes(tensor: torch.Tensor) -> int:
    return sum(leaf.numel() * leaf.element_size() for leaf in leaf_tensors(tensor))


def is_quantized(tensor: torch.Tensor) -> bool:
    """A torchao quantized tensor (a wrapper subclass), told apart without importing torchao."""
    return type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__")


def has_quantized_weights(module: torch.nn.Module) -> bool:
    return any(is_quantized(parameter) for parameter in module.parameters())
