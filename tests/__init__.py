"""jax_mla tests. A package so that the test modules can import the shared
helpers from conftest under pytest's importlib import mode."""
