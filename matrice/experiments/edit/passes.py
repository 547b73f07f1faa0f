"""A fact's scored passes under output-weight edits, stored in a memo so a sweep recomputes only the
passes whose edit changed.

Editing (and its λ sweep) scores one fixed list of encodings per fact: once unedited, then once
under each method's edit. The batches of a pass are fixed by its encodings and batch size, so a pass
is a pure function of (encodings, batch size, the edit, the model, the code): stored under a hash of
those (:class:`matrice.memo.Memo`), a read-back pass is bit-identical to a recomputed one. A τ sweep
moves MATRICE's neurons (and the baselines matched to them), not AMIG's or the unedited model's:
those passes are read back.

An edit is built only by :func:`erasure_edit` and :func:`update_edit`, which key it by exactly the
values its vectors are computed from: the memo's code fingerprint covers this module and what it
imports, not the experiment code that calls it.

The unedited pass runs only when some edit must be computed, and then it is recorded, so each edited
pass replays the unedited blocks below its lowest edited layer (:mod:`matrice.models.replay`). An
edit changes FFN weights, never the LM head: each pass runs the body only, and the head runs once
over the rows of all of them (a large vocabulary's head is the costliest matmul per row, and it
runs faster per row on many rows than on one pass's few).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping, Sequence, TypeVar

import numpy as np
import torch

from matrice.interventions import edited_output_weights, erasure_vectors, update_vectors
from matrice.memo import Memo
from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.edit_rows import output_deltas, per_row_output_deltas
from matrice.models.predict import AnswerScore, scores_from_hidden, target_hidden, target_hidden_copies
from matrice.models.replay import recorded_blocks, replayed_below

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class WeightEdit:
    """One edit of neurons' output vectors: the neurons, the vectors (built only when the pass runs)
    and everything besides the neurons that the vectors depend on (the memo key)."""

    pairs: np.ndarray
    vectors: Callable[[], Any]
    key: Mapping[str, Any]


def lowest_layer(edit: WeightEdit) -> int:
    """The lowest layer an edit touches: every block below it computes what it computes unedited."""
    return int(edit.pairs[:, 0].min())


def erasure_edit(adapter: ModelAdapter, pairs: np.ndarray) -> WeightEdit:
    """Erasure of ``pairs``' output vectors (they depend on nothing but the neurons)."""
    return WeightEdit(pairs, lambda: erasure_vectors(adapter, pairs), {"operation": "erasure"})


def update_edit(adapter: ModelAdapter, pairs: np.ndarray, gold: Any, new: Any, lambda1: float, lambda2: float,
                scaling: str) -> WeightEdit:
    """The update edit of ``pairs`` from the gold object's tokens to the new one's (Eq. 15)."""
    return WeightEdit(pairs, lambda: update_vectors(adapter, pairs, gold, new, lambda1, lambda2, scaling),
                      {"operation": "update", "gold_token": gold, "new_token": new, "lambda1": lambda1,
                       "lambda2": lambda2, "scaling": scaling})


class EditedPasses:
    """Scores of one list of encodings unedited and under several edits, through the memo when given.
    ``edits_per_pass`` > 1: up to that many edits' passes run as one, each batch's rows repeated per
    edit and each copy adding its own edit (:mod:`matrice.models.edit_rows`) instead of the weights
    being edited, so a device that needs many rows per matmul gets them; 1 edits the weights."""

    def __init__(self, adapter: ModelAdapter, batch_size: int, memo: Memo | None, kind: str,
                 edits_per_pass: int = 1) -> None:
        if edits_per_pass < 1:
            raise ValueError(f"edits_per_pass must be >= 1, got {edits_per_pass}")
        self.adapter, self.batch_size, self.memo, self.kind = adapter, batch_size, memo, kind
        self.edits_per_pass = edits_per_pass

    def hidden(self, encodings: list[Encoded]) -> torch.Tensor:
        # the same batches and forward calls for every pass, so an edited pass can replay the unedited
        # blocks below its edit (their cache entries for a shared demonstration prefix included)
        return target_hidden(self.adapter, encodings, batch_size=self.batch_size)

    def run(self, scored: list[Encoded], edits: Mapping[K, WeightEdit]
            ) -> tuple[list[AnswerScore], dict[K, list[AnswerScore]]]:
        """(the unedited scores, {name: the scores under that edit}); every edit must have neurons."""
        keys = {name: self.key(scored, {"pairs": e.pairs, **e.key}) for name, e in edits.items()}
        after = {name: self.load(k) for name, k in keys.items()}
        base_key = self.key(scored, None)
        before = self.load(base_key)
        missing = [name for name, s in after.items() if s is None]
        if not missing and before is not None:
            return before, after
        with recorded_blocks(self.adapter) as unedited_blocks:
            hidden = [self.hidden(scored)]
        if self.edits_per_pass > 1:
            missing.sort(key=lambda name: lowest_layer(edits[name]))  # a group replays below its lowest edit
        for start in range(0, len(missing), self.edits_per_pass):
            hidden += self.edited_hidden(scored, [edits[name] for name in missing[start : start + self.edits_per_pass]],
                                         unedited_blocks)
        # the head (no edit reaches it) once over every pass's rows
        scores = scores_from_hidden(self.adapter, torch.cat(hidden), list(scored) * len(hidden))
        n = len(scored)
        before = scores[:n]
        self.store(base_key, before)
        for k, name in enumerate(missing, start=1):
            after[name] = scores[k * n : (k + 1) * n]
            self.store(keys[name], after[name])
        return before, after

    def edited_hidden(self, scored: list[Encoded], group: list[WeightEdit], unedited_blocks) -> list[torch.Tensor]:
        """The head inputs under each edit of ``group``: one edit on the weights, several as rows."""
        low = min(lowest_layer(edit) for edit in group)
        if self.edits_per_pass == 1:
            with edited_output_weights(self.adapter, group[0].vectors()), \
                    replayed_below(self.adapter, unedited_blocks, low):
                return [self.hidden(scored)]
        deltas = [output_deltas(self.adapter, edit.vectors()) for edit in group]
        with per_row_output_deltas(self.adapter, deltas) as rows, \
                replayed_below(self.adapter, unedited_blocks, low, copies=len(group)):
            return list(target_hidden_copies(self.adapter, scored, len(group), rows.set, batch_size=self.batch_size))

    def key(self, scored: list[Encoded], edit: Mapping[str, Any] | None) -> str | None:
        if self.memo is None:
            return None
        # an edit's rounding as rows differs from editing the weights (the unedited pass is the same)
        rows = {} if self.edits_per_pass == 1 or edit is None else {"edits_per_pass": self.edits_per_pass}
        return self.memo.key(kind=self.kind, scored=scored, batch_size=self.batch_size, edit=edit, **rows)

    def load(self, key: str | None) -> list[AnswerScore] | None:
        stored = None if key is None else self.memo.load(key)
        return None if stored is None else [AnswerScore(float(p), int(r), int(t)) for p, r, t in stored]

    def store(self, key: str | None, scores: Sequence[AnswerScore]) -> None:
        if key is not None:
            self.memo.store(key, [[s.prob, s.rank, s.top_token] for s in scores])
