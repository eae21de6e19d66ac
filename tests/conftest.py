"""Makes tests/reference.py, the examples and the benchmarks importable from the tests."""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "examples"))
# the benchmark scripts import their shared harness as a top-level module, as
# they do when run as scripts from benchmarks/
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "benchmarks"))
