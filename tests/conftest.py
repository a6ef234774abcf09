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
