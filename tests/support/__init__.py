"""What the tests and the benchmarks share. No test module imports another: they import from here."""
