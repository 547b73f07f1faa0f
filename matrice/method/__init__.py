"""The MATRICE method (the paper's section III): attribution engines (`attribution/`), uncertainty
across queries and languages (`uncertainty`), the per-fact scores (`scores`) and neuron selection
(`selection`)."""
