"""Token classification: cleanlab.token_classification's functions, on any engine.

Every token of every sentence is one row of confident learning, as in
``cleanlab.token_classification``.  Give either cleanlab's in-memory form
(``labels[i]`` the labels of sentence ``i``, ``pred_probs[i]`` its
``(T_i, K)`` probabilities), or the form a store holds at scale: flat
tokens, labels ``(T,)`` and pred_probs ``(T, K)`` (numpy, ``.npy``, Zarr,
HDF5 or dask), with ``sentence_offsets`` ``(N + 1,)``: sentence ``i`` is
tokens ``offsets[i]:offsets[i + 1]``.  The flat form is read a block at a
time, on one machine or a Dask cluster, as classification rows are.  For
the scores, blocks end at sentence offsets, so each sentence is scored in
the task that reads its tokens: the ``(N,)`` sentence scores come back,
and the token scores stay where the engine holds them.

Differences from cleanlab:

- issues tied in score are ranked by token order (cleanlab's sort takes
  any of them);
- ``low_memory=True`` is accepted and changes nothing: the exact method
  already runs in bounded memory (cleanlab's falls back to its batched
  estimate, which flags other tokens);
- a sentence with no tokens scores 1 (cleanlab fails on one);
- scores are float64, and sentence scores are computed in float64 (for
  float32 pred_probs cleanlab's softmin runs in float32: the two then
  differ by about 1e-6 of the score);
- bad values are refused naming the sentence and token;
- :func:`issues_from_scores` over sentence scores returns the sentences
  scored below the threshold, ties by index (cleanlab's fails when every
  sentence is below it);
- :func:`common_label_issues` prints only with ``verbose`` (cleanlab
  prints the words either way), and :func:`display_issues` marks the
  flagged token with brackets rather than a terminal colour.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import inputs
from .api import find_label_issues as _find_rows
from .engines import make_engine
from .filter import adjusts
from .filters import filter_spec
from .kernels import METHODS, ScoreSpec
from .kinds import ROWS
from .lockstep import by_buckets, run_filters
from .pipelines import run_sentence_scores, warm_up
from .sentences import SENTENCE_SCORE_METHODS, SOFTMIN_TEMPERATURE
# The sentence reductions the block tasks use, importable from here too.
from .sentences import sentence_mean, sentence_min, sentence_softmin  # noqa: F401
from .states import located

__all__ = [
    "common_label_issues", "display_issues", "filter_by_token", "find_label_issues", "get_label_quality_scores",
    "issues_from_scores",
]

#: What :func:`get_label_quality_scores` passes to the engine.
ENGINE_OPTIONS = ("backend", "client", "chunk_rows", "n_jobs", "progress", "row_sum_tolerance", "spill_dir")


def find_label_issues(
    labels: Any,
    pred_probs: Any,
    *,
    return_indices_ranked_by: str = "self_confidence",
    low_memory: bool = False,
    sentence_offsets: Any = None,
    as_array: bool = False,
    **kwargs: Any,
) -> list[tuple[int, int]] | np.ndarray:
    """The tokens whose given label is likely wrong, most likely first.

    Parameters
    ----------
    labels
        ``labels[i]``: the given labels of sentence ``i``'s tokens (a list of
        lists or of arrays), integers in ``0..K-1``; or, with
        ``sentence_offsets``, every token's label, flat ``(T,)``.
    pred_probs
        ``pred_probs[i]``: sentence ``i``'s ``(T_i, K)`` predicted
        probabilities; or, with ``sentence_offsets``, flat ``(T, K)``.
    return_indices_ranked_by
        The token score that orders the issues: ``"self_confidence"``,
        ``"normalized_margin"`` or ``"confidence_weighted_entropy"``.
    low_memory
        Accepted for cleanlab's callers; the method is the same either way.
    sentence_offsets
        ``(N + 1,)`` non-decreasing token offsets from 0 to T, for the flat
        form (any array source or path).
    as_array
        Return an ``(M, 2)`` int64 array of ``(sentence, token)`` rows
        instead of a list of tuples (which costs about 150 bytes an issue).
    **kwargs
        :func:`dask_labelissues.find_label_issues`'s options, applied to
        the tokens: cleanlab.filter's (``filter_by``, default
        ``"prune_by_noise_rate"`` as in cleanlab, ``frac_noise``,
        ``num_to_remove_per_class``, ``min_examples_per_class``, ``n_jobs``,
        ``rank_by_kwargs={"adjust_pred_probs": True}``) and the engine's
        (``backend``, ``client``, ``chunk_rows``, ...);
        ``verbose`` shows progress bars.

    Returns
    -------
    list of (int, int), or numpy.ndarray
        ``(i, j)``: token ``j`` of sentence ``i`` is likely mislabeled.

    Raises
    ------
    ValueError
        Mismatched lengths, bad offsets, or a bad value (NaN, inf,
        negative, a token not summing to 1, a label outside ``0..K-1``),
        named by sentence and token.
    """
    if return_indices_ranked_by not in METHODS:
        raise ValueError(
            f"return_indices_ranked_by={return_indices_ranked_by!r} is not one of {', '.join(METHODS)}"
        )
    del low_memory  # the exact method runs in bounded memory already
    flat_labels, flat_probs, offsets = _tokens(labels, pred_probs, sentence_offsets)
    options = _filter_options(kwargs)
    options.setdefault("filter_by", "prune_by_noise_rate")
    with _located(offsets):
        issues = _issues_by_buckets(flat_labels, flat_probs, return_indices_ranked_by, options)
        if issues is None:
            issues = _find_rows(flat_labels, flat_probs, return_indices_ranked_by=return_indices_ranked_by, **options).issues
    pairs = token_pairs(np.asarray(issues, dtype=np.int64), offsets)
    return pairs if as_array else _as_tuples(pairs)


#: The options :func:`_issues_by_buckets` takes besides the engine's.
BUCKET_FILTER_OPTIONS = ("filter_by", "frac_noise", "min_examples_per_class", "num_to_remove_per_class")


def _issues_by_buckets(labels: Any, pred_probs: Any, method: str, options: dict[str, Any]) -> np.ndarray | None:
    """prune_by_noise_rate's issues, ranked by ``method``, selected by key
    buckets (:func:`dask_labelissues.lockstep.run_filters` on one
    problem); None where the options or the classes do not allow it.

    The same issues, in the same order, as the rows' filter, which keeps
    an item-long joint record of kept candidates (76 bytes a token of 20
    classes) and the records, scores and mask (41 bytes): this path keeps
    no item-long column, and reads pred_probs 4 times instead of 2.  Taken
    where the job runs numba's kernels: on 20,000,000 tokens of 20 classes,
    warm, 4.4 s against 6.1 s on ``.npy``, and a fresh process's peak RSS
    507 MB against 2,740 MB; with the numpy kernels (small jobs in a fresh
    process) its bucket counts cost 3 times the rows' filter on 2,000,000
    tokens.
    """
    if (
        options.get("filter_by") != "prune_by_noise_rate"
        or options.get("num_to_remove_per_class") is not None
        or not set(options) <= {*ENGINE_OPTIONS, *BUCKET_FILTER_OPTIONS}
    ):
        return None
    lab, probs, _, k = inputs.open_pair(labels, pred_probs)
    fspec = filter_spec(
        "prune_by_noise_rate", options.get("frac_noise", 1.0), None, options.get("min_examples_per_class", 1)
    )
    if not by_buckets(fspec, k):
        return None
    spec = ScoreSpec(method, False, "off_diagonal", options.get("row_sum_tolerance", 1e-3))
    engine, _, _ = make_engine(
        options.get("backend", "auto"), lab, probs, spec, single_read=False,
        **{name: options[name] for name in ("chunk_rows", "n_jobs", "client", "progress", "spill_dir") if name in options},
        warm_up=lambda s: warm_up(s, fspec, k, probs.dtype),
        # The buckets run on numba only; the rows' filter instead would take
        # several times the memory.
        numpy_while_compiling=False,
    )
    try:
        if engine.plan.spec.kernel == "numpy":
            return None
        found = run_filters(engine, engine.plan.spec, [ROWS], [fspec], mask=False)
    finally:
        engine.close()
    return np.asarray(found.issues[0])


def get_label_quality_scores(
    labels: Any,
    pred_probs: Any,
    *,
    tokens: Sequence[Sequence[str]] | None = None,
    token_score_method: str = "self_confidence",
    sentence_score_method: str = "min",
    sentence_score_kwargs: dict[str, Any] | None = None,
    sentence_offsets: Any = None,
    as_series: bool | None = None,
    **kwargs: Any,
) -> tuple[np.ndarray, Any]:
    """A score per sentence and per token: lower is more likely mislabeled.

    Parameters
    ----------
    labels, pred_probs, sentence_offsets
        As in :func:`find_label_issues`.
    tokens
        ``tokens[i]``: sentence ``i``'s words, the index of its token scores.
    token_score_method
        ``"self_confidence"``, ``"normalized_margin"`` or
        ``"confidence_weighted_entropy"`` (as ``cleanlab.rank``).
    sentence_score_method
        ``"min"``: a sentence's lowest token score; ``"softmin"``: its token
        scores weighted by a softmax of ``(1 - score) / temperature``.
    sentence_score_kwargs
        ``{"temperature": t}`` for ``"softmin"`` (default 0.05; 0 gives the
        min, ``inf`` the mean).
    as_series
        Token scores as a list of ``pandas.Series``, one a sentence, as
        cleanlab returns them (default for the in-memory form), or as one
        flat ``(T,)`` float64 array (default with ``sentence_offsets``).
    **kwargs
        The engine's options: ``backend``, ``client``, ``n_jobs``,
        ``chunk_rows`` (blocks end at the sentence offsets nearest to
        where these would end), ``row_sum_tolerance``, ``spill_dir``,
        ``verbose`` (progress bars).

    Returns
    -------
    sentence_scores : numpy.ndarray
        ``(N,)`` float64 in [0, 1]; 1 for a sentence with no tokens.
    token_scores : list of pandas.Series, numpy.ndarray or dask.array.Array
        Each token's score: flat, a dask array (lazy, its blocks held on
        the cluster) where an input is one or the job ran on a distributed
        Client, else numpy.

    Raises
    ------
    ValueError
        As :func:`find_label_issues`.
    TypeError
        An option the engine does not take.
    """
    if token_score_method not in METHODS:
        raise ValueError(f"token_score_method={token_score_method!r} is not one of {', '.join(METHODS)}")
    if sentence_score_method not in SENTENCE_SCORE_METHODS:
        raise ValueError(
            f"sentence_score_method={sentence_score_method!r} is not one of {', '.join(SENTENCE_SCORE_METHODS)}"
        )
    temperature = float((sentence_score_kwargs or {}).get("temperature", SOFTMIN_TEMPERATURE))
    options = _options(kwargs)
    unknown = sorted(set(options) - set(ENGINE_OPTIONS))
    if unknown:
        raise TypeError(f"get_label_quality_scores() got unexpected keyword arguments: {', '.join(unknown)}")
    flat_labels, flat_probs, offsets = _tokens(labels, pred_probs, sentence_offsets)
    lab, probs, _, k = inputs.open_pair(flat_labels, flat_probs)
    # The score api.find_label_issues(method=...) gives as label_quality_scores.
    spec = ScoreSpec(token_score_method, False, "off_diagonal", options.pop("row_sum_tolerance", 1e-3))
    engine, _, client = make_engine(
        options.pop("backend", "auto"), lab, probs, spec, single_read=True, cuts=offsets,
        warm_up=lambda s: warm_up(s, None, k, probs.dtype), **options,
    )
    try:
        with _located(offsets):
            scores, token_scores = run_sentence_scores(
                engine, engine.plan.spec, offsets, sentence_score_method, temperature
            )
    finally:
        engine.close()
    if as_series is None:
        as_series = sentence_offsets is None
    if not as_series:
        if inputs.is_dask_array(labels) or inputs.is_dask_array(pred_probs) or client is not None:
            return scores, token_scores if client is None else client.persist(token_scores)
        return scores, inputs.to_numpy(token_scores)
    import pandas as pd

    parts = np.split(inputs.to_numpy(token_scores), offsets[1:-1])
    if tokens is not None:
        return scores, [pd.Series(s, index=list(t)) for s, t in zip(parts, tokens)]
    return scores, [pd.Series(s) for s in parts]


def issues_from_scores(
    sentence_scores: Any, *, token_scores: Any = None, threshold: float = 0.1, sentence_offsets: Any = None
) -> Any:
    """The issues the scores point to, most severe first.

    Parameters
    ----------
    sentence_scores
        ``(N,)``, as :func:`get_label_quality_scores` returns them.
    token_scores
        Per-sentence token scores (a list), or a flat ``(T,)`` array with
        ``sentence_offsets``.
    threshold
        Scores below it are issues.
    sentence_offsets
        ``(N + 1,)``, for flat ``token_scores``.

    Returns
    -------
    list of (int, int) or numpy.ndarray
        With ``token_scores``, the ``(sentence, token)`` pairs of tokens
        scored below ``threshold``, lowest first (ties in token order); else
        the sentences scored below it, lowest first (ties by index).
    """
    if threshold is None or not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    if token_scores is not None:
        if sentence_offsets is not None:
            flat = np.asarray(token_scores, dtype=np.float64)
            offsets = _offsets(sentence_offsets, flat.shape[0])
        else:
            parts = [np.asarray(s, dtype=np.float64) for s in token_scores]
            offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
            flat = np.concatenate(parts) if parts else np.zeros(0)
        below = np.flatnonzero(flat < threshold)
        below = below[np.argsort(flat[below], kind="stable")]
        return _as_tuples(token_pairs(below, offsets))
    scores = np.asarray(sentence_scores, dtype=np.float64)
    ranking = np.argsort(scores, kind="stable")
    return ranking[: int(np.count_nonzero(scores < threshold))]


# -- summaries ---------------------------------------------------------------------------
def filter_by_token(token: str, issues: Any, tokens: Sequence[Sequence[str]]) -> list[tuple[int, int]]:
    """The issues at tokens that are ``token``, compared case-insensitively,
    in the order given, as cleanlab's ``filter_by_token``.

    Parameters
    ----------
    token
        The word to look for.
    issues
        ``(sentence, token)`` pairs (:func:`find_label_issues`: a list of
        tuples or an ``(M, 2)`` array).
    tokens
        ``tokens[i][j]``: the word of token ``j`` of sentence ``i``.

    Returns
    -------
    list of (int, int)
    """
    pairs = _issue_pairs(issues)
    wanted = token.lower()
    return [(i, j) for i, j in pairs.tolist() if str(tokens[i][j]).lower() == wanted]


def common_label_issues(
    issues: Any,
    tokens: Sequence[Sequence[str]],
    *,
    labels: Any = None,
    pred_probs: Any = None,
    class_names: Sequence[str] | None = None,
    top: int = 10,
    exclude: Sequence[tuple[int, int]] = (),
    verbose: bool = True,
    sentence_offsets: Any = None,
) -> Any:
    """The words that most often carry a label issue, as cleanlab's table.

    Parameters
    ----------
    issues
        ``(sentence, token)`` pairs (:func:`find_label_issues`).
    tokens
        ``tokens[i][j]``: the word of token ``j`` of sentence ``i``.
    labels, pred_probs
        Optional, as in :func:`find_label_issues` (nested, or flat with
        ``sentence_offsets``).  With both, the table has a row per word and
        (given, predicted) pair, the prediction being the token's argmax;
        only the flagged tokens' rows are read.
    class_names
        Names of the K classes, shown instead of their indices.
    top
        How many words to print (the table has them all).
    exclude
        ``(given, predicted)`` pairs not counted.
    verbose
        Print the ``top`` words, and with labels and pred_probs each one's
        pairs (cleanlab prints the words whatever ``verbose`` says).
    sentence_offsets
        ``(N + 1,)`` token offsets, for flat ``labels`` and ``pred_probs``
        (as in :func:`find_label_issues`).

    Returns
    -------
    pandas.DataFrame
        Columns ``token``, ``given_label``, ``predicted_label``,
        ``num_label_issues`` with labels and pred_probs, else ``token`` and
        ``num_label_issues``; most issues first, ties in the order the
        words first appear in ``issues`` (then by given and predicted class).
    """
    import pandas as pd

    pairs = _issue_pairs(issues)
    both = labels is not None and pred_probs is not None
    # The pairs are checked against the offsets before any word is looked up.
    given, predicted = _issue_classes(pairs, labels, pred_probs, sentence_offsets) if both else (None, None)
    words = [str(tokens[i][j]) for i, j in pairs.tolist()]
    if not both:
        totals: dict[str, int] = {}
        for word in words:
            totals[word] = totals.get(word, 0) + 1
        table = pd.DataFrame(sorted(totals.items(), key=lambda row: -row[1]), columns=["token", "num_label_issues"])
        if verbose:
            for word, count in table.head(top).itertuples(index=False):
                print(f"'{word}': {count} tokens flagged")
        return table
    k = _n_classes(pred_probs, sentence_offsets is not None)
    skip = {(int(a), int(b)) for a, b in exclude}
    counts: dict[str, dict[tuple[int, int], int]] = {}
    for word, g, p in zip(words, given.tolist(), predicted.tolist()):
        cell = counts.setdefault(word, {})
        if (g, p) not in skip:
            cell[(g, p)] = cell.get((g, p), 0) + 1
    names = [str(c) for c in range(k)] if class_names is None else list(class_names)
    rows = [
        (word, names[g] if class_names is not None else g, names[p] if class_names is not None else p, n)
        for word, cell in counts.items() for (g, p), n in sorted(cell.items())
    ]
    table = pd.DataFrame(
        sorted(rows, key=lambda row: -row[3]), columns=["token", "given_label", "predicted_label", "num_label_issues"]
    )
    if verbose:
        ranked = sorted(counts.items(), key=lambda item: -sum(item[1].values()))[:top]
        for word, cell in ranked:
            print(f"'{word}': {sum(cell.values())} tokens flagged")
            for (g, p), n in sorted(cell.items(), key=lambda item: -item[1]):
                print(f"    given {names[g]}, predicted {names[p]}: {n}")
    return table


def display_issues(
    issues: Any,
    tokens: Sequence[Sequence[str]],
    *,
    labels: Any = None,
    pred_probs: Any = None,
    exclude: Sequence[tuple[int, int]] = (),
    class_names: Sequence[str] | None = None,
    top: int = 20,
    sentence_offsets: Any = None,
) -> None:
    """Print the first ``top`` issues as cleanlab's ``display_issues`` does:
    each flagged token's sentence with the token marked, and its given and
    predicted labels where those are given.

    Parameters
    ----------
    issues
        ``(sentence, token)`` pairs (:func:`find_label_issues`), or
        sentence indices (:func:`issues_from_scores`), which prints those
        sentences.
    tokens
        ``tokens[i][j]``: the word of token ``j`` of sentence ``i``.
    labels, pred_probs
        Optional, as in :func:`common_label_issues`: each adds the given,
        or the predicted (argmax) label.
    exclude
        ``(given, predicted)`` pairs not shown (with both inputs given).
    class_names
        Names of the K classes, shown instead of their indices.
    top
        Most issues to print.
    sentence_offsets
        ``(N + 1,)`` token offsets, for flat ``labels`` and ``pred_probs``.
    """
    if np.ndim(issues) == 1:
        for i in np.asarray(issues, dtype=np.int64)[:top].tolist():
            print(f"Sentence {i}: {' '.join(map(str, tokens[i]))}")
        return
    pairs = _issue_pairs(issues)
    given, predicted = _issue_classes(pairs, labels, pred_probs, sentence_offsets)
    names = None if class_names is None else list(class_names)
    label_of = (lambda c: names[c]) if names is not None else str
    skip = {(int(a), int(b)) for a, b in exclude}
    shown = 0
    for n, (i, j) in enumerate(pairs.tolist()):
        if shown == top:
            break
        g = None if given is None else int(given[n])
        p = None if predicted is None else int(predicted[n])
        if g is not None and p is not None and (g, p) in skip:
            continue
        shown += 1
        words = [str(w) for w in tokens[i]]
        marked = " ".join(f"[{w}]" if t == j else w for t, w in enumerate(words))
        print(f"Sentence {i}, token {j}: '{words[j]}'")
        if g is not None:
            print(f"  given label: {label_of(g)}")
        if p is not None:
            print(f"  predicted label: {label_of(p)}")
        print(f"  {marked}")


def _issue_pairs(issues: Any) -> np.ndarray:
    """``(sentence, token)`` issues as an ``(M, 2)`` int64 array."""
    pairs = np.asarray(issues, dtype=np.int64) if len(issues) else np.zeros((0, 2), np.int64)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"issues must be (sentence, token) pairs, got shape {pairs.shape}")
    return pairs


def _issue_classes(
    pairs: np.ndarray, labels: Any, pred_probs: Any, sentence_offsets: Any
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The given label and the argmax of each issue's token (None for an
    input not given), reading only those tokens' rows."""
    if sentence_offsets is None:
        given = predicted = None
        if labels is not None:
            given = np.array([labels[i][j] for i, j in pairs.tolist()], dtype=np.int64)
        if pred_probs is not None:
            predicted = np.array([int(np.argmax(pred_probs[i][j])) for i, j in pairs.tolist()], dtype=np.int64)
        return given, predicted
    if labels is None and pred_probs is None:
        return None, None
    sources = [None if x is None else inputs.open_source(x, name) for x, name in ((labels, "labels"), (pred_probs, "pred_probs"))]
    n_tokens = next(int(src.shape[0]) for src in sources if src is not None)
    offsets = _offsets(sentence_offsets, n_tokens)
    sentence, token = pairs[:, 0], pairs[:, 1]
    bad = (sentence < 0) | (sentence >= len(offsets) - 1)
    bad[~bad] |= (token[~bad] < 0) | (token[~bad] >= np.diff(offsets)[sentence[~bad]])
    if bad.any():
        # A flat index would silently land in another sentence.
        i, j = pairs[np.flatnonzero(bad)[0]].tolist()
        raise ValueError(f"issue ({i}, {j}) names no token: the sentence_offsets give {len(offsets) - 1} sentences"
                         + (f", sentence {i} has {int(offsets[i + 1] - offsets[i])} tokens" if 0 <= i < len(offsets) - 1 else ""))
    rows = offsets[sentence] + token
    lab, probs = sources
    return (
        None if lab is None else _rows_at(lab, rows).astype(np.int64),
        None if probs is None else _rows_at(probs, rows).argmax(axis=1),
    )


