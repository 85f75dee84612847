"""The test suite, a package so that benchmarks can import `tests.helpers`."""
