# A package, so multi-rank workers import these test modules as tests.training.test_x.
