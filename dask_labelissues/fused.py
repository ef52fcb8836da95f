"""The per-row reductions of pass one, in one read of each row.

For every row: the first argmax and its probability, the given label's
probability, the row minimum, the row sum (float64, added in column order)
and, on request, the largest probability of a class other than the label.

Two implementations with the same bits: a numba kernel that touches each
element once, and pure numpy (several vectorized reductions over
cache-sized slices).  ``kernel="auto"`` uses numba when it imports, unless
the environment variable ``DASK_LABELISSUES_KERNEL=numpy`` says otherwise;
the API picks ``"numpy"`` for Dask workers with little memory.
The row sum is defined as the sequential float64 sum so that both agree
exactly (numpy's own ``sum`` is pairwise).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from typing import Any

import numpy as np

#: Rows of a block are processed by numpy in slices of about this many bytes.
SUB_BLOCK_BYTES = 2 * 2**20

#: The sign bit, set on the keys of non-negative scores, and the key every
#: NaN score gets (the positive quiet NaN's): the loops below make
#: :func:`dask_labelissues.kernels.score_keys`'s keys row by row with these.
_KEY_TOP = np.uint64(1 << 63)
_NAN_KEY = np.uint64(int(np.array(np.nan).view(np.uint64)) | (1 << 63))


def _skip_numbas_blas_probe() -> None:
    """Let numba's first compile or cache load skip importing scipy.linalg.

    When numba's CPU target first loads its registries, ``numba.np.arraymath``
    calls ``ensure_blas()`` once at import, only to record whether BLAS is
    there; with scipy installed that imports ``scipy.linalg`` (about 0.15 s,
    a third of what a first call here waits for numba).  None of these
    kernels uses BLAS.  Where scipy is installed the probe's answer is yes,
    so the module is imported with that answer given and the real
    ``ensure_blas`` put back: numba code that does use BLAS still imports
    scipy and checks it when it is compiled.  Without scipy the probe is
    cheap and runs as usual; on a numba whose layout differs, nothing is
    changed.  (A scipy that is installed but whose ``cython_blas`` fails to
    import would have made the probe answer no; numba code falling back on
    that answer then fails to compile instead.)  Called once per process,
    under the kernels' lock.
    """
    import sys

    if "numba.np.arraymath" in sys.modules or importlib.util.find_spec("scipy") is None:
        return
    try:
        import numba.np.linalg as linalg
    except ImportError:
        return
    real = getattr(linalg, "ensure_blas", None)
    if real is None:
        return
    linalg.ensure_blas = lambda: None
    try:
        import numba.np.arraymath as arraymath
    except ImportError:  # numba's own first compile will say what is wrong
        return
    finally:
        linalg.ensure_blas = real
    if getattr(arraymath, "ensure_blas", None) is not None:
        arraymath.ensure_blas = real


#: The fewest classes for which pass one takes the self-confidence records
#: of float32 rows four at a time, comparing the values' bits as integers
#: (``records_wide``, against ``records`` row by row).  On the development
#: machine (AMD EPYC, 64 MB blocks) that loop took 0.71 of the row-by-row
#: loop's time at 1,000 classes, 0.85 at 256 and 0.94 at 128, and more than
#: it below.  Both give the same records.  float64 rows stay row by row:
#: they gained 0.92 at 256 classes and 0.96 at 1,000, less than the compile
#: of the loop's variants for them costs.
RECORDS_WIDE_K = 128


def _build_numba() -> tuple[Any, ...] | None:
    """Compile (or load from numba's cache) the kernels; None without numba.

    Imported on first use only: numba adds about 100 MB to a process, which
    a small Dask worker cannot spare.
    """
    try:
        import numba
    except ImportError:
        return None
    _skip_numbas_blas_probe()

    @numba.njit(nogil=True, cache=True)
    def scan(probs, labels, pred, p_pred, p_label, row_min, row_sum, others, want_others):
        n, k = probs.shape
        for i in range(n):
            y = labels[i]
            best = probs[i, 0]
            arg = 0
            low = best
            total = np.float64(best)
            other = -np.inf
            if y != 0:
                other = np.float64(best)
            for j in range(1, k):
                v = probs[i, j]
                if v > best:
                    best = v
                    arg = j
                if v < low:
                    low = v
                total += v
                if want_others and j != y and v > other:
                    other = np.float64(v)
            pred[i] = arg
            p_pred[i] = best
            p_label[i] = probs[i, y]
            row_min[i] = low
            row_sum[i] = total
            if want_others:
                others[i] = other

    @numba.njit(nogil=True, cache=True)
    def limbs(labels, values, out, scale, base, n_limbs):
        for i in range(values.shape[0]):
            rest = values[i] * scale
            y = labels[i]
            for j in range(n_limbs):
                limb = np.floor(rest)
                out[y, j] += np.int64(limb)
                rest = (rest - limb) * base

    @numba.njit(nogil=True, cache=True)
    def joint(probs, labels, pred, cut, m, guess, max_other, cand, margin, bound, top_v, top_j, cells, add_cells):
        n, k = probs.shape
        full = m + 1 >= k
        for i in range(n):
            y = labels[i]
            own = probs[i, y]
            total = 0.0
            n_confident = 0
            first = -1
            best = -np.inf
            for j in range(k):
                v = probs[i, j]
                total += v
                if v >= cut[j]:
                    n_confident += 1
                    if first < 0:
                        first = j
                if j != y and v > best:
                    best = v
            if n_confident == 0:
                guess[i] = -1
            elif n_confident == 1:
                guess[i] = first
            else:
                guess[i] = pred[i]
            if add_cells and guess[i] >= 0:
                cells[0, y * k + guess[i]] += 1
            max_other[i] = best
            if m == 0:
                continue
            if full or own < total / 2.0:
                # The candidates, in a second look at the row (in cache by
                # now): most rows keep none, and the insertions took most
                # of the loop's time when every row made them.
                count = 0
                for j in range(k):
                    if j == y:
                        continue
                    v = probs[i, j]
                    if count <= m or v > top_v[m]:
                        # insertion into the m + 1 largest, earlier classes first on ties
                        pos = count if count <= m else m
                        while pos > 0 and top_v[pos - 1] < v:
                            top_v[pos] = top_v[pos - 1]
                            top_j[pos] = top_j[pos - 1]
                            pos -= 1
                        top_v[pos] = v
                        top_j[pos] = j
                        if count <= m:
                            count += 1
                for s in range(m):
                    cand[i, s] = top_j[s]
                    margin[i, s] = top_v[s] - own
                    if add_cells and margin[i, s] > 0:
                        cells[1, y * k + top_j[s]] += 1
                if full:
                    bound[i] = -np.inf
                else:
                    bound[i] = top_v[m] - own
            else:
                for s in range(m):
                    cand[i, s] = -1
                    margin[i, s] = 0
                bound[i] = (total - 2.0 * own) + 1e-6 * max(total, 1.0)

    @numba.njit(nogil=True, cache=True)
    def records(probs, raw_labels, eps, tolerance, max_value, margin,
                p_pred, score, label, pred, reduce, counts, sums, scale, base, n_limbs,
                bits, acc, unit_shift):
        # The whole of pass one's per-row work in one read of each row: the
        # scan above, the records, the near-tie rule, the checks of
        # find_problem, the class counts and the limbs of the exact sums.
        # The row loop is scan's, written out again: with the loop in a
        # shared njit helper (inline="always"), numba missed its on-disk
        # cache in every new process and compiled again, for about a second
        # (147 cache entries after one benchmark run).
        n, k = probs.shape
        first_bad = -1
        for i in range(n):
            raw = raw_labels[i]
            y = min(max(raw, 0), k - 1)
            best = probs[i, 0]
            arg = 0
            low = best
            total = np.float64(best)
            other = -np.inf
            if y != 0:
                other = np.float64(best)
            for j in range(1, k):
                v = probs[i, j]
                if v > best:
                    best = v
                    arg = j
                if v < low:
                    low = v
                total += v
                if margin and j != y and v > other:
                    other = np.float64(v)
            own = probs[i, y]
            if first_bad < 0:
                # Combined with & and |, not and/or: no short-circuit
                # branches per row here (about 6% of the loop).  0 < total
                # < inf is isfinite(total) and total > 0, NaN failing both.
                fine = (raw >= 0) & (raw < k) & (total > 0.0) & (total < np.inf) & (low >= 0)
                fine = fine & (np.float64(best) < max_value) & ((tolerance < 0) | (abs(total - 1.0) <= tolerance))
                if not fine:
                    first_bad = i
            plus = own + eps  # in the input's dtype, as cleanlab adds it
            p_pred[i] = best
            label[i] = y
            pred[i] = arg
            reduce[i] = (arg == y) | ((arg < y) & (best < plus)) | ((arg > y) & (best <= plus))
            own64 = np.float64(own)
            if margin:
                score[i] = (own64 - other + 1.0) / 2.0
            else:
                score[i] = own64
            counts[y] += 1
            if bits.shape[0] > 0:
                # float32: the value's mantissa added to its class's sum of
                # that binary exponent (exact; see flush_exponent_sums), for
                # values below 2 (the sign bit clear, exponent under 128).
                b = np.int64(bits[i, y])
                e = b >> 23
                if e < 128:
                    m = b & 0x7FFFFF
                    if e == 0:
                        e = 1
                    else:
                        m |= 0x800000
                    if e < unit_shift:  # below the sums' unit: cut, as the limbs' floor cuts
                        m >>= unit_shift - e
                        e = unit_shift
                    acc[y, e] += m
                    continue
            if not (np.isfinite(own64) and own64 >= 0 and own64 < max_value):
                own64 = 0.0  # a bad row: the job fails, the sums need only stay finite
            rest = own64 * scale
            for j in range(n_limbs):
                limb = np.floor(rest)
                sums[y, j] += np.int64(limb)
                rest = (rest - limb) * base
        return first_bad

    @numba.njit(nogil=True, cache=True)
    def records_wide(probs, raw_labels, eps, tolerance, max_value,
                     p_pred, score, label, pred, reduce, counts, sums, scale, base, n_limbs,
                     bits, acc, unit_shift, ibits, ubits, sign):
        # records' work, for the self-confidence records of float32 rows of
        # many classes (:data:`RECORDS_WIDE_K`), four rows at a time: their
        # maximum, argmax and sign test compare the values' bits as
        # integers (``ibits``, ``ubits``: views of ``probs``), which the
        # compiler turns into vector instructions, as it does not the
        # float comparisons of records' loop, and the four rows' sums, each
        # added in column order as records adds it, run side by side
        # instead of one after another.  A kernel of its own, so that jobs
        # on fewer classes do not load its code; the per-row work after the
        # row's reductions is records', written out again for the reason
        # records gives.
        #
        # The bits order the values as floats do where the sign bits are
        # clear.  A row holding a NaN, an infinity or a negative value is
        # refused here and in records, by its sum or by ``neg``; only in
        # such rows can the maximum differ (a NaN's place, the sign of a
        # zero maximum), and a refused row's records are not used.
        n, k = probs.shape
        first_bad = -1
        grp_arg = np.zeros(4, dtype=np.int64)
        grp_neg = np.zeros(4, dtype=np.bool_)
        grp_total = np.zeros(4, dtype=np.float64)
        for i0 in range(0, n, 4):
            i1 = min(i0 + 4, n)
            for i in range(i0, i1):
                bm = ibits[i, 0]
                bu = ubits[i, 0]
                for j in range(1, k):
                    bv = ibits[i, j]
                    bm = bv if bv > bm else bm
                    bw = ubits[i, j]
                    bu = bw if bw > bu else bu
                a = 0
                for j in range(k):
                    if ibits[i, j] == bm:
                        a = j
                        break
                grp_arg[i - i0] = a
                grp_neg[i - i0] = bu > sign  # a sign bit set on anything but -0.0
            if i1 - i0 == 4:
                t0 = np.float64(probs[i0, 0])
                t1 = np.float64(probs[i0 + 1, 0])
                t2 = np.float64(probs[i0 + 2, 0])
                t3 = np.float64(probs[i0 + 3, 0])
                for j in range(1, k):
                    t0 += probs[i0, j]
                    t1 += probs[i0 + 1, j]
                    t2 += probs[i0 + 2, j]
                    t3 += probs[i0 + 3, j]
                grp_total[0] = t0
                grp_total[1] = t1
                grp_total[2] = t2
                grp_total[3] = t3
            else:
                for i in range(i0, i1):
                    t = np.float64(probs[i, 0])
                    for j in range(1, k):
                        t += probs[i, j]
                    grp_total[i - i0] = t
            for i in range(i0, i1):
                raw = raw_labels[i]
                y = min(max(raw, 0), k - 1)
                arg = grp_arg[i - i0]
                best = probs[i, arg]
                total = grp_total[i - i0]
                neg = grp_neg[i - i0]
                own = probs[i, y]
                if first_bad < 0:
                    # Combined with & and |, not and/or: no short-circuit
                    # branches per row here (about 6% of the loop).  0 < total
                    # < inf is isfinite(total) and total > 0, NaN failing both.
                    fine = (raw >= 0) & (raw < k) & (total > 0.0) & (total < np.inf) & (not neg)
                    fine = fine & (np.float64(best) < max_value) & ((tolerance < 0) | (abs(total - 1.0) <= tolerance))
                    if not fine:
                        first_bad = i
                plus = own + eps  # in the input's dtype, as cleanlab adds it
                p_pred[i] = best
                label[i] = y
                pred[i] = arg
                reduce[i] = (arg == y) | ((arg < y) & (best < plus)) | ((arg > y) & (best <= plus))
                own64 = np.float64(own)
                score[i] = own64
                counts[y] += 1
                if bits.shape[0] > 0:
                    # float32: the value's mantissa added to its class's sum of
                    # that binary exponent (exact; see flush_exponent_sums), for
                    # values below 2 (the sign bit clear, exponent under 128).
                    b = np.int64(bits[i, y])
                    e = b >> 23
                    if e < 128:
                        m = b & 0x7FFFFF
                        if e == 0:
                            e = 1
                        else:
                            m |= 0x800000
                        if e < unit_shift:  # below the sums' unit: cut, as the limbs' floor cuts
                            m >>= unit_shift - e
                            e = unit_shift
                        acc[y, e] += m
                        continue
                if not (np.isfinite(own64) and own64 >= 0 and own64 < max_value):
                    own64 = 0.0  # a bad row: the job fails, the sums need only stay finite
                rest = own64 * scale
                for j in range(n_limbs):
                    limb = np.floor(rest)
                    sums[y, j] += np.int64(limb)
                    rest = (rest - limb) * base
        return first_bad

    @numba.njit(nogil=True, cache=True)
    def flush_exponent_sums(acc, sums, unit_shift, limb_bits, n_limbs):
        # After a loop that added float32 values by exponent (records,
        # records_wide, records_planes): acc[y, e] is in units of
        # 2**(e - unit_shift) of the sums' unit; spread over the limbs,
        # lowest first, the top one unbounded.
        for y in range(acc.shape[0]):
            for e in range(unit_shift, acc.shape[1]):
                v = acc[y, e]
                if v == 0:
                    continue
                at = e - unit_shift
                j = n_limbs - 1 - at // limb_bits
                lo = at % limb_bits
                while v > 0:
                    if j == 0:
                        sums[y, 0] += v << lo
                        break
                    room = limb_bits - lo
                    sums[y, j] += (v & ((1 << room) - 1)) << lo
                    v >>= room
                    j -= 1
                    lo = 0

    @numba.njit(nogil=True, cache=True)
    def scored(score, score_bits, label, pred, p_pred, cut, out, prune, norm, n_rows, hist, shift, top, nan_key):
        # Pass two's per-row work in one read of the records: the scores,
        # the count state and the first radix round's digit histogram,
        # with the keys of kernels.score_keys.  With one-long ``prune``,
        # only the off-diagonal total (prune[0]) is counted: the per-class
        # counts were half of this loop's time on 100 classes.
        per_class = prune.shape[0] == cut.shape[0]
        for i in range(score.shape[0]):
            s = score[i]
            out[i] = s
            if s != s:
                key = nan_key
            elif s == 0.0:
                key = top  # -0.0 counts as 0.0
            elif score_bits[i] >= top:
                key = ~score_bits[i]
            else:
                key = score_bits[i] | top
            hist[key >> shift] += 1
            y = label[i]
            # Added as 0 or 1, not branched on: whether a row clears its
            # class's cut is as good as random, and mispredicted branches
            # cost this loop more than half its time.
            clears = np.int64(np.float64(p_pred[i]) >= cut[pred[i]])
            if per_class:
                n_rows[y] += 1
                norm[y] += clears
                prune[y] += clears * np.int64(pred[i] != y)
            else:
                prune[0] += clears * np.int64(pred[i] != y)

    @numba.njit(nogil=True, cache=True)
    def select(score, score_bits, shift, prefix, cutoff, quota, issues, dropped, top, nan_key, mask):
        # The selection's row masks, with kernels.score_keys's keys made row
        # by row: rows whose key prefix is at most ``prefix``, or (``issues``)
        # the issue mask: keys below ``cutoff``, the first ``quota`` at it,
        # but the rows ``dropped``.  The keys are made without branches, so
        # the first loop vectorizes: with a branch per row on whether it
        # was selected, the issue mask took 2.0 ns a row, this way 0.2 ns.
        # The rows at the cutoff are taken in a second loop, which stops
        # once the quota is filled; only a block whose quota reaches far
        # into it (very many rows of one score) pays a branch a row again.
        n = score.shape[0]
        for i in range(n):
            s = score[i]
            key = ~score_bits[i] if s < 0.0 else score_bits[i] | top
            key = nan_key if s != s else key
            if issues:
                mask[i] = key < cutoff
            else:
                mask[i] = (key >> shift) <= prefix
        if not issues:
            return
        left = quota
        i = 0
        while left > 0 and i < n:
            s = score[i]
            key = ~score_bits[i] if s < 0.0 else score_bits[i] | top
            key = nan_key if s != s else key
            if key == cutoff:
                mask[i] = True
                left -= 1
            i += 1
        for d in dropped:
            if 0 <= d < n:  # numba checks no bounds
                mask[d] = False

    @numba.njit(nogil=True, cache=True)
    def key_order(keys, order):
        # Stable LSD radix sort of uint64 keys, 11 bits a pass, skipping the
        # digits no two keys differ in; each pass moves the keys with their
        # positions, so no pass reads keys out of order.
        n = keys.shape[0]
        for i in range(n):
            order[i] = i
        if n < 2:
            return
        diff = np.uint64(0)
        first = keys[0]
        for i in range(n):
            diff |= keys[i] ^ first
        cur = keys.copy()
        cur_order = order.copy()
        next_keys = np.empty_like(cur)
        next_order = np.empty_like(order)
        starts = np.empty(2048, dtype=np.int64)
        digit_mask = np.uint64(2047)
        moved = False
        for shift in range(0, 64, 11):
            sh = np.uint64(shift)
            if (diff >> sh) & digit_mask == 0:
                continue
            starts[:] = 0
            for i in range(n):
                starts[np.int64((cur[i] >> sh) & digit_mask)] += 1
            total = 0
            for d in range(2048):
                c = starts[d]
                starts[d] = total
                total += c
            for i in range(n):
                d = np.int64((cur[i] >> sh) & digit_mask)
                at = starts[d]
                starts[d] = at + 1
                next_keys[at] = cur[i]
                next_order[at] = cur_order[i]
            cur, next_keys = next_keys, cur
            cur_order, next_order = next_order, cur_order
            moved = True
        if moved:
            order[:] = cur_order

    @numba.njit(nogil=True, cache=True)
    def merge_top(group, values, index, bounds, limits, out_group, out_value, out_index):
        # States sorted by (group, value), one after another in ``bounds``,
        # merged group by group: the ``limits[g]`` smallest values of group
        # g, a tie to the earlier state, written to the outputs.  A state's
        # rows past what its group takes are skipped, never compared.
        # Values compare as np.argsort orders them: NaN last, -0.0 equal to
        # 0.0 (a < b, or b alone is NaN).  -1 if a state is out of order;
        # groups are within 0..len(limits) - 1 (the caller checks).
        n_states = bounds.shape[0] - 1
        for s in range(n_states):
            for i in range(bounds[s] + 1, bounds[s + 1]):
                a, b = values[i], values[i - 1]
                if group[i] < group[i - 1] or (group[i] == group[i - 1] and (a < b or (b != b and a == a))):
                    return -1
        head = bounds[:-1].copy()
        ends = np.empty(n_states, dtype=np.int64)
        n_out = 0
        for g in range(limits.shape[0]):
            for s in range(n_states):
                e = head[s]
                while e < bounds[s + 1] and group[e] == g:
                    e += 1
                ends[s] = e
            left = limits[g]
            while left > 0:
                best = -1
                for s in range(n_states):
                    if head[s] < ends[s]:
                        if best < 0:
                            best = s
                        else:
                            a, b = values[head[s]], values[head[best]]
                            if a < b or (b != b and a == a):
                                best = s
                if best < 0:
                    break
                i = head[best]
                out_group[n_out] = g
                out_value[n_out] = values[i]
                out_index[n_out] = index[i]
                n_out += 1
                head[best] += 1
                left -= 1
            for s in range(n_states):
                head[s] = ends[s]
        return n_out

    @numba.njit(nogil=True, cache=True)
    def pair_buckets(probs, labels, groups, n_buckets, low, last_key, last_row, start, counts, chosen):
        # Every (row, class other than its label) pair: its key, minus the
        # margin p[c] - p[y] in the input's dtype, and the key's bucket of
        # n_buckets over [-1, 1] (NaN and keys above 1: bucket n_buckets),
        # as filters.key_bucket makes it.  With counts (cells x buckets),
        # count each pair in its off-diagonal cell y * (K - 1) + (c or c - 1
        # above y); else mark the rows that the cut (low, last_key, last_row
        # per group; groups: cell to group or -1) chooses.
        n, k = probs.shape
        half = n_buckets / 2.0
        counting = counts.shape[0] > 0
        for i in range(n):
            y = labels[i]
            own = probs[i, y]
            for c in range(k):
                if c == y:
                    continue
                key = -(probs[i, c] - own)
                wide = np.float64(key)
                if wide != wide:
                    b = n_buckets
                else:
                    f = np.floor((wide + 1.0) * half)
                    b = 0 if f < 0 else (n_buckets if f > n_buckets else np.int64(f))
                if counting:
                    counts[y * (k - 1) + (c if c < y else c - 1), b] += 1
                    continue
                g = groups[y * k + c]
                if g < 0:
                    continue
                if b < low[g]:
                    chosen[i] = True
                elif b == low[g]:
                    last = last_key[g]
                    if key < last or ((key == last or (key != key and last != last)) and start + i <= last_row[g]):
                        chosen[i] = True

    @numba.njit(nogil=True, cache=True)
    def boundary_pairs(probs, labels, groups, n_buckets, low, out_row, out_group, out_key):
        # The pairs of pair_buckets whose bucket is their group's low one,
        # in row order, then class order; written where out_row has room,
        # counted either way.  The key and bucket are pair_buckets', written
        # out again rather than shared through an njit helper, for the
        # on-disk cache's sake (see records).
        n, k = probs.shape
        half = n_buckets / 2.0
        writing = out_row.shape[0] > 0
        found = 0
        for i in range(n):
            y = labels[i]
            own = probs[i, y]
            for c in range(k):
                if c == y:
                    continue
                g = groups[y * k + c]
                if g < 0:
                    continue
                key = -(probs[i, c] - own)
                wide = np.float64(key)
                if wide != wide:
                    b = n_buckets
                else:
                    f = np.floor((wide + 1.0) * half)
                    b = 0 if f < 0 else (n_buckets if f > n_buckets else np.int64(f))
                if b != low[g]:
                    continue
                if writing:
                    out_row[found] = i
                    out_group[found] = g
                    out_key[found] = key
                found += 1
        return found

    return (scan, limbs, joint, records, scored, select, key_order, merge_top, pair_buckets, boundary_pairs,
            records_wide, flush_exponent_sums)


_NUMBA: tuple[Any, ...] | None = None
_NUMBA_TRIED = False
# The first block tasks of a threads job all ask for the kernels at once:
# one builds them, the others wait (the BLAS probe's stand-in must be put
# in and taken out by one thread only).
_NUMBA_LOCK = threading.Lock()


def _numpy_by_environment() -> bool:
    return os.environ.get("DASK_LABELISSUES_KERNEL", "").lower() == "numpy"


def _kernels(kernel: str) -> tuple[Any, ...] | None:
    """The numba kernels if ``kernel`` allows them and numba is installed."""
    global _NUMBA, _NUMBA_TRIED
    if kernel == "numpy" or _numpy_by_environment():
        return None
    if not _NUMBA_TRIED:
        with _NUMBA_LOCK:
            if not _NUMBA_TRIED:
                _NUMBA = _build_numba()
                _NUMBA_TRIED = True
    if _NUMBA is None and kernel == "numba":
        raise ImportError("kernel='numba' needs numba installed")
    return _NUMBA


def numba_allowed() -> bool:
    """Whether ``kernel="auto"`` may use numba here: installed, and not
    turned off by ``DASK_LABELISSUES_KERNEL=numpy``.  Imports nothing."""
    if _NUMBA_TRIED:
        return _NUMBA is not None
    if _numpy_by_environment():
        return False
    return importlib.util.find_spec("numba") is not None


def numba_loaded() -> bool:
    """Whether numba's kernels are loaded in this process already (a job
    here then pays nothing more for them)."""
    return _NUMBA is not None


def _loaded_kernels(kernel: str = "auto") -> tuple[Any, ...] | None:
    """The numba kernels where ``kernel`` allows them and pass one loaded
    them in this process already, else None: the selection's callers do not
    know the job's kernel, and a worker given the numpy kernel to spare its
    memory must not load numba for them."""
    return _kernels(kernel) if numba_loaded() else None


def kernel_name(kernel: str = "auto") -> str:
    """Which implementation ``kernel`` ("auto", "numba", "numpy") resolves to here."""
    return "numba" if _kernels(kernel) is not None else "numpy"


def key_order(keys: np.ndarray) -> np.ndarray | None:
    """The stable ascending order of uint64 ``keys`` (what
    ``np.argsort(keys, kind="stable")`` gives), by a radix sort; None unless
    numba's kernels are loaded in this process (as :func:`prefix_mask`).

    Ranks the selection's rows (:func:`dask_labelissues.states.rank_order`):
    on 9,000 random scores' keys, 0.14 ms against 0.36 ms for numpy's
    stable sort.  It holds the keys and positions twice over besides
    ``order``: 40 bytes a key.
    """
    fast = _loaded_kernels()
    if fast is None:
        return None
    order = np.empty(keys.shape[0], dtype=np.int64)
    fast[6](np.ascontiguousarray(keys, dtype=np.uint64), order)
    return order


def merge_top(
    group: np.ndarray, values: np.ndarray, index: np.ndarray, bounds: np.ndarray, limits: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The rows a merge of per-group selections keeps, as ``(group, value,
    index)`` in (group, value) order; None unless numba's kernels are
    loaded in this process, or if a state is not sorted.

    ``group``, ``values`` and ``index`` are states one after another, rows
    ``bounds[s]:bounds[s + 1]`` each, sorted by (group, value) as
    ``np.argsort`` sorts (NaN last) and given in row order; of group ``g``
    the ``limits[g]`` smallest values are kept, ties to the earlier state.
    It visits only the rows kept: numpy's merge sorted every row of every
    state again (8.2 million candidates of a token job: 2.3 s).  The kept
    rows are written to outputs of their exact size (each group keeps its
    limit or all it has), and the values are compared as floats: the
    positions to gather by and the integer keys this merge once made held
    16 bytes more a candidate at a multi-label job's peak.
    """
    fast = _loaded_kernels()
    if fast is None:
        return None
    limits = np.ascontiguousarray(limits, dtype=np.int64)
    if group.size and (group.min() < 0 or group.max() >= limits.size):
        return None
    # Each group keeps its limit or all it has: the outputs' exact size.
    n = int(np.minimum(np.bincount(group, minlength=limits.size), np.maximum(limits, 0)).sum())
    out = (np.empty(n, dtype=group.dtype), np.empty(n, dtype=values.dtype), np.empty(n, dtype=index.dtype))
    if fast[7](group, values, index, np.ascontiguousarray(bounds, dtype=np.int64), limits, *out) != n:
        return None
    return out


