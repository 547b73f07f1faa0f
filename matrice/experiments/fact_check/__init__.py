"""Fact checking with degenerate knowledge neurons (AMIG), against the model's own probability.

AMIG's claim: the degenerate knowledge neurons (DKNs) of a relation tell a false statement from a true
one better than the model does. Their detector (heng840/AMIG, ``hallucination_detection``) attributes
P(object | prompt) to the relation's DKNs with integrated gradients and flags the statement as false
when the mean attribution is below a fixed threshold; the DKNs come from the relation's *training*
facts (an 80/20 split), so the detector never sees the tested fact's label.

Here, for every attributed fact and language:

- **statements**: the fact's held-out paraphrase (a template selection never attributed) with the true
  object, and with a false object: the object of another fact of the same relation in that language
  (seeded), whose first token differs from the true one's (every score here reads the first answer
  token, so a shared first token would make the two statements the same question);
- **neurons** (``neuron_source``): ``relation`` (default, AMIG's design) takes the degenerate groups and
  the LAKNs of the *other* attributed facts of the relation, so nothing the detector uses was found
  with the tested fact's object; ``fact`` takes the fact's own (found with its true object: an upper
  bound that leaks the label);
- **detectors**, each a score that should be higher for the true statement:
  ``dkn_attribution`` the mean integrated-gradients attribution of P(object) to the DKNs (AMIG; the
  run's SAIG baselines, steps and integration; only the DKNs' layers are integrated),
  ``kn_activation`` the mean activation of the relation's LAKNs at the object's last token of the filled
  statement (plain knowledge-neuron activation: at the answer position a causal model has not seen the
  object yet, so its activations there cannot tell the statements apart), and
  ``probability`` P(object's first token | prompt), the model alone;
- **decision**: a statement is flagged false when its score is below a threshold chosen on the *other*
  facts' statements (leave-one-fact-out, the threshold that maximises F1 there), never on its own;
- **metrics**: precision, recall and F1 of flagging false statements, per language and pooled, with
  95% intervals from resampling facts (`matrice.evaluation.stats.cluster_statistic`), and the threshold-free
  share of (fact, language) pairs whose true statement scores above its false one.

A detector without neurons for a fact (no DKN in its relation's other facts) abstains there; the
comparison with the probability baseline uses only the statements every detector scores.
"""

from matrice.experiments.fact_check.detectors import (  # noqa: F401 (the experiment's API)
    DETECTORS, NEURON_SOURCES, DetectorNeurons, Statement, activation_scores, attribution_scores, build_statements,
    degenerate_neurons, detector_neurons, held_out_queries, layer_attributions, probability_scores, statement_input,
)
from matrice.experiments.fact_check.evaluation import (  # noqa: F401
    NAMES, DetectionScores, best_threshold, detection_scores, f1_difference, f1_difference_by_relation,
    fact_check_claims, fact_counts, leave_one_fact_out, metrics, pair_accuracy, section, summarise, summary_json, table,
    write_outputs,
)
from matrice.experiments.fact_check.run import FactCheckRun, check_facts  # noqa: F401
