# A package, so multi-rank workers import these test modules as tests.integrations.test_x.
