"""From start/end logits to answer texts: BERT's n-best span search over all windows of a question.

For each window of an example, the ``n_best_size`` highest start logits and the ``n_best_size``
highest end logits (over all positions) are paired. A pair (s, e) is a candidate when both tokens
lie in the context, the window is token s's maximum-context window, e >= s, and the span has at
most ``max_answer_length`` tokens; its score is start_logit[s] + end_logit[e]. Candidates of all
windows are ranked by score; the text of each is the original context between the first character
of token s and the last character of token e (through the tokenizer's offsets, so case, accents and
spacing are the context's own); duplicates of a text already listed are dropped until
``n_best_size`` remain. Their probabilities are the softmax of their scores. The prediction is the
best one; with no candidate at all it is the empty string.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from bertrecipes.squad.data import SquadExample, SquadFeatures


def best_spans(
    examples: list[SquadExample],
    features: SquadFeatures,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    n_best_size: int = 20,
    max_answer_length: int = 30,
) -> tuple[dict[str, str], dict[str, list[dict[str, Any]]]]:
    """``(predictions {id: text}, nbest {id: [{text, probability, start_logit, end_logit}]})``.

    ``start_logits``/``end_logits`` are [num_features, seq_len], row f for window f of ``features``.
    """
    if start_logits.shape != features.input_ids.shape or end_logits.shape != features.input_ids.shape:
        raise ValueError(f"logits {start_logits.shape}/{end_logits.shape} do not match the features "
                         f"{features.input_ids.shape}")
    windows_of: dict[int, list[int]] = defaultdict(list)
    for f, example in enumerate(features.example_index.tolist()):
        windows_of[example].append(f)

    predictions: dict[str, str] = {}
    nbest: dict[str, list[dict[str, Any]]] = {}
    for index, example in enumerate(examples):
        candidates = []  # (score, start logit, end logit, char start, char end)
        for f in windows_of.get(index, []):
            offsets, max_ctx = features.token_offsets[f], features.max_context[f]
            starts = np.argsort(-start_logits[f], kind="stable")[:n_best_size]
            ends = np.argsort(-end_logits[f], kind="stable")[:n_best_size]
            # All (start, end) pairs at once, in the order of a loop over starts then ends.
            s, e = starts[:, None], ends[None, :]
            valid = ((offsets[s, 0] >= 0) & max_ctx[s] & (offsets[e, 0] >= 0) & (e >= s)
                     & (e - s + 1 <= max_answer_length))
            rows, cols = np.nonzero(valid)
            s_best, e_best = starts[rows], ends[cols]
            s_logits, e_logits = start_logits[f, s_best].tolist(), end_logits[f, e_best].tolist()
            scores = [a + b for a, b in zip(s_logits, e_logits, strict=True)]
            candidates.extend(zip(scores, s_logits, e_logits, offsets[s_best, 0].tolist(),
                                  offsets[e_best, 1].tolist(), strict=True))
        candidates.sort(key=lambda c: c[0], reverse=True)  # stable: ties keep window/token order

        entries: list[dict[str, Any]] = []
        seen: set[str] = set()
        for _, s_logit, e_logit, char_start, char_end in candidates:
            text = example.context[char_start:char_end]
            if text in seen:
                continue
            seen.add(text)
            entries.append({"text": text, "start_logit": s_logit, "end_logit": e_logit})
            if len(entries) == n_best_size:
                break
        if not entries:
            entries.append({"text": "", "start_logit": 0.0, "end_logit": 0.0})
        scores = np.array([e["start_logit"] + e["end_logit"] for e in entries], dtype=np.float64)
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        nbest[example.qid] = [{"text": e["text"], "probability": float(p), "start_logit": e["start_logit"],
                               "end_logit": e["end_logit"]} for e, p in zip(entries, probs, strict=True)]
        predictions[example.qid] = entries[0]["text"]
    return predictions, nbest

