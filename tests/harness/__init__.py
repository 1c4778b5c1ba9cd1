# A package, so multi-rank workers import these test modules as tests.harness.test_x.
