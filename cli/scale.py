"""Scale-out choices of the command line that need a little checking: which GPUs `serve --gpus` runs
a worker process on."""

from __future__ import annotations


def worker_gpus(text: str, device: str | None) -> list[str | None]:
    """`serve --gpus` -> one entry per worker process: a GPU id, or None for a CPU worker (--device cpu).

    The GPUs are counted without creating a CUDA context here: the workers are spawned, and each
    creates its own on its own GPU."""
    cpu = device is not None and device.startswith("cpu")
    if device is not None and not cpu:
        raise ValueError(f"--gpus picks the GPUs itself; leave out --device {device} (or give --device cpu for CPU workers)")
    text = text.strip().lower()
    if text == "all":
        if cpu:
            raise ValueError("--gpus all --device cpu: say how many CPU worker processes, e.g. --gpus 0,1 --device cpu")
        import torch

        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError("--gpus all: torch sees no CUDA GPU here; for CPU worker processes give --gpus 0,1 --device cpu")
        ids = [str(index) for index in range(count)]
    else:
        ids = [part.strip() for part in text.split(",") if part.strip()]
        if not ids or not all(part.isdigit() for part in ids):
            raise ValueError(f"--gpus {text!r}: write all, or GPU ids such as 0,1,3")
        if len(set(ids)) != len(ids):
            raise ValueError(f"--gpus {text!r} names a GPU twice; one worker process per GPU")
        if not cpu:
            import torch

            count = torch.cuda.device_count()
            missing = [gpu for gpu in ids if int(gpu) >= count]
            if missing:
                raise ValueError(f"--gpus {text}: GPU(s) {', '.join(missing)} not found; torch sees {count} CUDA GPU(s)")
    return [None if cpu else gpu for gpu in ids]
