"""Ray pipelines for recursive GPTs: training stages, the stage DAG, sweeps and checkpoint storage."""
