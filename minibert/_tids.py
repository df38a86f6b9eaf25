"""The kernel behind runtime's pinning: each thread of the caller's Numba team writes its Linux
thread id. A module of its own, imported at first use (importing Numba loads NumPy's BLAS, whose
environment runtime.configure() sets first), and cached like the kernels: compiled in every
process, it was most of a warm start."""
from llvmlite import ir
from numba import get_thread_id, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def _gettid(typingctx):  # glibc's gettid() (2.30+; runtime checks that libc has it)
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "gettid")
        return builder.sext(builder.call(fn, []), ir.IntType(64))

    return types.int64(), codegen


@njit(parallel=True, cache=True, nogil=True)
def record(out):  # out: int64 [n], n the team's size
    for _ in prange(out.shape[0]):
        out[get_thread_id()] = _gettid()
