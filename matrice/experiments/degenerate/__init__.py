"""Degenerate knowledge neurons (AMIG, "Journey to the Center of the Knowledge Neurons"): neurons
that each store a fact redundantly, so suppressing any one leaves the answer while suppressing them
together removes it.

Definition (AMIG's, thresholds are params): within a fact's neuron set, a group G is *degenerate*
on a query when every member suppressed alone keeps P(answer) ≥ ``t_high``·P₀, while suppressing all
of G drops it below ``t_low``·P₀ (P₀: the unedited probability). Suppression is the manipulation
experiment's (activation ×0 at the answer position).

Search, not exponential (AMIG enumerates all 2^n subsets):
1. the ``max_candidates`` members with the highest scores; each suppressed alone (n edits); the
   *harmless* ones pass ``t_high``;
2. **pairs**: every pair of harmless members (n²/2 edits, all in one batched call);
3. **larger groups**: greedy growth from the harmless members that are in no degenerate pair: add the
   member whose addition lowers P most, until P < ``t_low``·P₀ (found) or ``max_group`` members; a
   found group is kept only if it is minimal (dropping any member lifts P back above ``t_low``·P₀).
Candidate suppressions are batched (:class:`Suppressor`): a query's prompt runs once, then every
candidate group is one row of a forward over the answer token only.

A group found on the search query is *verified* on another query of the fact (a held-out
paraphrase): each member alone still harmless and the group still below ``t_low``·P₀ there.
"""

from matrice.experiments.degenerate.evaluation import (  # noqa: F401 (the experiment's API)
    degenerate_plot_rows, degenerate_tables, section, summarise, write_outputs,
)
from matrice.experiments.degenerate.search import (  # noqa: F401
    DegenerateConfig, DegenerateRecord, GroupSearch, Request, Suppressor, fact_queries, find_degenerate, run_lockstep,
    search_fact, search_facts, search_steps, verify, verify_steps,
)
