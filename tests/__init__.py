# A package, so that worker processes of tests/multirank.py can import test
# modules by their qualified name (tests.test_x) from the repository root.
