"""Code for tests and benchmarks only (a simulated teacher); nothing at run time imports it."""
