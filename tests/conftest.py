"""Makes tests/reference.py, the examples and the benchmarks importable from the tests."""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))

# JAX's persistent compilation cache, shared by both pytest-xdist workers and
# the 8-device subprocesses (they inherit the environment): many tests compile
# programs that other tests already compiled (the example's runs, the
# parametrized cases). A cached executable is the one XLA would compile again,
# so results are the same bits; its key holds the program, the flags, the
# device count and the versions. It lives in .pytest_cache (not in git), so a
# clean clone starts empty; at 1 GiB the least recently used entries go. Set
# before JAX is imported; an outer setting wins.
for _name, _value in (
    ("JAX_COMPILATION_CACHE_DIR",
     os.path.join(os.path.dirname(_HERE), ".pytest_cache", "jax")),
    ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0"),
    ("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0"),
    ("JAX_COMPILATION_CACHE_MAX_SIZE", str(2**30))):  # least recently used go
  os.environ.setdefault(_name, _value)
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "examples"))
# the benchmark scripts import their shared harness as a top-level module, as
# they do when run as scripts from benchmarks/
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "benchmarks"))

# Tests that take 20 s to 3 min on 2 CPU cores (measured with --durations,
# 2026-11-26): run first, so that pytest-xdist, which hands out the first
# quarter of the tests one at a time to each worker in turn, spreads them over
# both workers instead of leaving one of them to finish the last few alone.
_LONG = ("test_sharded.py::test_on_8_devices", "test_training.py::",
         "test_train_gpt2.py::test_every_optimizer_trains_and_reports",
         "test_train_gpt2.py::test_resume_continues_exactly",
         "test_train_gpt2.py::test_notebook_runs",
         "test_train_gpt2.py::test_eight_devices_match_one",
         "test_benchmarks.py::", "test_dion.py::test_sharded_equals_unsharded",
         "test_qk_clip.py::test_example_clips_heads_onto_threshold",
         "test_device_bench.py::test_optimizer_step_part",
         "test_device_bench.py::test_newton_schulz_part",
         "test_device_bench.py::test_training_part",
         "test_device_bench.py::test_tiles_part",
         "test_mixed_precision.py::test_bfloat16_muon_trains_as_float32")


def pytest_collection_modifyitems(config, items):
  del config  # unused
  items.sort(key=lambda item: not any(name in item.nodeid for name in _LONG))
