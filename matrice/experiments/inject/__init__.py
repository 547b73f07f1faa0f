"""New-knowledge injection by fine-tuning (paper §IV-H, Table V): the runs
(:mod:`~matrice.experiments.inject.training`, whose docstring states the design), what is injected and
checked (:mod:`~matrice.experiments.inject.units`: units, Q_old and its halves) and their evaluation
(:mod:`~matrice.experiments.inject.evaluation`: claims, tables, outputs, report section)."""

from matrice.experiments.inject.evaluation import (  # noqa: F401 (the experiment's API)
    INJECT_NAMES, injection_accuracy, injection_claims, injection_estimates, injection_interval_table, section,
    write_outputs,
)
from matrice.experiments.inject.training import (  # noqa: F401
    DEFAULT_VARIANTS, InjectConfig, InjectionRecord, InjectionResult, Unit, choose_units, inject_knowledge,
    train_variant, union_neurons,
)
