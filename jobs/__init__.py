"""Thin Hydra entry points: compose the config, build typed settings, call one library function."""
