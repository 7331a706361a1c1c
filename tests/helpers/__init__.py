"""Helpers shared by the tests: builders, tiny models, the CLI runner and the probes subprocess runs load by class_path."""
