"""Results: reading results.csv (read_results), metrics and scores, the aggregate command
(``python -m mchad.results.aggregate``), its tables, provenance check and plots."""
