"""Vector steps that numba's loops do not vectorise by themselves, written as LLVM intrinsics: the
compaction of a row to the positions of its entries at or above a bound, and the count of them.

A branch-free compaction loop (``positions[m] = i; m += row[i] >= bound``) carries ``m`` from one entry to
the next and runs scalar: about 115 ns for a row of 256 (the Dynamic-k rows of the quick model). Here 16
entries are compared at once and the positions that pass are packed with LLVM's vector compress (one
``vpcompressd`` with AVX-512; a generic expansion on other CPUs, the same result) and stored together,
``m`` advancing by the mask's population count: about 27 ns, and no branch on the data. The count of a
short row (the 17-30 candidates of a Dynamic-k row, counted once per bisection step) is one 16-lane compare
and a population count per block, the last block's lanes past the end masked out of the load, where numba's
loop ran 4 lanes wide with a scalar tail. :func:`borrowed` drops an array's reference count from a view of
it, for loops whose helpers numba would otherwise reference-count (atomically) at every call.
"""

from __future__ import annotations

from .jit import AVAILABLE, inline

LANES = 16

if AVAILABLE:
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.core.errors import TypingError
    from numba.extending import intrinsic

    def _splat(builder, vector_type, scalar):
        vector = cgutils.get_null_value(vector_type)
        for lane in range(LANES):
            vector = builder.insert_element(vector, scalar, ir.Constant(ir.IntType(32), lane))
        return vector

    def _intrinsic(builder, name, result, arguments):
        fn_type = ir.FunctionType(result, [a.type for a in arguments])
        return builder.call(cgutils.get_or_insert_function(builder.module, fn_type, name), arguments)

    def _check_float_row(name, row):
        if not (isinstance(row, types.Array) and row.ndim == 1 and isinstance(row.dtype, types.Float)):
            raise TypingError(f"{name}: row must be a 1-D float array")

    def _at_least(builder, block, threshold):
        """(the 16-lane mask block >= threshold, NaN never, and its population count as an int64)."""
        passes = builder.fcmp_ordered(">=", block, _splat(builder, block.type, threshold))
        bits = builder.bitcast(passes, ir.IntType(LANES))
        return passes, builder.zext(_intrinsic(builder, "llvm.ctpop.i16", ir.IntType(LANES), [bits]), ir.IntType(64))

    @intrinsic
    def pack_at_least(typingctx, row, start, bound, positions, m):
        """Writes the positions ``start + q`` (q < 16) with ``row[start + q] >= bound`` (False for NaN), in
        order, to ``positions[m:]`` and returns m plus their count. ``row``: a contiguous 1-D float array with
        ``start + 16 <= len(row)``; ``positions``: contiguous int32 with 16 slots from ``m`` (all 16 lanes
        are stored; those past the count are scratch)."""
        _check_float_row("pack_at_least", row)
        if not (isinstance(positions, types.Array) and positions.ndim == 1 and positions.dtype == types.int32):
            raise TypingError("pack_at_least: positions must be a 1-D int32 array")
        signature = types.intp(row, types.intp, row.dtype, positions, types.intp)

        def codegen(context, builder, sig, args):
            values, first, threshold, out, count = args
            data = context.make_array(sig.args[0])(context, builder, values).data
            slots = context.make_array(sig.args[3])(context, builder, out).data
            lanes = ir.VectorType(context.get_value_type(sig.args[0].dtype), LANES)
            int32s = ir.VectorType(ir.IntType(32), LANES)
            block = builder.load(builder.bitcast(builder.gep(data, [first]), lanes.as_pointer()), align=1)
            passes, passed = _at_least(builder, block, threshold)
            ids = builder.add(_splat(builder, int32s, builder.trunc(first, ir.IntType(32))),
                              ir.Constant(int32s, list(range(LANES))))
            packed = _intrinsic(builder, "llvm.experimental.vector.compress.v16i32", int32s,
                                [ids, passes, cgutils.get_null_value(int32s)])
            builder.store(packed, builder.bitcast(builder.gep(slots, [count]), int32s.as_pointer()), align=1)
            return builder.add(count, passed)

        return signature, codegen

    @intrinsic
    def count_block_at_least(typingctx, row, start, stop, bound):
        """How many of ``row[start:min(start + 16, stop)]`` are >= bound (NaN never), ``start < stop <=
        len(row)``: one 16-lane compare and a population count (the lanes past ``stop`` are not loaded)."""
        _check_float_row("count_block_at_least", row)
        signature = types.intp(row, types.intp, types.intp, row.dtype)

        def codegen(context, builder, sig, args):
            values, first, last, threshold = args
            data = context.make_array(sig.args[0])(context, builder, values).data
            element = context.get_value_type(sig.args[0].dtype)
            lanes = ir.VectorType(element, LANES)
            int64s = ir.VectorType(ir.IntType(64), LANES)
            inside = builder.icmp_signed("<", ir.Constant(int64s, list(range(LANES))),
                                         _splat(builder, int64s, builder.sub(last, first)))
            pointer = builder.bitcast(builder.gep(data, [first]), lanes.as_pointer())
            nan = _splat(builder, lanes, ir.Constant(element, float("nan")))
            block = _intrinsic(builder, f"llvm.masked.load.v16{'f32' if element == ir.FloatType() else 'f64'}.p0",
                               lanes, [pointer, ir.Constant(ir.IntType(32), 1), inside, nan])
            return _at_least(builder, block, threshold)[1]

        return signature, codegen

    @intrinsic
    def borrowed(typingctx, array):
        """``array`` without its reference count (no meminfo, no parent): it and its views are not
        reference-counted. Only for arrays someone else keeps alive for as long as it is used (a jitted
        function's arguments, which its Python caller holds)."""
        def codegen(context, builder, sig, args):
            view = context.make_array(sig.args[0])(context, builder, args[0])
            view.meminfo = cgutils.get_null_value(view.meminfo.type)
            view.parent = cgutils.get_null_value(view.parent.type)
            return view._getvalue()

        return array(array), codegen

else:  # plain Python, for the loops' uncompiled fallbacks: the same results
    def count_block_at_least(row, start, stop, bound):
        return sum(1 for i in range(start, min(start + LANES, stop)) if row[i] >= bound)

    def borrowed(array):
        return array

    def pack_at_least(row, start, bound, positions, m):
        for i in range(start, start + LANES):
            if row[i] >= bound:
                positions[m] = i
                m += 1
        return m


@inline
def positions_at_least(row, bound, positions):
    """positions[:m] = the positions of row's entries >= bound, in order; returns m. ``row``: contiguous
    float; ``positions``: int32, as long as the row."""
    n = row.shape[0]
    whole = n - n % LANES
    m = 0
    for start in range(0, whole, LANES):  # m <= start: the 16 slots stored from m lie within the row's
        m = pack_at_least(row, start, bound, positions, m)
    for i in range(whole, n):  # the last n % 16, branch-free
        positions[m] = i
        m += row[i] >= bound
    return m


@inline
def count_at_least(row, n, bound):
    """How many of row[:n] are >= bound (NaN never), 16 at a time. ``row``: contiguous float."""
    count = 0
    for start in range(0, n, LANES):
        count += count_block_at_least(row, start, n, bound)
    return count
