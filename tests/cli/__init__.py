# A package, so multi-rank workers import these test modules as tests.cli.test_x.
