"""Results: merging shard results (``merge``), the end of a run (``run``), run reports
(``report``), sweep reports (``sweeps``) and run progress (``status``)."""
