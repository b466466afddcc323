"""Method comparisons: a YAML file of one setting and its methods (config.py), run stage by stage into a
results folder (runner.py), and reported from the runs' own artifacts (report.py)."""
