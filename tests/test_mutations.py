"""The mutation check: each deliberate bug in tests/mutants.py must make a test fail.

A suite that still passes with augmentation replaced by the identity, labels by zeros, the
patient table ignored or x and y swapped in the annotation reader cannot catch those bugs.
Each case runs the tests that guard the feature in a fresh pytest process with the mutation
applied (in the test process and in every Dask worker) and requires at least one real test
failure -- an assertion failure, not a setup error or a crash.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# mutation -> the tests that must catch it
GUARDS = {
    "augment-identity": ["test_augment.py"],
    "labels-zero": ["test_dataset.py", "-k", "fraction_rule"],
    "patients-ignored": ["test_dataset.py", "-k", "straddle or chestxray"],
    "reader-xy-swap": ["test_dataset.py", "-k", "independent_reference"],
}


def test_every_mutation_has_a_guard():
    sys.path.insert(0, str(TESTS))
    try:
        import mutants
    finally:
        sys.path.remove(str(TESTS))
    assert set(GUARDS) == set(mutants.MUTATIONS)


@pytest.mark.slow
@pytest.mark.parametrize("mutation", sorted(GUARDS))
def test_mutation_makes_a_test_fail(mutation, tmp_path):
    report = tmp_path / "report.xml"
    env = {**os.environ, "HPCPATH_MUTATION": mutation,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
           "DASK_DISTRIBUTED__WORKER__PRELOAD": f'["{TESTS / "mutants.py"}"]',
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "mutants", "-p", "no:cacheprovider", "-q",
         "-x", f"--junitxml={report}", f"--basetemp={tmp_path / 'tmp'}", *GUARDS[mutation]],
        cwd=TESTS, env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert report.exists(), tail
    suite = ET.parse(report).getroot().find("testsuite")
    failures, errors = int(suite.get("failures")), int(suite.get("errors"))
    assert proc.returncode == 1 and failures >= 1, f"{mutation} went unnoticed:\n{tail}"
    assert errors == 0, f"{mutation}: errors, not test failures:\n{tail}"
