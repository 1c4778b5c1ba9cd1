# A package, so that worker processes of tests/multirank.py can import test
# modules by their qualified name (tests.test_x, tests.layers.test_y) from the repository root.
