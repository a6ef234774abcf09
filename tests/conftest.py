import os

# One torch thread throughout the tests (and their subprocesses): small tensors, shared cores, and exact
# repeatability (the package's measured thread choice, openmm_cgflow.threads.ThreadTuner, is off when
# OMP_NUM_THREADS is set; tests/test_threads.py tests the tuner itself).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import openmm.app as app
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def aldp():
    from openmm_cgflow import builtin

    return builtin("alanine-dipeptide")


@pytest.fixture(scope="session")
def mb():
    from openmm_cgflow import builtin

    return builtin("mueller-brown")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
