"""Cross-lingual knowledge editing through the neurons' output weights (paper §IV-F, Tables III, IV).

For each fact and method, with the edit made once "in English" and evaluated in every language:

- **erasure**: every neuron's output vector (its column of the FFN output projection; row of GPT-2's
  Conv1D) is set to 0;
- **update**: it is set to ``W − λ1·E(o) + λ2·E(o')`` where E is the unembedding row of the first
  answer token of the object in English (Eq. 15 with raw λ, as Dai et al.'s code adds raw
  embeddings; λ1 = λ2 = 1 by default). ``scaling="column_norm"`` is our option: λk' = λk·‖W‖/‖E‖,
  so each term has norm λk·‖W‖ (see :func:`matrice.interventions.update_vectors`).

Metrics per (method, operation, language), micro-averaged over queries:

- **reliability** on the fact's original query of the language (lowest template id, i.e. template 0);
- **generality** on its other paraphrases in that language, and **held-out generality** on those of
  them selection never saw (the held-out split's paraphrases: ``held_*``);
- **locality** on the original queries of ``locality_k`` other facts (seeded sample per edited fact):
  success when the top-1 token is the same as before the edit.

Success for erasure: the gold first token is no longer top-1 (rank > 0). With ``erasure_known_only``
(default) only queries whose gold first token *was* top-1 before the edit are scored (others are
counted in ``n_unknown``): erasing knowledge the model never expressed would count as success for
free. Success for update: the new object's first token is top-1, where the new object is tokenised
*in that language and in the query's context* (the query re-encoded with o's label replaced by o''s
label in that language; for masked models that also sets the number of [MASK] tokens to o''s length).

Choices where the paper is silent:
- E(o), E(o'): the first answer token of the English original query *as encoded in context* (what
  the target position predicts and what reliability scores). For masked models and whenever the
  context/answer boundary merges this is ``encoding.answer_ids_alone``; for causal models it is the
  first token of the answer as it follows the prompt (Llama's SentencePiece can tokenise a lone
  " Paris" differently).
- o' is the English object of another fact of the same relation whose English label differs and
  whose first token differs from o's; one is drawn per fact with ``experiment_rng(seed, "new_object",
  fact_id)`` and shared by all methods. A fact with no such candidate is not updated (counted).
  Its labels in other languages come from that fact's queries; a language without one is skipped
  for the update (counted), and so is a query where o' starts with o's first token in that
  language's context (there "o' is top-1" would only mean the gold answer still is; counted as
  ``update_queries_same_first_token``).
- A fact with an empty neuron set is evaluated as a no-op edit (counted per method), not dropped.
- Unrelated facts for locality: any other fact (any relation).
"""

from matrice.experiments.edit.evaluation import (  # noqa: F401 (the experiment's API)
    editing_claims, editing_estimates, editing_interval_tables, scaling_text, section, write_outputs,
)
from matrice.experiments.edit.run import (  # noqa: F401
    OPERATIONS, EditConfig, EditRecord, EditResult, edit_facts, summarise_edits,
)
