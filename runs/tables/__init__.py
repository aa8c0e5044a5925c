"""The paper's Table 1 and Table 2 on the toy world, as one resumable command (`run_tables.py`).

plan.py (settings and jobs) -> jobs.py (runs them as child processes) -> stage.py (one job) ->
report.py (summary.json, docs/TABLES.md, figures); paper.py holds the paper's numbers.
"""
