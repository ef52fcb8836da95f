"""``find --task multilabel`` and ``find --task token``: their jobs, results
stores and what ``summary`` prints of them.

A multi-label store holds ``is_label_issue`` (N,), ``label_quality_scores``
(N,), ``issues`` (the flagged rows, worst first) and, per class,
``given_flagged`` and ``left_out_flagged`` (examples whose label of the
class is likely wrongly given, or wrongly left out).  A token store holds
``issues`` ((M, 2) sentence and token, worst first), ``token_scores`` (T,),
``sentence_scores`` (N,), ``ranked_sentences`` and ``sentence_offsets``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable

import numpy as np

MULTILABEL_FORMAT = "dask_labelissues multilabel results 1"
TOKEN_FORMAT = "dask_labelissues token results 1"


def run_task(args: argparse.Namespace, output: str, backend: str, client: Any,
             write: Callable[[dict[str, Any], dict[str, Any]], None]) -> dict[str, Any]:
    """Run ``args.task``'s job, write its store with ``write(arrays, attrs)``
    and return its view (what :func:`format_view` prints)."""
    from .inputs import open_path

    labels = open_path(args.labels, "labels")
    probs = open_path(args.pred_probs, "pred_probs")
    options = dict(backend=backend, client=client, chunk_rows=args.chunk_rows, n_jobs=args.n_jobs)
    names = args.class_names.split(",") if args.class_names else None
    filter_by = args.filter_by or "prune_by_noise_rate"
    prune = dict(frac_noise=args.frac_noise, min_examples_per_class=args.min_examples_per_class)
    started = time.perf_counter()
    if args.task == "multilabel":
        from . import dataset, multilabel_classification as ml

        k = int(probs.shape[1])
        if args.label_offsets is not None:
            labels = ml.LabelSets(labels, open_path(args.label_offsets, "label offsets"))
        labels, probs, _, _ = ml.open_inputs(labels, probs)  # once, for the four steps below
        if names is not None and len(names) != k:
            raise ValueError(f"--class-names has {len(names)} names; pred_probs has {k} classes")
        if filter_by in ("low_self_confidence", "low_normalized_margin"):
            per_class = ml.find_multilabel_issues_per_class(labels, probs, filter_by=filter_by, **prune, **options)
            scores = ml.get_label_quality_scores(labels, probs, **options)
            given, left_out = dataset.flagged_by_class(per_class, labels, probs)
            # These filters' issues are not the union of the classes' (see
            # multilabel_classification.find_label_issues).
            mask = ml.find_label_issues(labels, probs, filter_by=filter_by, **prune, **options)
        else:
            # The classes' flagged counts, the examples' flags and their
            # scores from one job, with no (N, K) matrix in this process.
            found = ml.find_issues(labels, probs, filter_by=filter_by, score_method="self_confidence",
                                   per_class=False, **prune, **options)
            mask, scores, given, left_out = found.flagged, found.scores, found.given_flagged, found.left_out_flagged
        issues = np.flatnonzero(mask)
        issues = issues[np.argsort(scores[issues], kind="stable")]
        arrays = {
            "is_label_issue": (mask, np.bool_), "label_quality_scores": (scores, np.float64),
            "issues": (issues, np.int64),
            "given_flagged": (given, np.int64), "left_out_flagged": (left_out, np.int64),
        }
        attrs = {"format": MULTILABEL_FORMAT, "examples": int(probs.shape[0]), "classes": k,
                 "num_issues": int(mask.sum()), "filter_by": filter_by, "class_names": names}
    else:
        from . import token_classification as tc

        if args.sentence_offsets is None:
            raise ValueError("--task token needs --sentence-offsets (N + 1 token offsets from 0 to T)")
        offsets = open_path(args.sentence_offsets, "sentence_offsets")
        offsets = np.asarray(offsets[0 : int(offsets.shape[0])], dtype=np.int64)
        checks = dict(row_sum_tolerance=args.row_sum_tolerance, **options)
        pairs = tc.find_label_issues(labels, probs, sentence_offsets=offsets, as_array=True, filter_by=filter_by,
                                     **prune, **checks)
        sentence_scores, token_scores = tc.get_label_quality_scores(
            labels, probs, sentence_offsets=offsets, sentence_score_method=args.sentence_score_method, **checks
        )
        ranked = np.argsort(sentence_scores, kind="stable")
        arrays = {
            "issues": (pairs, np.int64), "token_scores": (token_scores, np.float64),
            "sentence_scores": (sentence_scores, np.float64), "ranked_sentences": (ranked, np.int64),
            "sentence_offsets": (offsets, np.int64),
        }
        attrs = {"format": TOKEN_FORMAT, "sentences": int(len(offsets) - 1), "tokens": int(probs.shape[0]),
                 "classes": int(probs.shape[1]), "num_issues": int(len(pairs)), "filter_by": filter_by,
                 "sentence_score_method": args.sentence_score_method, "class_names": names}
    attrs.update(inputs={"labels": args.labels, "pred_probs": args.pred_probs}, backend=backend,
                 seconds=round(time.perf_counter() - started, 3))
    write(arrays, attrs)
    return view_of(attrs, {name: value for name, (value, _) in arrays.items()}, args.top)


def view_of(attrs: dict[str, Any], arrays: dict[str, Any], top: int) -> dict[str, Any]:
    """What ``find`` and ``summary`` print of a multi-label or token store."""
    if attrs["format"] == MULTILABEL_FORMAT:
        names = attrs.get("class_names") or [str(c) for c in range(attrs["classes"])]
        given, left = np.asarray(arrays["given_flagged"]), np.asarray(arrays["left_out_flagged"])
        rows = [(names[c], "given, likely absent", int(given[c])) for c in range(len(given))]
        rows += [(names[c], "left out, likely present", int(left[c])) for c in range(len(left))]
        rows.sort(key=lambda r: -r[2])  # stable: ties in class order, given first
        issues = np.asarray(arrays["issues"])[:top]
        scores = np.asarray(arrays["label_quality_scores"])
        return {
            "task": "multilabel", "examples": attrs["examples"], "classes": attrs["classes"],
            "num_issues": attrs["num_issues"],
            "common_issues": [{"class": c, "issue": what, "examples": n} for c, what, n in rows[:top] if n],
            "worst_examples": [{"row": int(i), "score": float(scores[i])} for i in issues],
        }
    pairs = np.asarray(arrays["issues"])
    scores = np.asarray(arrays["sentence_scores"])
    worst = []
    for s in np.asarray(arrays["ranked_sentences"])[:top]:
        flagged = pairs[pairs[:, 0] == s, 1]
        worst.append({"sentence": int(s), "score": float(scores[s]), "flagged_tokens": sorted(int(t) for t in flagged)})
    return {"task": "token", "sentences": attrs["sentences"], "tokens": attrs["tokens"], "classes": attrs["classes"],
            "num_issues": attrs["num_issues"], "worst_sentences": worst}


def format_view(view: dict[str, Any]) -> str:
    if view["task"] == "multilabel":
        lines = [
            f"examples        {view['examples']:,}, {view['classes']} classes",
            f"label issues    {view['num_issues']:,} examples ({view['num_issues'] / view['examples']:.2%})",
            "", "most common issues:",
        ]
        lines += [f"{r['class']:>12}  {r['issue']:<26}{r['examples']:>10,} examples" for r in view["common_issues"]]
        lines += ["", "worst examples (label quality score, lower is worse):", f"{'row':>10} {'score':>10}"]
        lines += [f"{w['row']:>10} {w['score']:>10.4g}" for w in view["worst_examples"]]
        return "\n".join(lines)
    lines = [
        f"sentences       {view['sentences']:,} ({view['tokens']:,} tokens), {view['classes']} classes",
        f"label issues    {view['num_issues']:,} tokens ({view['num_issues'] / view['tokens']:.2%})",
        "", "worst sentences (sentence score, lower is worse) and their flagged tokens:",
        f"{'sentence':>10} {'score':>10}  flagged tokens",
    ]
    lines += [f"{w['sentence']:>10} {w['score']:>10.4g}  {', '.join(map(str, w['flagged_tokens'])) or '-'}"
              for w in view["worst_sentences"]]
    return "\n".join(lines)


def store_view(group: Any, top: int) -> dict[str, Any] | None:
    """A multi-label or token store's view; None for other stores."""
    attrs = dict(group.attrs)
    if attrs.get("format") not in (MULTILABEL_FORMAT, TOKEN_FORMAT):
        return None
    names = (["given_flagged", "left_out_flagged", "issues", "label_quality_scores"]
             if attrs["format"] == MULTILABEL_FORMAT else ["issues", "sentence_scores", "ranked_sentences"])
    return view_of(attrs, {name: group[name][:] for name in names}, top)


def print_view(view: dict[str, Any], as_json: bool, extra: dict[str, Any] | None = None) -> None:
    print(json.dumps({**view, **(extra or {})}) if as_json else format_view(view))
