"""Commands beside the pipeline's scripts, each run from the checkout's root as `python -m tools.NAME --help`."""