def _n_classes(pred_probs: Any, flat: bool) -> int:
    """K, from flat pred_probs (any source) or the first sentence with tokens."""
    if flat:
        return int(inputs.open_source(pred_probs, "pred_probs").shape[1])
    return int(np.shape(next(p for p in pred_probs if len(p)))[1])


#: Issues closer than this many rows are read as one slice of the source.
ROW_GAP = 4096


def _rows_at(source: Any, rows: np.ndarray) -> np.ndarray:
    """``source[rows]`` for any array source, read in slices spanning
    nearby rows (sorted first), so a few issues do not read a store whole."""
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    parts = []
    breaks = np.flatnonzero(np.diff(sorted_rows) > ROW_GAP) + 1
    for run in np.split(sorted_rows, breaks) if sorted_rows.size else []:
        a, b = int(run[0]), int(run[-1]) + 1
        parts.append(inputs.to_numpy(source[a:b])[run - a])
    if not parts:
        return np.zeros((0, *source.shape[1:]), dtype=source.dtype)
    out = np.empty((rows.size, *parts[0].shape[1:]), dtype=parts[0].dtype)
    out[order] = np.concatenate(parts)
    return out


# -- sentences ---------------------------------------------------------------------------
def _as_tuples(pairs: np.ndarray) -> list[tuple[int, int]]:
    """``(sentence, token)`` rows as a list of tuples of Python ints, as
    cleanlab returns them (``tolist`` makes the ints: a loop over the rows
    took 0.79 s for a million of them, this 0.15 s)."""
    return list(zip(pairs[:, 0].tolist(), pairs[:, 1].tolist()))


