"""Loop bounds from program ids in Triton's CPU interpreter under numpy 2.4.

Written for triton 3.6.0. The interpreter holds a kernel's scalars (`tl.program_id`, a `tl.cdiv` of
an argument) as one-element numpy arrays and turns them into Python ints with `int(array)` when a
loop's `range` takes them (`tensor.__index__`). numpy 2.4.6 (requirements.txt) refuses that conversion
for arrays of one dimension ("only 0-dimensional arrays can be converted to Python scalars"), so a persistent kernel
(`for tile in range(tl.program_id(0), tiles, NUM_SMS)`, stages/kernels/gemm_epilogue.py) cannot run
in the interpreter. This converts through the array's one element instead. Compiled kernels (on a
GPU) never pass here. Only the tests run kernels in the interpreter; they call `apply()`.
"""

from __future__ import annotations

from . import require_known_version

KNOWN_TRITON = ("3.6.0",)


def apply() -> None:
    """Patch the interpreter's tensor conversion (idempotent)."""
    require_known_version("triton", KNOWN_TRITON, __name__)
    from triton.runtime import interpreter

    if getattr(interpreter._patch_lang_tensor, "_kontext_index", False):
        return
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._kontext_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor
