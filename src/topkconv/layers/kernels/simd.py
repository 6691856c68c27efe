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

:func:`taps_block_3x3` is a 3 x 3 TopKConv's input gradient for 16 output positions of one (sample, input
channel): the nine taps' sums held in nine vector registers over the output channels that selected the
input channel. numba's own loop over the positions kept its sums in memory and checked the rows for
overlap at every (channel, tap): 2.3x slower than the dense-order loop it was to replace; this is 1.9x
faster than that loop at 64 x 64 x 4 x 4 -> 64, k = 32. :func:`weight_taps_block_3x3` (the weight gradient,
lane by lane over samples) and :func:`routed_block_3x3` (the sum criterion's output from the selected input
channels alone) are built the same way.

:func:`top_k_sums_block` is Dynamic-k's forward value for 16 samples of one output row at once, one sample a lane:
the k largest products so far held sorted in k vector registers, each new product sinking through them (a max
and a min per register), so no row is ever searched; a second pass adds the chosen products in input order, so
the value is the search loops' to the bit. It also gives each row's k-th value, from which training's forward
takes the indices. For k <= 16 (:data:`MAX_NETWORK_K`; more registers spill) the value alone takes 0.97 ms
against the search loops' 2.0 at the quick model's 256 -> 128, k = 13, batch 64 (0.61 ms without the second
pass, whose largest-first sum differed from theirs in the last bits). :func:`count_down_block` counts a
bisection's keys down 16 columns at once in one register, and :func:`trailing_zeros` is ``tzcnt``.
"""

from __future__ import annotations

from .jit import AVAILABLE, inline

LANES = 16
TAPS_3X3 = 9
# The largest k of top_k_sums_block: k sorted registers, the product and the running total fit in AVX-512's 32
# (measured at k = 32: 2.6x slower than at 13, the registers spilled to memory).
MAX_NETWORK_K = 16

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

    def _lanes_inside(builder, first, stop):
        """The 16-lane mask of lanes first + q < stop."""
        int64s = ir.VectorType(ir.IntType(64), LANES)
        return builder.icmp_signed("<", ir.Constant(int64s, list(range(LANES))),
                                   _splat(builder, int64s, builder.sub(stop, first)))

    def _i64(value):
        return ir.Constant(ir.IntType(64), value)

    def _suffix(element):
        """LLVM's name for a lane type in an intrinsic's name: f32, f64, or i<width> for integers."""
        if isinstance(element, ir.IntType):
            return f"i{element.width}"
        return "f32" if element == ir.FloatType() else "f64"

    def _masked_load(builder, pointer, inside, filler):
        lanes = filler.type
        return _intrinsic(builder, f"llvm.masked.load.v16{_suffix(lanes.element)}.p0", lanes,
                          [builder.bitcast(pointer, lanes.as_pointer()), ir.Constant(ir.IntType(32), 1), inside,
                           filler])

    def _masked_store(builder, value, pointer, inside):
        arguments = [value, builder.bitcast(pointer, value.type.as_pointer()), ir.Constant(ir.IntType(32), 1), inside]
        _intrinsic(builder, f"llvm.masked.store.v16{_suffix(value.type.element)}.p0", ir.VoidType(), arguments)

    def _check_c_arrays(name, *arrays):  # (array type, ndim) pairs
        for array, ndim in arrays:
            if not (isinstance(array, types.Array) and array.ndim == ndim and array.layout == "C"):
                raise TypingError(f"{name}: expected a C-contiguous {ndim}-D array, got {array}")

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
            nan = _splat(builder, ir.VectorType(element, LANES), ir.Constant(element, float("nan")))
            block = _masked_load(builder, builder.gep(data, [first]), _lanes_inside(builder, first, last), nan)
            return _at_least(builder, block, threshold)[1]

        return signature, codegen

    def _arrays(context, builder, sig, args):
        return [context.make_array(t)(context, builder, a) if isinstance(t, types.Array) else a
                for t, a in zip(sig.args, args)]

    def _check_taps_arrays(name, channels, *floats):
        """channels: a C-contiguous 1-D int32 array; floats: (array type, ndim) pairs, C-contiguous, one float
        type."""
        _check_c_arrays(name, (channels, 1), *floats)
        dtypes = {array.dtype for array, _ in floats}
        if not (len(dtypes) == 1 and isinstance(floats[0][0].dtype, types.Float) and channels.dtype == types.int32):
            raise TypingError(f"{name}: expected float arrays of one type and int32 channels")

    def _for_chosen_rows(builder, g_b, channels, count, first, inside, body):
        """body(c, block) for c = channels[t], t < count, block = g_b[c, first:first + 16] (lanes past the
        row's end read as 0)."""
        positions = builder.extract_value(g_b.shape, 1)
        zero = ir.Constant(ir.VectorType(g_b.data.type.pointee, LANES), None)
        with cgutils.for_range(builder, count) as loop:
            c = builder.sext(builder.load(builder.gep(channels.data, [loop.index])), ir.IntType(64))
            row = builder.gep(g_b.data, [builder.add(builder.mul(c, positions), first)])
            body(c, _masked_load(builder, row, inside, zero))

    def _fmuladd(builder, a, b, c):
        return _intrinsic(builder, f"llvm.fmuladd.v16{_suffix(a.type.element)}", a.type, [a, b, c])

    @intrinsic
    def taps_block_3x3(typingctx, w_i, g_b, chosen, n, start, grad_cols_i):
        """grad_cols_i[j, start:start + 16] = the sum over t < n of w_i[j, c] * g_b[c, start:start + 16], c =
        chosen[t], for the nine taps j of a 3 x 3 kernel: the input gradient's columns at 16 output positions of
        one (sample, input channel). w_i (9, out): the channel's weights; g_b (out, L): the sample's output
        gradient; chosen: int32, the output channels that selected the channel, in the order they are summed.
        Lanes at or past L are neither read nor written."""
        _check_taps_arrays("taps_block_3x3", chosen, (w_i, 2), (g_b, 2), (grad_cols_i, 2))
        signature = types.none(w_i, g_b, chosen, types.intp, types.intp, grad_cols_i)

        def codegen(context, builder, sig, args):
            weights, grads, channels, count, first, columns = _arrays(context, builder, sig, args)
            lanes = ir.VectorType(context.get_value_type(sig.args[0].dtype), LANES)
            out_ch, positions = builder.extract_value(weights.shape, 1), builder.extract_value(grads.shape, 1)
            inside = _lanes_inside(builder, first, positions)
            # alloca'd in the entry block, promoted to registers by LLVM's mem2reg
            sums = [cgutils.alloca_once_value(builder, ir.Constant(lanes, None)) for _ in range(TAPS_3X3)]

            def add_row(c, g_block):
                for j, total in enumerate(sums):
                    w = builder.load(builder.gep(weights.data, [builder.add(builder.mul(out_ch, _i64(j)), c)]))
                    builder.store(_fmuladd(builder, _splat(builder, lanes, w), g_block, builder.load(total)), total)

            _for_chosen_rows(builder, grads, channels, count, first, inside, add_row)
            for j, total in enumerate(sums):
                row = builder.gep(columns.data, [builder.add(builder.mul(positions, _i64(j)), first)])
                _masked_store(builder, builder.load(total), row, inside)
            return context.get_dummy_value()

        return signature, codegen

    @intrinsic
    def routed_block_3x3(typingctx, cols_b, weight_c, inputs, start, out_row):
        """out_row[start:start + 16] = the sum over t and the nine taps j of weight_c[i, j] * cols_b[i, j,
        start:start + 16], i = inputs[t]: 16 output positions of one (sample, output channel) of a 3 x 3
        TopKConv, from its selected input channels alone. cols_b (in, 9, L): the sample's patch columns;
        weight_c (in, 9): the output channel's weights; inputs: int32. Each tap sums in its own register, the
        nine added at the end. Lanes at or past L are neither read nor written."""
        _check_taps_arrays("routed_block_3x3", inputs, (cols_b, 3), (weight_c, 2), (out_row, 1))
        signature = types.none(cols_b, weight_c, inputs, types.intp, out_row)

        def codegen(context, builder, sig, args):
            cols, weights, chosen, first, out = _arrays(context, builder, sig, args)
            lanes = ir.VectorType(context.get_value_type(sig.args[0].dtype), LANES)
            positions = builder.extract_value(cols.shape, 2)
            inside = _lanes_inside(builder, first, positions)
            zero = ir.Constant(lanes, None)
            sums = [cgutils.alloca_once_value(builder, zero) for _ in range(TAPS_3X3)]
            with cgutils.for_range(builder, builder.extract_value(chosen.shape, 0)) as loop:
                i = builder.sext(builder.load(builder.gep(chosen.data, [loop.index])), ir.IntType(64))
                cols_i = builder.add(builder.mul(i, builder.mul(positions, _i64(TAPS_3X3))), first)
                weights_i = builder.mul(i, _i64(TAPS_3X3))
                for j, total in enumerate(sums):
                    tap_row = builder.add(cols_i, builder.mul(positions, _i64(j)))
                    tap = _masked_load(builder, builder.gep(cols.data, [tap_row]), inside, zero)
                    w = builder.load(builder.gep(weights.data, [builder.add(weights_i, _i64(j))]))
                    builder.store(_fmuladd(builder, _splat(builder, lanes, w), tap, builder.load(total)), total)
            values = [builder.load(total) for total in sums]
            while len(values) > 1:  # a tree: ((s0 + s1) + (s2 + s3)) + ...
                values = [builder.fadd(values[q], values[q + 1]) if q + 1 < len(values) else values[q]
                          for q in range(0, len(values), 2)]
            _masked_store(builder, values[0], builder.gep(out.data, [first]), inside)
            return context.get_dummy_value()

        return signature, codegen

    @intrinsic
    def weight_taps_block_3x3(typingctx, cols_b, g_b, chosen, n, start, sums):
        """sums[c, j, :] += cols_b[j, start:start + 16] * g_b[c, start:start + 16] for c = chosen[t], t < n,
        and the nine taps j of a 3 x 3 kernel: one sample's share of the weight gradient of one input channel
        at 16 output positions, lane by lane (the caller sums the lanes). cols_b (9, L): the channel's patch
        columns; g_b (out, L); sums (out, 9, 16). Lanes at or past L add 0."""
        _check_taps_arrays("weight_taps_block_3x3", chosen, (cols_b, 2), (g_b, 2), (sums, 3))
        signature = types.none(cols_b, g_b, chosen, types.intp, types.intp, sums)

        def codegen(context, builder, sig, args):
            cols, grads, channels, count, first, totals = _arrays(context, builder, sig, args)
            lanes = ir.VectorType(context.get_value_type(sig.args[0].dtype), LANES)
            positions = builder.extract_value(grads.shape, 1)
            inside = _lanes_inside(builder, first, positions)
            taps = [_masked_load(builder, builder.gep(cols.data, [builder.add(builder.mul(positions, _i64(j)), first)]),
                                 inside, ir.Constant(lanes, None)) for j in range(TAPS_3X3)]

            def add_row(c, g_block):
                base = builder.mul(c, _i64(TAPS_3X3 * LANES))
                for j, tap in enumerate(taps):
                    slot = builder.bitcast(builder.gep(totals.data, [builder.add(base, _i64(j * LANES))]),
                                           lanes.as_pointer())
                    builder.store(_fmuladd(builder, tap, g_block, builder.load(slot, align=4)), slot, align=4)

            _for_chosen_rows(builder, grads, channels, count, first, inside, add_row)
            return context.get_dummy_value()

        return signature, codegen

    def _sinks_through(builder, slots, product):
        """One product into the sorted registers ``slots`` (largest first): each keeps the larger of itself and
        what comes down, the smaller goes on. Finite values only (a NaN lane is the caller's to redo)."""
        for slot in slots:
            held = builder.load(slot)
            keeps = builder.fcmp_ordered(">", held, product)
            builder.store(builder.select(keeps, held, product), slot)
            product = builder.select(keeps, product, held)

    def _products_loop(builder, inputs, weights, first, inside, clamp, body):
        """body(i, products) for every input i: the 16 lanes' products w[i] * xt[i, first + q] (0 past the
        batch), negative ones 0 if ``clamp`` (a Python bool: the code has no test when it is False); the same
        bits in every pass."""
        fan_in, batch = builder.extract_value(inputs.shape, 0), builder.extract_value(inputs.shape, 1)
        zero = ir.Constant(ir.VectorType(inputs.data.type.pointee, LANES), None)
        with cgutils.for_range(builder, fan_in) as loop:
            row = builder.gep(inputs.data, [builder.add(builder.mul(loop.index, batch), first)])
            w = _splat(builder, zero.type, builder.load(builder.gep(weights.data, [loop.index])))
            product = builder.fmul(w, _masked_load(builder, row, inside, zero))
            if clamp:
                product = builder.select(builder.fcmp_ordered("<", product, zero), zero, product)
            body(loop.index, product)

    def _sum_in_input_order(builder, inputs, weights, first, inside, clamp, slots, kth_ties):
        """The sum of the k largest products in input order, ties at the k-th value (the last of the k sorted
        ``slots``) to the first inputs: what the indexed loops' position-order sum gives, to the bit. Unless
        ``kth_ties``, the k-th value is larger than the next product, so the k largest are those at or above
        it, and the places left to tied products need no counting."""
        lanes = builder.load(slots[0]).type
        zero, one = ir.Constant(lanes, None), ir.Constant(lanes, [1.0] * LANES)
        kth = builder.load(slots[-1])
        ties = ir.Constant(lanes, [float(len(slots))] * LANES)  # the k-th value's places: k less those above it
        for slot in slots:
            ties = builder.fsub(ties, builder.select(builder.fcmp_ordered(">", builder.load(slot), kth), one, zero))
        ties_left, chosen = cgutils.alloca_once_value(builder, ties), cgutils.alloca_once_value(builder, zero)

        def add_chosen(i, product, counted):
            take = builder.fcmp_ordered(">=", product, kth)
            if counted:
                left = builder.load(ties_left)
                tie = builder.and_(builder.fcmp_ordered("==", product, kth), builder.fcmp_ordered(">", left, zero))
                take = builder.or_(builder.fcmp_ordered(">", product, kth), tie)
                builder.store(builder.fsub(left, builder.select(tie, one, zero)), ties_left)
            total = builder.load(chosen)
            builder.store(builder.select(take, builder.fadd(total, product), total), chosen)

        with builder.if_else(kth_ties) as (counting, plain):
            for branch, counted in ((counting, True), (plain, False)):
                with branch:
                    _products_loop(builder, inputs, weights, first, inside, clamp,
                                   lambda i, product, counted=counted: add_chosen(i, product, counted))
        return builder.load(chosen)

    def _network_block(builder, inputs, weights, first, inside, clamp, slots, total, sums, totals, kths):
        """One block of :func:`top_k_sums_block` for k = len(slots) - 1 (the last slot holds the next largest
        product, to tell ties at the k-th value): both passes and the stores."""
        lanes = builder.load(slots[0]).type
        for slot in slots:
            builder.store(_splat(builder, lanes, ir.Constant(lanes.element, float("-inf"))), slot)
        builder.store(ir.Constant(lanes, None), total)

        def sink(i, product):
            builder.store(builder.fadd(builder.load(total), product), total)
            _sinks_through(builder, slots, product)

        _products_loop(builder, inputs, weights, first, inside, clamp, sink)
        tied = builder.and_(inside, builder.fcmp_ordered("==", builder.load(slots[-1]), builder.load(slots[-2])))
        no_lane = ir.Constant(ir.IntType(LANES), 0)
        kth_ties = builder.icmp_unsigned("!=", builder.bitcast(tied, ir.IntType(LANES)), no_lane)
        chosen = _sum_in_input_order(builder, inputs, weights, first, inside, clamp, slots[:-1], kth_ties)
        _masked_store(builder, chosen, builder.gep(sums.data, [first]), inside)
        _masked_store(builder, builder.load(total), builder.gep(totals.data, [first]), inside)
        _masked_store(builder, builder.load(slots[-2]), builder.gep(kths.data, [first]), inside)

    @intrinsic
    def top_k_sums_block(typingctx, xt, w_row, start, k, positive_only, sums_row, totals_row, kth_row):
        """sums_row[b] = the sum of the k largest products w_row[i] * xt[i, b], in input order with ties at the
        k-th value to the first inputs (what :func:`.selection.first_k_largest_above` sums, to the bit), and
        totals_row[b] = the sum of all of them and kth_row[b] the k-th largest, for the 16 samples b = start + q <
        xt.shape[1]; under ``positive_only`` negative products count as 0. xt (in, batch): the inputs transposed;
        1 <= k <= :data:`MAX_NETWORK_K` and k <= in (another k writes nothing). Where a product is NaN or infinite, the
        total is not finite and the sum meaningless: the caller redoes those samples.

        Two passes over the products: the first sinks each through k sorted registers (the k-th value), the
        second adds the chosen ones in order."""
        _check_c_arrays("top_k_sums_block", (xt, 2), (w_row, 1), (sums_row, 1), (totals_row, 1), (kth_row, 1))
        if not (isinstance(xt.dtype, types.Float) and len({xt.dtype, w_row.dtype, sums_row.dtype, totals_row.dtype,
                                                            kth_row.dtype}) == 1):
            raise TypingError("top_k_sums_block: expected float arrays of one type")
        signature = types.none(xt, w_row, types.intp, types.intp, types.boolean, sums_row, totals_row, kth_row)

        def codegen(context, builder, sig, args):
            inputs, weights, first, count, clamp, sums, totals, kths = _arrays(context, builder, sig, args)
            element = context.get_value_type(sig.args[0].dtype)
            lanes = ir.VectorType(element, LANES)
            inside = _lanes_inside(builder, first, builder.extract_value(inputs.shape, 1))
            zero, lowest = ir.Constant(lanes, None), _splat(builder, lanes, ir.Constant(element, float("-inf")))
            slots = [cgutils.alloca_once_value(builder, lowest) for _ in range(MAX_NETWORK_K + 1)]
            total = cgutils.alloca_once_value(builder, zero)
            done = builder.append_basic_block("top_k_done")
            switch = builder.switch(count, done)
            for size in range(1, MAX_NETWORK_K + 1):  # one network per k: its registers, fully unrolled
                network = builder.append_basic_block(f"network_{size}")
                switch.add_case(ir.Constant(count.type, size), network)
                builder.position_at_end(network)
                with builder.if_else(clamp) as (positive_only, any_sign):  # each its own loops
                    for branch, clamped in ((positive_only, True), (any_sign, False)):
                        with branch:
                            _network_block(builder, inputs, weights, first, inside, clamped, slots[:size + 1],
                                           total, sums, totals, kths)
                builder.branch(done)
            builder.position_at_end(done)
            return context.get_dummy_value()

        return signature, codegen

    @intrinsic
    def count_down_block(typingctx, keys, mids, start, counts):
        """counts[start + q] = how many rows i of keys (rows, columns) have keys[i, start + q] >= mids[start + q],
        for the 16 columns start + q < columns (the others neither read nor written): the counts held in one
        vector register down the rows, where numba's loop stored and reloaded them at every row. keys, mids:
        one integer type; counts: int32; all C-contiguous."""
        _check_c_arrays("count_down_block", (keys, 2), (mids, 1), (counts, 1))
        if not (isinstance(keys.dtype, types.Integer) and keys.dtype == mids.dtype and counts.dtype == types.int32):
            raise TypingError("count_down_block: expected integer keys and mids of one type, int32 counts")
        signature = types.none(keys, mids, types.intp, counts)

        def codegen(context, builder, sig, args):
            rows_of, middles, first, totals = _arrays(context, builder, sig, args)
            lanes = ir.VectorType(context.get_value_type(sig.args[0].dtype), LANES)
            int32s = ir.VectorType(ir.IntType(32), LANES)
            rows, columns = builder.extract_value(rows_of.shape, 0), builder.extract_value(rows_of.shape, 1)
            inside = _lanes_inside(builder, first, columns)
            middle = _masked_load(builder, builder.gep(middles.data, [first]), inside, ir.Constant(lanes, None))
            total = cgutils.alloca_once_value(builder, ir.Constant(int32s, None))
            with cgutils.for_range(builder, rows) as loop:
                row = builder.gep(rows_of.data, [builder.add(builder.mul(loop.index, columns), first)])
                block = _masked_load(builder, row, inside, ir.Constant(lanes, None))
                reached = builder.zext(builder.icmp_signed(">=", block, middle), int32s)
                builder.store(builder.add(builder.load(total), reached), total)
            _masked_store(builder, builder.load(total), builder.gep(totals.data, [first]), inside)
            return context.get_dummy_value()

        return signature, codegen

    @intrinsic
    def trailing_zeros(typingctx, word):
        """The position of the lowest set bit of a nonzero uint64 (one ``tzcnt``)."""
        if word != types.uint64:
            raise TypingError("trailing_zeros: expected a uint64")

        def codegen(context, builder, sig, args):
            return _intrinsic(builder, "llvm.cttz.i64", ir.IntType(64), [args[0], ir.Constant(ir.IntType(1), 1)])

        return types.uint64(types.uint64), codegen

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
    import numpy as np

    def count_block_at_least(row, start, stop, bound):
        return sum(1 for i in range(start, min(start + LANES, stop)) if row[i] >= bound)

    def borrowed(array):
        return array

    def count_down_block(keys, mids, start, counts):
        stop = min(start + LANES, keys.shape[1])
        counts[start:stop] = (keys[:, start:stop] >= mids[start:stop]).sum(0)

    def trailing_zeros(word):
        word = int(word)
        return (word & -word).bit_length() - 1

    def taps_block_3x3(w_i, g_b, chosen, n, start, grad_cols_i):
        stop = min(start + LANES, g_b.shape[1])
        grad_cols_i[:, start:stop] = 0
        for t in range(n):
            c = chosen[t]
            grad_cols_i[:, start:stop] += w_i[:, c:c + 1] * g_b[c, start:stop]

    def routed_block_3x3(cols_b, weight_c, inputs, start, out_row):
        stop = min(start + LANES, cols_b.shape[2])
        out_row[start:stop] = 0
        for i in inputs:
            out_row[start:stop] += weight_c[i] @ cols_b[i, :, start:stop]

    def weight_taps_block_3x3(cols_b, g_b, chosen, n, start, sums):
        stop = min(start + LANES, g_b.shape[1])
        for t in range(n):
            c = chosen[t]
            sums[c, :, :stop - start] += cols_b[:, start:stop] * g_b[c, start:stop]

    def top_k_sums_block(xt, w_row, start, k, positive_only, sums_row, totals_row, kth_row):
        stop = min(start + LANES, xt.shape[1])
        products = xt[:, start:stop] * w_row[:, None]
        if positive_only:
            products[products < 0] = 0
        totals_row[start:stop] = products.sum(0)
        taken = np.sort(np.argsort(-products, axis=0, kind="stable")[:k], axis=0)  # ties to the first inputs
        chosen = np.zeros(stop - start, products.dtype)
        for j in range(k):  # in input order, as the intrinsic adds them
            chosen += products[taken[j], np.arange(stop - start)]
        sums_row[start:stop] = chosen
        kth_row[start:stop] = -np.sort(-products, axis=0)[k - 1]

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
