"""What a run's results show: the judged claims, the report document and its verdict file."""
