"""Compiles the selection kernels for the H100/H200 (sm_90) on a machine without a GPU: Triton lowers them to PTX
and ptxas (shipped in the triton wheel) assembles them, which the interpreter the other tests use never does.
Run without TRITON_INTERPRET, which would make every @triton.jit function an interpreted one; prints one line
per kernel and exits 1 if any failed."""

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from longreach.kernels import block_rank, block_scores, block_topk

TARGET = GPUTarget("cuda", 90, 32)


def compile_for_hopper(kernel, pointers: dict[str, str], constants: dict, floats=("scale",)) -> str | None:
    """The error compiling ``kernel`` with these pointer element types and constexpr values (every other argument
    an int32 scalar, ``floats`` float32), or None."""
    names = kernel.arg_names
    signature = {name: "constexpr" if name in constants else pointers.get(name, "fp32" if name in floats else "i32")
                 for name in names}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(name),): value for name, value in constants.items()})
    try:
        triton.compile(source, target=TARGET, options={"num_warps": 4, "num_stages": 2})
    except Exception as error:  # noqa: BLE001 - reported, with the kernel's name, to the test
        return f"{type(error).__name__}: {str(error)[:1500]}"
    return None


def cases():
    rank = {"Q": "*bf16", "K": "*bf16", "BIAS": "*fp32", "C": "*i64", "OUT": "*i64"}
    for bias in (False, True):
        yield f"block_rank bias={bias}", block_rank._rank_kernel, rank, dict(PART=64, D=128, SLOTS=16, TAKE=8,
                                                                              HAS_BIAS=bias)
    top = {"S": "*fp32", "OUT": "*i64"}
    for insert in (0, 1):
        yield f"block_topk insert={insert}", block_topk._top_blocks_kernel, top, dict(TAKE=16, SLOTS=16, TILE=256,
                                                                                     ROWS=16, INSERT=insert)
    scores = {"Q": "*bf16", "K": "*bf16", "BIAS": "*fp32", "OUT": "*fp32"}
    yield "block_scores", block_scores._block_max_kernel, scores, dict(PART=64, ROWS=64, KEYS=128, STEPS=16, D=128,
                                                                        DOT="tf32", HAS_BIAS=False)


def main() -> int:
    failed = 0
    for name, kernel, pointers, constants in cases():
        error = compile_for_hopper(kernel, pointers, constants)
        print(f"{name}: {'compiled' if error is None else error}")
        failed += error is not None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
