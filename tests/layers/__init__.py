# A package, so multi-rank workers import these test modules as tests.layers.test_x.
