"""The benchmark (bench/run.py) and its parts; not part of the installed package."""
