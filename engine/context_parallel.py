"""The engine of a context-parallel launch: every rank runs every edit in lockstep, so that the
all-to-alls inside attention (stages/context_parallel.py) meet.

    torchrun --nproc_per_node=4 flux_kontext_optimized.py serve --context-parallel 4

Rank 0 serves HTTP; its engine sends each edit (request, config, and the seed it chose) to the other
ranks over a gloo "control" group before running it, and they run the same edit (`follow`). Three
things must agree across ranks beyond the inputs: the seed (rank 0 picks it), the text embeddings
(rank 0's are broadcast, which also covers any tokenizer that is not deterministic across
processes), and stopping early (rank 0's `should_stop` is broadcast after every step, so all ranks
stop at the same step or none does). Only rank 0's result is used. A shape whose token counts do
not divide by the number of ranks (diffusers splits evenly; several Kontext resolutions have an odd
token count) runs unsplit on every rank: the same result, without the speed-up.

The control group is gloo on the CPU with a long timeout: followers wait there between requests,
for as long as the server is idle, and NCCL's default timeout (10 minutes) would end them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import secrets

import torch
import torch.distributed as dist

from .engine import KontextEngine
from .requests import EditRequest, EditResult
from .sizes import SIZE_MULTIPLE, closest_kontext_resolution, output_size

log = logging.getLogger(__name__)

T5_TOKENS = 512  # FluxKontextPipeline pads the prompt to max_sequence_length
IDLE_TIMEOUT = datetime.timedelta(days=365)  # followers may wait this long for the next request
_control_group = None


def init_process_group() -> tuple[int, int, str]:
    """From torchrun's environment: (rank, world size, this rank's device). NCCL on GPUs, gloo on CPUs."""
    global _control_group
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        device = f"cuda:{local}"
    else:
        dist.init_process_group("gloo")
        device = "cpu"
    _control_group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return rank, world, device


def _broadcast_object(value=None):
    holder = [value]
    dist.broadcast_object_list(holder, src=0, group=_control_group)
    return holder[0]


class ContextParallelEngine(KontextEngine):
    """A KontextEngine whose edits run on every rank of the process group at once."""

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def builds_beside_edits(self) -> bool:
        return False  # every rank runs every edit in lockstep: a build on a side thread of one rank would break that order

    def edit(
        self,
        request: EditRequest,
        config=None,
        progress: bool = False,
        should_stop=None,
        wait_for_build: bool = True,
        warm_up: bool = False,
    ) -> EditResult:
        # wait_for_build changes nothing here: no build runs beside these edits (builds_beside_edits);
        # nor does warm_up: CUDA graphs are not captured under context parallelism (stages/rules.py)
        if self.rank != 0:
            raise RuntimeError("on context-parallel followers, edits come from rank 0 (follow())")
        if request.seed is None:  # every rank must draw the same noise
            request = dataclasses.replace(request, seed=secrets.randbelow(2**31))
        degree = self.resolve(config).effective.context_parallel
        if degree > 1 and not self._splits_evenly(request, degree):
            # diffusers splits tokens into equal shards: this shape runs whole on every rank instead (same result, no speed-up)
            log.info("context parallelism: this shape's token counts do not divide by %d; the edit runs unsplit", degree)
            config = (config or self.default_config).with_changes(context_parallel=1)
        _broadcast_object(("edit", request, config))
        return self._edit_in_lockstep(request, config, progress, should_stop)

    def _splits_evenly(self, request: EditRequest, degree: int) -> bool:
        """Image tokens (output + reference image) and text tokens (T5's 512) divide by `degree`, as
        FluxKontextPipeline will make them (it snaps the reference to a preferred resolution)."""
        spec = self.loaded.spec
        width, height = output_size(
            request.width, request.height, request.image.size if request.image else None, request.max_area or spec.default_max_area
        )
        tokens = (width // SIZE_MULTIPLE) * (height // SIZE_MULTIPLE)
        if request.image is not None:
            if spec.snap_input_to_kontext_resolutions:
                reference = closest_kontext_resolution(request.image.size[0] / request.image.size[1])
            else:
                reference = (width, height)  # resized to the output size (engine._conditioning_image)
            tokens += (reference[0] // SIZE_MULTIPLE) * (reference[1] // SIZE_MULTIPLE)
        return tokens % degree == 0 and T5_TOKENS % degree == 0

    def follow(self) -> None:
        """Ranks other than 0: run every edit rank 0 runs, until it says stop."""
        while True:
            message = _broadcast_object()
            if message[0] == "stop":
                return
            _, request, config = message
            try:
                self._edit_in_lockstep(request, config, False, None)
            except Exception as error:  # noqa: BLE001 - rank 0 sees the same failure and reports it
                log.warning("rank %d: edit failed as on rank 0 (%s: %s)", self.rank, type(error).__name__, error)

    def release_followers(self) -> None:
        if self.rank != 0:
            return
        try:
            _broadcast_object(("stop",))
        except RuntimeError as error:  # a follower is gone already (torchrun stops the others when one rank ends)
            log.warning("could not release the other ranks: %s", error)

    def _edit_in_lockstep(self, request, config, progress, should_stop) -> EditResult:
        rank0 = self.rank == 0

        def agreed_stop() -> bool:
            flag = torch.tensor([1 if rank0 and should_stop is not None and should_stop() else 0])
            dist.broadcast(flag, src=0, group=_control_group)
            return bool(flag.item())

        return super().edit(request, config, progress=progress and rank0, should_stop=agreed_stop)

    def denoise(self, prepared, timer, should_stop=None):
        with _shared_text_embeddings(prepared.pipe):
            return super().denoise(prepared, timer, should_stop)


@contextlib.contextmanager
def _shared_text_embeddings(pipe):
    """Rank 0's prompt embeddings on every rank (the pipeline object is per edit: patching it is local)."""
    encode = pipe.encode_prompt

    def encode_and_share(*args, **kwargs):
        prompt_embeds, pooled, text_ids = encode(*args, **kwargs)
        prompt_embeds, pooled = prompt_embeds.contiguous(), pooled.contiguous()
        dist.broadcast(prompt_embeds, src=0)
        dist.broadcast(pooled, src=0)
        return prompt_embeds, pooled, text_ids

    pipe.encode_prompt = encode_and_share
    try:
        yield
    finally:
        pipe.encode_prompt = encode
