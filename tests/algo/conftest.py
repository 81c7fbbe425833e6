import pytest
import torch


@pytest.fixture
def float64_default():
    """Exact numbers in float64 (modules opt in with pytestmark); the global default is restored so
    other test modules are unaffected."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
