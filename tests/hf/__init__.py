# A package, so multi-rank workers import these test modules as tests.hf.test_x.
