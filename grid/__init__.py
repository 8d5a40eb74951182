"""clfgrid: the LLM-vs-encoder text classification grid on Ray.

Data flows one way: grid config -> cells (grid.plan) -> jobs on Ray (grid.execute, workers/) ->
parquet in the results store (grid.store) -> scores (grid.metrics) -> reports (grid.report).
"""
