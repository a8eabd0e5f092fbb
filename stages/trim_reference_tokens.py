"""Stage 1: the reference image's tokens dropped before the transformer's final norm and projection.

In an edit, the transformer runs over the noisy output tokens followed by the input image's tokens
(4096 + 4096 at 1024x1024), and after the last block FluxKontextPipeline keeps only the first 4096
of its output (`noise_pred[:, : latents.size(1)]`). The final AdaLayerNorm and projection act on
each token alone, so computing them for the output tokens only gives exactly the same result and
skips the work that was thrown away. Text to image has no reference tokens: nothing changes.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .base import Stage


class OutputTokensNorm(nn.Module):
    """Wraps the transformer's `norm_out`: keeps the first `keep` tokens when a request sets it."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm
        self.keep: int | None = None

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if self.keep is not None:
            hidden_states = hidden_states[:, : self.keep]
        return self.norm(hidden_states, temb)


@contextlib.contextmanager
def _keeping(norm: OutputTokensNorm, tokens: int):
    norm.keep = tokens
    try:
        yield
    finally:
        norm.keep = None  # a request's size never reaches the next request


class TrimReferenceTokens(Stage):
    switch = "trim_reference_tokens"
    title = "reference tokens dropped before the final projection"
    summary = "The input image's tokens are dropped before the final norm and projection, whose output the pipeline discards."

    def apply_execution(self, transformer, config, build):
        transformer.norm_out = OutputTokensNorm(transformer.norm_out)
        build.note("transformer: final norm and projection on the output tokens only")

    def apply_request(self, run, config):
        run.contexts.append(_keeping(run.transformer.norm_out, run.output_tokens))
