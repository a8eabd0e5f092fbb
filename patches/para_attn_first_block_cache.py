"""para-attn's first-block cache, made to work with diffusers' current Flux single blocks.

Written for para-attn 0.3.38 with diffusers 0.42.1. para-attn's
`CachedTransformerBlocks.call_remaining_transformer_blocks` concatenates text and image tokens and
calls each FluxSingleTransformerBlock with that one tensor. Since diffusers 0.35 the single blocks
take both streams (`hidden_states, encoder_hidden_states, temb, ...`), concatenate them themselves
and return `(encoder_hidden_states, hidden_states)`, so para-attn fails with
"FluxSingleTransformerBlock.forward() missing 1 required positional argument:
'encoder_hidden_states'". The upstream fix is an open pull request.

Importing this module replaces that one method with a two-stream version (everything else in
para-attn is used as shipped). On an unknown para-attn version it raises PatchVersionError instead
of patching code it has not been checked against.
"""

from __future__ import annotations

from . import require_known_version

KNOWN_PARA_ATTN = ("0.3.38",)
KNOWN_DIFFUSERS = ("0.42.1",)


def _call_remaining_blocks_two_streams(self, hidden_states, encoder_hidden_states, *args, **kwargs):
    from para_attn.first_block_cache import utils

    original_hidden_states, original_encoder_hidden_states = hidden_states, encoder_hidden_states
    skip_layers = utils.is_slg_enabled()
    blocks = list(self.transformer_blocks[1:]) + list(self.single_transformer_blocks or [])
    for index, block in enumerate(blocks, start=1):
        if skip_layers and utils.slg_should_skip_block(index):
            continue
        # Double and single Flux blocks now share one signature and return (encoder, image) streams.
        output = block(hidden_states, encoder_hidden_states, *args, **kwargs)
        if self.return_hidden_states_first:
            hidden_states, encoder_hidden_states = output
        else:
            encoder_hidden_states, hidden_states = output
    hidden_states = hidden_states.contiguous()
    encoder_hidden_states = encoder_hidden_states.contiguous()
    return (
        hidden_states,
        encoder_hidden_states,
        hidden_states - original_hidden_states,
        encoder_hidden_states - original_encoder_hidden_states,
    )


def apply() -> str:
    """Patch para-attn (idempotent); returns the para-attn version patched."""
    version = require_known_version("para-attn", KNOWN_PARA_ATTN, __name__)
    require_known_version("diffusers", KNOWN_DIFFUSERS, __name__)
    from para_attn.first_block_cache import utils

    blocks_cls = utils.CachedTransformerBlocks
    if not getattr(blocks_cls, "_kontext_two_stream_patch", False):
        blocks_cls.call_remaining_transformer_blocks = _call_remaining_blocks_two_streams
        blocks_cls._kontext_two_stream_patch = True
    return version


apply()
