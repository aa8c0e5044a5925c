"""`run_lifelong.py`: LiveEdit at 1,000 sequential edits on the version-4 toy world, several training seeds."""
