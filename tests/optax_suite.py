"""optax's own Muon test suite, run on ``orthax.contrib.muon``.

Not collected by pytest (it takes minutes, and ``tests/test_contrib.py``
compares the two directly, keyword by keyword); run it by hand:

  .venv/bin/python tests/optax_suite.py

It imports the test module that ships with optax (``optax/contrib/
_muon_test.py``), points its ``_muon.muon`` at ``orthax.contrib.muon`` (the
one-line port a user makes) and runs every test case. The complex-valued
cases fail by design, with orthax's ``TypeError`` naming the leaf: orthax
is real-valued.
"""

from __future__ import annotations

import sys
import unittest

from optax.contrib import _muon

import orthax.contrib


def main() -> int:
  _muon.muon = orthax.contrib.muon
  from optax.contrib import _muon_test  # pylint: disable=g-import-not-at-top
  suite = unittest.defaultTestLoader.loadTestsFromTestCase(_muon_test.MuonTest)
  result = unittest.TextTestRunner(verbosity=0).run(suite)
  failed = result.failures + result.errors
  complex_only = all("complex" in test.id() for test, _ in failed)
  print(f"optax's Muon suite on orthax.contrib.muon: {result.testsRun} run, "
        f"{result.testsRun - len(failed)} passed, {len(failed)} failed"
        + (" (all complex-valued)" if failed and complex_only else ""))
  for test, trace in failed:
    print(f"  {test.id()}: {trace.strip().splitlines()[-1][:160]}")
  return 0 if complex_only else 1


if __name__ == "__main__":
  sys.exit(main())
