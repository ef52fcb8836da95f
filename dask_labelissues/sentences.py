"""Sentences of tokens: per-sentence reductions of token scores (numpy),
and the block task that makes them.

A job's tokens are flat, ``(T,)``, and sentence ``i`` is tokens
``offsets[i]:offsets[i + 1]`` of ``(N + 1,)`` non-decreasing offsets.
Every function here reduces each sentence over its own tokens only, so it
gives the same bits on a block of whole sentences (offsets counted from
the block's first token) as on all of them: the engines cut a token job's
blocks at sentence offsets (:func:`dask_labelissues.engines.blocks.snap_ends`)
and :func:`sentence_block` scores each block's sentences where its tokens
are.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .aggregations import Pair

#: cleanlab's softmin temperature for sentence scores.
SOFTMIN_TEMPERATURE = 0.05
#: How a sentence's score is made from its tokens'.
SENTENCE_SCORE_METHODS = ("min", "softmin")


def sentence_min(scores: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Each sentence's lowest token score (1 for an empty sentence)."""
    return _per_sentence(np.minimum, scores, offsets)


def sentence_mean(scores: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Each sentence's mean token score (1 for an empty sentence)."""
    lengths = np.diff(offsets)
    sums = _per_sentence(np.add, scores, offsets, empty=0.0)
    return np.divide(sums, lengths, out=np.ones(len(lengths)), where=lengths > 0)


def sentence_softmin(scores: np.ndarray, offsets: np.ndarray, temperature: float) -> np.ndarray:
    """Each sentence's token scores weighted by a softmax of ``(1 - score) /
    temperature``, shifted by the sentence's largest exponent so that no
    weight overflows (1 for an empty sentence)."""
    x = (1.0 - scores) / temperature
    top = _per_sentence(np.maximum, x, offsets, empty=0.0)
    lengths = np.diff(offsets)
    weights = np.exp(x - np.repeat(top, lengths))
    total = _per_sentence(np.add, weights, offsets, empty=0.0)
    weighted = _per_sentence(np.add, weights * scores, offsets, empty=0.0)
    return np.divide(weighted, total, out=np.ones(len(lengths)), where=lengths > 0)


def sentence_scores(
    scores: np.ndarray, offsets: np.ndarray, method: str = "min", temperature: float = SOFTMIN_TEMPERATURE
) -> np.ndarray:
    """Each sentence's score from its token scores.

    Parameters
    ----------
    scores
        ``(T,)`` float64 token scores.
    offsets
        ``(N + 1,)`` sentence offsets into ``scores``, from 0 to T.
    method
        ``"min"``: :func:`sentence_min`; ``"softmin"``:
        :func:`sentence_softmin`, which is the min at temperature 0 and
        the mean (:func:`sentence_mean`) at ``inf``.
    temperature
        Softmin's temperature.

    Returns
    -------
    numpy.ndarray
        ``(N,)`` float64; 1 for a sentence with no tokens.
    """
    if method not in SENTENCE_SCORE_METHODS:
        raise ValueError(f"sentence_score_method={method!r} is not one of {', '.join(SENTENCE_SCORE_METHODS)}")
    if method == "min" or temperature == 0:
        return sentence_min(scores, offsets)
    if np.isinf(temperature):
        return sentence_mean(scores, offsets)
    return sentence_softmin(scores, offsets, temperature)


def _per_sentence(ufunc: np.ufunc, values: np.ndarray, offsets: np.ndarray, empty: float = 1.0) -> np.ndarray:
    """``ufunc.reduce`` over each sentence's values; ``empty`` where it has none."""
    lengths = np.diff(offsets)
    out = np.full(len(lengths), empty, dtype=np.float64)
    full = lengths > 0
    if full.any():
        out[full] = ufunc.reduceat(values, offsets[:-1][full])
    return out


def block_offsets(offsets: np.ndarray, bounds: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Each block's sentences, as offsets from the block's first token.

    A sentence belongs to the block holding its first token; an empty one
    to the block its offset falls in (the last block, at the end), so
    every sentence is in exactly one block, in order.

    Parameters
    ----------
    offsets
        ``(N + 1,)`` sentence offsets, from 0 to T.
    bounds
        ``(start, stop)`` tokens of consecutive blocks covering ``0:T``.

    Returns
    -------
    list of numpy.ndarray
        Per block, ``(n_i + 1,)`` int64 offsets from 0 to the block's length.

    Raises
    ------
    ValueError
        A block that starts or ends inside a sentence.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    n = len(offsets) - 1
    starts = offsets[:-1]
    out = []
    for i, (a, b) in enumerate(bounds):
        first = int(np.searchsorted(starts, a, side="left"))
        end = n if i == len(bounds) - 1 else int(np.searchsorted(starts, b, side="left"))
        if offsets[first] != a or offsets[end] != b:
            raise ValueError(
                f"block {i} (tokens {a}:{b}) cuts a sentence: blocks must end at sentence offsets"
            )
        out.append(offsets[first : end + 1] - a)
    return out


def sentence_block(
    rec: np.ndarray, offsets: np.ndarray, method: str, temperature: float, out: np.ndarray | None = None
) -> Pair:
    """A block's token scores (written to ``out`` where the engine keeps
    the column) and, as its state, its sentences' scores.

    Parameters
    ----------
    rec
        Pass one's records of the block's tokens; their ``score`` field is
        each token's score.
    offsets
        The block's sentences (:func:`block_offsets`).
    method, temperature
        As :func:`sentence_scores`.
    out
        The block's rows of the token scores column, if the engine keeps one.

    Returns
    -------
    Pair
        ``(T_block,)`` float64 token scores, ``(n_block,)`` float64 sentence scores.
    """
    if out is None:
        out = np.array(rec["score"], dtype=np.float64)
    else:
        out[...] = rec["score"]
    # Records of a block pass one found bad (NaN, inf) make meaningless
    # scores, and the job raises the problem once this stage is done; its
    # warnings would only come first.
    with np.errstate(all="ignore"):
        return Pair(out, sentence_scores(out, offsets, method, temperature))