def pair_buckets(
    probs: np.ndarray, labels: np.ndarray, n_buckets: int, cut: tuple | None = None, start: int = 0
) -> np.ndarray | None:
    """Every (row, other class) pair of a block by its key's bucket
    (:func:`dask_labelissues.filters.key_bucket`): without ``cut``, the
    pairs counted by off-diagonal cell and bucket, int32 (see
    :func:`dask_labelissues.filters.key_counts`); with ``cut =
    (groups, low, last_key, last_row)``, the rows it chooses.  None unless
    numba's kernels are loaded in this process."""
    fast = _loaded_kernels()
    if fast is None:
        return None
    n, k = probs.shape
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    if cut is None:
        counts = np.zeros((k * (k - 1), n_buckets + 1), dtype=np.int32)
        fast[8](probs, labels, np.zeros(0, np.int64), n_buckets, np.zeros(0, np.int64), np.zeros(0, probs.dtype),
                np.zeros(0, np.int64), start, counts, np.zeros(0, np.bool_))
        return counts
    groups, low, last_key, last_row = cut
    chosen = np.zeros(n, dtype=np.bool_)
    fast[8](probs, labels, groups, n_buckets, low, last_key.astype(probs.dtype, copy=False), last_row, start,
            np.zeros((0, 0), np.int64), chosen)
    return chosen


