"""What a run's results show: statistics and the verdict rule (`stats`), how a claim is computed and
judged (`claims`), tables, figures and one model's results as the report reads them (`report`), and
the report document with its verdict file (`document`)."""
