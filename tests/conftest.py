import numpy as np
import openmm.app as app
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def aldp():
    from openmm_cgflow.systems import alanine_dipeptide

    return alanine_dipeptide()


@pytest.fixture(scope="session")
def mb():
    from openmm_cgflow.systems import mueller_brown

    return mueller_brown()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