def boundary_pairs(
    probs: np.ndarray, labels: np.ndarray, n_buckets: int, groups: np.ndarray, low: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(rows, groups, keys)`` of a block's pairs in their group's boundary
    bucket (see :func:`pair_buckets`), in row order; None unless numba's
    kernels are loaded in this process."""
    fast = _loaded_kernels()
    if fast is None:
        return None
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, probs.dtype))
    found = fast[9](probs, labels, groups, n_buckets, low, *empty)
    out = (np.empty(found, np.int64), np.empty(found, np.int64), np.empty(found, probs.dtype))
    if found:
        fast[9](probs, labels, groups, n_buckets, low, *out)
    return out


#: :func:`row_sums` adds fewer rows than this one value at a time.
ROW_SUMS_MIN_ROWS = 64


def row_sums(rows: np.ndarray) -> np.ndarray:
    """Each row's float64 sum, added in column order, as the numba kernels
    add (numpy's own ``sum`` adds pairwise).

    Column by column over a transposed float64 copy: each step is one
    elementwise add across the rows.  ``np.add.accumulate`` along the rows
    gives the same bits but adds one value at a time, row after row: on
    2,000,000 x 100 float32 it was 57% of the numpy scan's time, this 10%.
    With few rows the steps' overhead wins (17 rows of 10,000 classes: 20
    ns a value against 3.5 for accumulate; 174 of 1,000: 2.6 against 4.5),
    so fewer than :data:`ROW_SUMS_MIN_ROWS` are added by accumulate.
    """
    rows = np.asarray(rows)
    if rows.shape[1] == 0:
        return np.zeros(rows.shape[0])
    if rows.shape[0] < ROW_SUMS_MIN_ROWS:
        return np.add.accumulate(rows, axis=1, dtype=np.float64)[:, -1]
    columns = np.ascontiguousarray(rows.T, dtype=np.float64)
    total = columns[0].copy()
    for column in columns[1:]:
        total += column
    return total


def scan_rows(
    probs: np.ndarray, labels: np.ndarray, want_others: bool = False, kernel: str = "auto"
) -> tuple[np.ndarray, ...]:
    """``(pred, p_pred, p_label, row_min, row_sum, others)`` for a block.

    ``labels`` must already lie in ``0..K-1``; ``others`` is None unless
    ``want_others``.  Rows holding NaN get a NaN row sum (and are rejected
    by validation), so their other outputs do not matter.
    """
    n, k = probs.shape
    pred = np.empty(n, dtype=np.intp)
    p_pred = np.empty(n, dtype=probs.dtype)
    p_label = np.empty(n, dtype=probs.dtype)
    row_min = np.empty(n, dtype=probs.dtype)
    row_sum = np.empty(n, dtype=np.float64)
    others = np.empty(n, dtype=np.float64) if want_others else None
    fast = _kernels(kernel) if probs.dtype in (np.float32, np.float64) else None
    if fast is not None:
        fast[0](
            np.ascontiguousarray(probs), labels, pred, p_pred, p_label, row_min, row_sum,
            others if others is not None else np.empty(0), want_others,
        )
        return pred, p_pred, p_label, row_min, row_sum, others
    # Cache-sized slices keep every reduction below in cache and the
    # temporaries small (numpy's argmax copies a read-only input).
    step = max(1, SUB_BLOCK_BYTES // (k * probs.dtype.itemsize * 3))
    for a in range(0, n, step):
        b = min(a + step, n)
        part = probs[a:b]
        rows = np.arange(b - a)
        pred[a:b] = part.argmax(axis=1)
        p_pred[a:b] = part[rows, pred[a:b]]
        p_label[a:b] = part[rows, labels[a:b]]
        row_min[a:b] = part.min(axis=1)
        row_sum[a:b] = row_sums(part)
        if others is not None:
            others[a:b] = max_other(part, labels[a:b], pred[a:b], p_pred[a:b])
    return pred, p_pred, p_label, row_min, row_sum, others


#: The most classes for which the loops add float32 values by exponent: the
#: (K, 128) int64 accumulator, hit at a random class row by each row, must
#: stay in a core's cache.  On the development machine (AMD EPYC, 64 MB
#: blocks) it saved 13% of the loop at K = 20 and 4% at K = 100, broke even
#: near K = 300 and cost 3% at K = 1,000 against cutting each value into limbs.
EXPONENT_SUMS_MAX_K = 256


def _exponent_sums(probs: np.ndarray, k: int, limbs: tuple[int, int, float]) -> tuple[np.ndarray, np.ndarray, int]:
    """The loops' arguments for adding float32 values by binary exponent:
    ``(bits, acc, unit_shift)``.

    A float32 value below 2 is ``m * 2**(e - 150)``, ``m`` below ``2**24``:
    the loops add ``m`` to ``acc[class, e]`` (int64: exact for 2**39 values)
    and spread each class's ``acc`` over the exact sums' limbs once, at the
    end of the block (``flush_exponent_sums``), instead of cutting every value into limbs (a quarter
    of a segmentation block's pass one).  The sums' unit is ``2**(31 -
    n_limbs * limb_bits)``, ``2**(unit_shift - 150)``; a value below it is
    cut to the unit as the limbs' floor cuts it, so the class totals are
    the same integers either way (their limbs may hold them with other
    carries).  float64 values, and float32 values of 2 or more, negative or
    NaN, are cut into limbs one by one (``bits`` empty for float64), as
    are all values where there are more than :data:`EXPONENT_SUMS_MAX_K`
    classes.
    """
    n_limbs, limb_bits, scale = limbs
    if scale != 2.0 ** (limb_bits - 31):
        raise ValueError(f"limbs {limbs}: the scale must be 2**(limb_bits - 31)")
    unit_shift = 150 + 31 - n_limbs * limb_bits
    if probs.dtype != np.float32 or not 0 < unit_shift < 128 or k > EXPONENT_SUMS_MAX_K:
        # As writeable as ``probs``, as the view below is: numba compiles a
        # kernel per writeability, and ``dask-labelissues compile`` runs
        # only the views'.
        bits = np.zeros((0,) * probs.ndim, dtype=np.uint32)
        bits.setflags(write=probs.flags.writeable)
        return bits, np.zeros((k, 0), dtype=np.int64), 0
    return probs.view(np.uint32), np.zeros((k, 128), dtype=np.int64), unit_shift


def scan_records(
    probs: np.ndarray,
    labels: np.ndarray,
    rec: np.ndarray,
    margin: bool,
    tolerance: float | None,
    max_value: float,
    eps: float,
    limbs: tuple[int, int, float],
    kernel: str = "auto",
) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Pass one on a block in one numba loop, for scores the records hold
    without the thresholds (``self_confidence``, or ``normalized_margin``
    with ``margin``); None where numba does not run (the caller then takes
    the numpy path, :func:`scan_rows` and the reductions after it, which
    gives the same bits).

    Fills ``rec`` (``p_pred``, ``score``, ``label`` clipped to 0..K-1,
    ``pred``, ``reduce``: the near-tie rule with ``eps`` added in the
    input's dtype) and returns ``(counts, limb sums, first bad row)``:
    rows per clipped label (K,), the per-class sums of the fixed-point limbs
    of each row's own probability, ``limbs = (n_limbs, limb_bits, scale)``
    as :func:`limb_sums` takes them (K, n_limbs), and the index of the first
    row the checks of :func:`dask_labelissues.kernels.find_problem` reject,
    or -1.
    """
    if probs.dtype not in (np.float32, np.float64):
        return None
    fast = _kernels(kernel)
    if fast is None:
        return None
    n, k = probs.shape
    n_limbs, limb_bits, scale = limbs
    counts = np.zeros(k, dtype=np.int64)
    sums = np.zeros((k, n_limbs), dtype=np.int64)
    probs = np.ascontiguousarray(probs)
    bits, acc, unit_shift = _exponent_sums(probs, k, limbs)
    head = (probs, labels.astype(np.int64, copy=False), probs.dtype.type(eps),
            -1.0 if tolerance is None else float(tolerance), float(max_value))
    tail = (rec["p_pred"], rec["score"], rec["label"], rec["pred"], rec["reduce"],
            counts, sums, scale, float(1 << limb_bits), n_limbs, bits, acc, unit_shift)
    if not margin and k >= RECORDS_WIDE_K and probs.dtype == np.float32:
        first_bad = fast[10](*head, *tail, *_bits_views(probs))
    else:
        first_bad = fast[3](*head, margin, *tail)
    fast[11](acc, sums, unit_shift, limb_bits, n_limbs)
    return counts, sums, int(first_bad)


def _bits_views(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, Any]:
    """``(signed, unsigned, sign bit)``: ``probs``'s values as integers of
    their width, for the loop that compares them as integers."""
    width = probs.dtype.itemsize * 8
    signed, unsigned = np.dtype(f"int{width}"), np.dtype(f"uint{width}")
    return probs.view(signed), probs.view(unsigned), unsigned.type(1 << (width - 1))


def _build_planes() -> Any:
    """Compile (or load from numba's cache) :func:`scan_planes`'s kernel.

    Apart from :func:`_build_numba`'s kernels, so that a job on rows does
    not load it: only images' class planes need it.
    """
    import numba

    @numba.njit(nogil=True, cache=True)
    def records_planes(planes, raw_labels, eps, tolerance, max_value,
                       p_pred, score, label, pred, reduce, counts, sums, scale, base, n_limbs,
                       best, arg, low, total, bits, acc, unit_shift):
        # records' per-row work (self-confidence) on items stored class by
        # class: planes[i, j, p] is item i * P + p's probability of class j.
        # Its checks and sums are records', written out again for the
        # reason records gives (a shared helper defeated numba's cache).
        # The classes are taken one plane at a time, each pixel's running
        # max, argmax, min and float64 sum kept in ``best``, ``arg``, ``low``
        # and ``total`` (P each): the same comparisons and additions, in the
        # same class order, as records makes along a row, so the same bits.
        n, k, m = planes.shape
        first_bad = -1
        for i in range(n):
            for p in range(m):
                v = planes[i, 0, p]
                best[p] = v
                arg[p] = 0
                low[p] = v
                total[p] = np.float64(v)
            for j in range(1, k):
                for p in range(m):
                    v = planes[i, j, p]
                    if v > best[p]:
                        best[p] = v
                        arg[p] = j
                    if v < low[p]:
                        low[p] = v
                    total[p] += v
            for p in range(m):
                at = i * m + p
                raw = raw_labels[at]
                y = min(max(raw, 0), k - 1)
                own = planes[i, y, p]
                b = best[p]
                t = total[p]
                if first_bad < 0:
                    fine = (raw >= 0) & (raw < k) & (t > 0.0) & (t < np.inf) & (low[p] >= 0)
                    fine = fine & (np.float64(b) < max_value) & ((tolerance < 0) | (abs(t - 1.0) <= tolerance))
                    if not fine:
                        first_bad = at
                plus = own + eps
                a = arg[p]
                p_pred[at] = b
                label[at] = y
                pred[at] = a
                reduce[at] = (a == y) | ((a < y) & (b < plus)) | ((a > y) & (b <= plus))
                own64 = np.float64(own)
                score[at] = own64
                counts[y] += 1
                if bits.shape[0] > 0:
                    bb = np.int64(bits[i, y, p])
                    e = bb >> 23
                    if e < 128:
                        mm = bb & 0x7FFFFF
                        if e == 0:
                            e = 1
                        else:
                            mm |= 0x800000
                        if e < unit_shift:
                            mm >>= unit_shift - e
                            e = unit_shift
                        acc[y, e] += mm
                        continue
                if not (np.isfinite(own64) and own64 >= 0 and own64 < max_value):
                    own64 = 0.0
                rest = own64 * scale
                for j in range(n_limbs):
                    limb = np.floor(rest)
                    sums[y, j] += np.int64(limb)
                    rest = (rest - limb) * base
        return first_bad

    return records_planes


_PLANES: Any = None


def scan_planes(
    planes: np.ndarray,
    labels: np.ndarray,
    rec: np.ndarray,
    tolerance: float | None,
    max_value: float,
    eps: float,
    limbs: tuple[int, int, float],
    kernel: str = "auto",
) -> tuple[np.ndarray, np.ndarray, int] | None:
    """:func:`scan_records` (self-confidence) for items stored as class
    planes: ``planes`` ``(n, K, P)``, item ``i * P + p`` being pixel ``p``
    of image ``i``, read in place, with no copy to items x classes.  Same
    outputs, same bits; None where numba does not run or the dtype is not
    float32 or float64 (the caller then makes the items and scans those).
    """
    global _PLANES
    if planes.dtype not in (np.float32, np.float64) or _kernels(kernel) is None:
        return None
    if _PLANES is None:
        with _NUMBA_LOCK:
            if _PLANES is None:
                _PLANES = _build_planes()
    n, k, m = planes.shape
    n_limbs, limb_bits, scale = limbs
    counts = np.zeros(k, dtype=np.int64)
    sums = np.zeros((k, n_limbs), dtype=np.int64)
    planes = np.ascontiguousarray(planes)
    bits, acc, unit_shift = _exponent_sums(planes, k, limbs)
    first_bad = _PLANES(
        planes, labels.astype(np.int64, copy=False), planes.dtype.type(eps),
        -1.0 if tolerance is None else float(tolerance), float(max_value),
        rec["p_pred"], rec["score"], rec["label"], rec["pred"], rec["reduce"],
        counts, sums, scale, float(1 << limb_bits), n_limbs,
        np.empty(m, dtype=planes.dtype), np.empty(m, dtype=np.int64), np.empty(m, dtype=planes.dtype),
        np.empty(m, dtype=np.float64), bits, acc, unit_shift,
    )
    _kernels(kernel)[11](acc, sums, unit_shift, limb_bits, n_limbs)
    return counts, sums, int(first_bad)


def score_records(
    rec: np.ndarray, cut: np.ndarray, out: np.ndarray, digit_bits: int, kernel: str = "auto", total_only: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Pass two on a block of records whose ``score`` field is the score, in
    one numba loop; None where numba does not run (the caller then takes
    the numpy path, which gives the same values).

    Copies the scores to ``out`` (float64) and returns ``(prune, norm, n,
    histogram)``: per given label, the rows whose ``p_pred`` reaches
    ``cut[pred]`` and are predicted as another class, those rows whatever
    their prediction, and all rows (int64, K each; with ``total_only``,
    the first's total alone, as one class, and zeros); and the counts of
    the leading ``digit_bits`` bits of each score's order-preserving key
    (int64, ``2**digit_bits``).
    """
    fast = _kernels(kernel)
    if fast is None:
        return None
    k = 1 if total_only else cut.shape[0]
    prune, norm, n_rows = (np.zeros(k, dtype=np.int64) for _ in range(3))
    hist = np.zeros(1 << digit_bits, dtype=np.int64)
    score = rec["score"]
    fast[4](
        score, score.view(np.uint64), rec["label"], rec["pred"], rec["p_pred"], cut.astype(np.float64), out,
        prune, norm, n_rows, hist, np.uint64(64 - digit_bits), _KEY_TOP, _NAN_KEY,
    )
    return prune, norm, n_rows, hist


def _select(score: np.ndarray, shift: int, prefix: int, cutoff: int, quota: int, dropped: np.ndarray | None,
            kernel: str, out: np.ndarray | None = None) -> np.ndarray | None:
    fast = _loaded_kernels(kernel)
    if fast is None:
        return None
    score = np.ascontiguousarray(score, dtype=np.float64)
    mask = np.empty(score.shape[0], dtype=np.bool_) if out is None else out
    issues = dropped is not None
    dropped = np.ascontiguousarray(dropped if issues else (), dtype=np.int64)
    fast[5](score, score.view(np.uint64), np.uint64(shift), np.uint64(prefix), np.uint64(cutoff), int(quota),
            issues, dropped, _KEY_TOP, _NAN_KEY, mask)
    return mask


def prefix_mask(score: np.ndarray, shift: int, prefix: int, kernel: str = "auto") -> np.ndarray | None:
    """Rows whose score key (:func:`dask_labelissues.kernels.score_keys`)
    shifted right by ``shift`` (below 64) is at most ``prefix``, in one numba
    loop; None unless numba's kernels are loaded in this process."""
    return _select(score, shift, prefix, 0, 0, None, kernel)


def issue_mask(
    score: np.ndarray, cutoff: int, quota: int, dropped: np.ndarray, kernel: str = "auto",
    out: np.ndarray | None = None,
) -> np.ndarray | None:
    """Rows whose score key is below ``cutoff``, or among the first ``quota``
    equal to it, but the rows ``dropped`` (positions in ``score``), in numba
    loops, written to ``out`` if given; None unless numba's kernels are
    loaded in this process."""
    return _select(score, 0, 0, cutoff, quota, dropped, kernel, out)


def max_other(
    probs: np.ndarray, labels: np.ndarray, pred: np.ndarray, p_pred: np.ndarray
) -> np.ndarray:
    """Largest probability of a class other than the given label, as float64."""
    out = p_pred.astype(np.float64)
    hit = np.flatnonzero(pred == labels)
    if hit.size:
        sub = np.array(probs[hit], dtype=np.float64)
        sub[np.arange(hit.size), labels[hit]] = -np.inf
        out[hit] = sub.max(axis=1)
    return out


def limb_sums(
    labels: np.ndarray, values: np.ndarray, k: int, n_limbs: int, limb_bits: int, scale: float,
    kernel: str = "auto",
) -> np.ndarray:
    """Per-class sums of the fixed-point limbs of ``values``, shape (k, n_limbs), int64.

    Limb j of a value v is ``floor(r_j)`` where ``r_0 = v * scale`` and
    ``r_{j+1} = (r_j - floor(r_j)) * 2**limb_bits``; every step is exact in
    float64, so both implementations give the same integers.
    """
    out = np.zeros((k, n_limbs), dtype=np.int64)
    base = float(1 << limb_bits)
    fast = _kernels(kernel)
    if fast is not None:
        fast[1](labels.astype(np.int64, copy=False), values.astype(np.float64, copy=False),
                     out, scale, base, n_limbs)
        return out
    # float64 bincount sums of limbs below 2**limb_bits are exact for this many rows
    exact_rows = 1 << (53 - limb_bits)
    rest = values * scale
    limbs = []
    for _ in range(n_limbs):
        limb = np.floor(rest)
        limbs.append(limb)
        rest = (rest - limb) * base
    for a in range(0, values.shape[0], exact_rows):
        b = a + exact_rows
        for j, limb in enumerate(limbs):
            out[:, j] += np.bincount(labels[a:b], weights=limb[a:b], minlength=k).astype(np.int64)
    return out


def joint_rows(
    probs: np.ndarray,
    labels: np.ndarray,
    pred: np.ndarray,
    cut: np.ndarray,
    m: int,
    kernel: str = "auto",
    cells: np.ndarray | None = None,
) -> tuple[np.ndarray, ...]:
    """The per-row part of a filter's second read, in one pass over each row.

    Returns ``(guess, max_other, cand, margin, bound)``:

    * ``guess``: the class a row is counted in by the confident joint: the
      one class with ``p >= cut``, the argmax ``pred`` when several are, -1
      when none is;
    * ``max_other``: the largest probability of another class than the label;
    * for ``m > 0``: ``cand`` (n, m) the m classes besides the label with the
      largest probabilities and ``margin`` their ``p_j - p_label`` (input
      dtype); ``bound`` at least the margin of any class not kept.  With
      more classes than ``m + 1``, a row whose label holds at least half of
      the row's (sequential float64) sum keeps none (``cand`` -1) and its
      bound is ``sum - 2 p_label`` plus a slack for float32 rounding.

    Both implementations give the same guesses, maxima and bounds; on equal
    probabilities they may keep different classes, which changes no result.

    ``cells``, if given, a (2, K * K) int64 table, gets added the rows of
    each (label, guess) cell (``guess`` >= 0) in its first row and, in its
    second, the kept (label, candidate) pairs with a positive margin: the
    loop counts them as it goes, where numpy read the outputs again.
    """
    n, k = probs.shape
    native = probs.dtype
    y = labels.astype(np.int64, copy=False)
    guess = np.empty(n, dtype=np.int32)
    max_other = np.empty(n, dtype=native)
    cand = np.empty((n, m), dtype=np.int32)
    margin = np.empty((n, m), dtype=native)
    bound = np.empty(n, dtype=native)
    fast = _kernels(kernel) if native in (np.float32, np.float64) else None
    if fast is not None:
        fast[2](
            np.ascontiguousarray(probs), y, pred.astype(np.int64, copy=False), cut, m,
            guess, max_other, cand, margin, bound,
            np.empty(m + 1, dtype=native), np.empty(m + 1, dtype=np.int64),
            np.zeros((2, 1), dtype=np.int64) if cells is None else cells, cells is not None,
        )
        return guess, max_other, cand, margin, bound
    step = max(1, SUB_BLOCK_BYTES // (k * 8))
    for a in range(0, n, step):
        b = min(a + step, n)
        p = probs[a:b]
        rows = np.arange(b - a)
        confident = p >= cut
        n_confident = confident.sum(axis=1)
        g = np.where(n_confident > 1, pred[a:b], confident.argmax(axis=1))
        g[n_confident == 0] = -1
        guess[a:b] = g
        own = p[rows, y[a:b]]
        others = np.array(p, dtype=native)
        others[rows, y[a:b]] = -np.inf
        max_other[a:b] = others.max(axis=1)
        if m:
            total = row_sums(p)
            _top_candidates(others, own, total, m, cand[a:b], margin[a:b], bound[a:b])
    if cells is not None:
        counted = guess >= 0
        cells[0] += np.bincount(y[counted] * k + guess[counted], minlength=k * k)
        rows, slots = np.nonzero(margin > 0)
        cells[1] += np.bincount(y[rows] * k + cand[rows, slots], minlength=k * k)
    return guess, max_other, cand, margin, bound


def _top_candidates(
    others: np.ndarray, own: np.ndarray, total: np.ndarray, m: int,
    cand: np.ndarray, margin: np.ndarray, bound: np.ndarray,
) -> None:
    k = others.shape[1]
    own64 = own.astype(np.float64)
    cand[:] = -1
    margin[:] = 0
    bound[:] = (total - 2.0 * own64) + 1e-6 * np.maximum(total, 1.0)
    full = m + 1 >= k
    rows = np.arange(own.size) if full else np.flatnonzero(own64 < total / 2.0)
    if rows.size == 0:
        return
    sub = others[rows]
    if full:
        top = np.broadcast_to(np.arange(k), (rows.size, k))
    else:
        # The m + 1 largest (the given label is -inf, so never among them).
        top = np.argpartition(-sub, m, axis=1)[:, : m + 1]
    values = np.take_along_axis(sub, top, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")
    top = np.take_along_axis(top, order, axis=1)
    values = np.take_along_axis(values, order, axis=1)
    mine = own[rows, None]
    cand[rows] = top[:, :m]
    margin[rows] = values[:, :m] - mine
    bound[rows] = -np.inf if full else values[:, m] - mine[:, 0]