def token_pairs(rows: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Flat token indices as ``(sentence, token)`` pairs.

    Parameters
    ----------
    rows
        Flat token indices, ``(M,)``.
    offsets
        ``(N + 1,)`` sentence offsets.

    Returns
    -------
    numpy.ndarray
        ``(M, 2)`` int64.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return np.zeros((0, 2), np.int64)
    # Searched in row order, then put back: numpy's search of ascending
    # values starts each from the last one found (a million issues ranked
    # by score: 0.20 s searched as given, 0.12 s this way).
    order = np.argsort(rows, kind="stable")
    sentence = np.empty_like(rows)
    sentence[order] = np.searchsorted(offsets, rows[order], side="right") - 1
    return np.stack([sentence, rows - offsets[sentence]], axis=1)


# -- inputs ------------------------------------------------------------------------------
def _tokens(labels: Any, pred_probs: Any, sentence_offsets: Any) -> tuple[Any, Any, np.ndarray]:
    """Flat labels and pred_probs (sources, not read here, in the flat form)
    and the sentence offsets."""
    if sentence_offsets is not None:
        lab = inputs.open_source(labels, "labels")
        probs = inputs.open_source(pred_probs, "pred_probs")
        if int(lab.shape[0]) != int(probs.shape[0]):
            raise ValueError(f"labels has {lab.shape[0]:,} tokens but pred_probs {probs.shape[0]:,}")
        return labels, pred_probs, _offsets(sentence_offsets, int(lab.shape[0]))
    if isinstance(labels, (str, bytes)) or not hasattr(labels, "__len__"):
        raise TypeError("labels must be a list of per-sentence labels, or flat labels with sentence_offsets")
    if len(labels) != len(pred_probs):
        raise ValueError(f"labels has {len(labels)} sentences but pred_probs {len(pred_probs)}")
    if len(labels) == 0:
        raise ValueError("no sentences")
    lengths = np.array([len(s) for s in labels], dtype=np.int64)
    probs = [np.asarray(p) for p in pred_probs]
    k = None
    for i, (n, p) in enumerate(zip(lengths, probs)):
        if (n and (p.ndim != 2 or p.shape[0] != n)) or (not n and p.size):
            raise ValueError(
                f"sentence {i} has {n} labels but pred_probs[{i}] has shape {p.shape}: it must be ({n}, K)"
            )
        if n:
            if k is not None and p.shape[1] != k:
                raise ValueError(f"pred_probs[{i}] has {p.shape[1]} classes, the sentences before it {k}")
            k = p.shape[1]
    if k is None:
        raise ValueError("no sentence has a token")
    flat_labels = np.concatenate([np.asarray(s, dtype=np.int64).reshape(-1) for s in labels])
    flat_probs = np.concatenate([p for p in probs if p.shape[0]])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return flat_labels, flat_probs, offsets


def _offsets(source: Any, n_tokens: int) -> np.ndarray:
    """Sentence offsets, checked against the tokens."""
    if isinstance(source, (np.ndarray, list, tuple)):
        offsets = np.asarray(source)
    else:
        src = inputs.open_source(source, "sentence_offsets")
        offsets = np.asarray(src.compute() if inputs.is_dask_array(src) else src[0 : int(src.shape[0])])
    if offsets.ndim != 1 or offsets.shape[0] < 2 or offsets.dtype.kind not in "iu":
        raise ValueError(f"sentence_offsets must be (N + 1,) integers, got shape {offsets.shape} of {offsets.dtype}")
    offsets = offsets.astype(np.int64)
    if offsets[0] != 0 or offsets[-1] != n_tokens:
        raise ValueError(
            f"sentence_offsets must run from 0 to the number of tokens, {n_tokens}; "
            f"they run from {offsets[0]} to {offsets[-1]}"
        )
    down = np.flatnonzero(np.diff(offsets) < 0)
    if down.size:
        i = int(down[0])
        raise ValueError(f"sentence_offsets decrease at sentence {i}: {offsets[i]} then {offsets[i + 1]}")
    return offsets


def _options(kwargs: dict[str, Any]) -> dict[str, Any]:
    options = dict(kwargs)
    if "verbose" in options:
        options["progress"] = bool(options.pop("verbose"))
    return options


def _filter_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """:func:`_options`, and cleanlab.filter's ``rank_by_kwargs`` (cleanlab
    passes :func:`find_label_issues`'s keywords on to cleanlab.filter) as
    the engine's ``adjust_pred_probs``."""
    options = _options(kwargs)
    if adjusts(options.pop("rank_by_kwargs", None)):
        options["adjust_pred_probs"] = True
    return options


def _located(offsets: np.ndarray) -> Any:
    """Bad values named by the sentence and token they are at."""

    def where(item: int) -> str:
        ((sentence, token),) = token_pairs(np.array([item]), offsets)
        return f"sentence {sentence}, token {token}"

    return located(where)
