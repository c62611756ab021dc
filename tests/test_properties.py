"""Property tests: random shapes and random packed lengths, kernel against the reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import BACKENDS
from test_kernels import FORMS, check_layer


@pytest.mark.parametrize("backend", BACKENDS)    # a parameter, not a fixture: hypothesis reruns it
@settings(max_examples=25, deadline=None)
@given(
    form=st.sampled_from(FORMS),
    lengths=st.lists(st.integers(1, 7), min_size=1, max_size=4).map(lambda ls: sorted(ls)[::-1]),
    input_size=st.integers(1, 5),
    hidden_size=st.integers(1, 6),
    reverse=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_shape_matches_reference(backend, form, lengths, input_size, hidden_size, reverse,
                                     bias, seed):
    family, options = form
    if options.get("proj", 0) >= hidden_size:
        options = {k: v for k, v in options.items() if k != "proj"}
    check_layer(family, options, lengths, input_size, hidden_size, torch.float64, backend,
                reverse, seed, bias=bias)
