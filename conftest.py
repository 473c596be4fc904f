"""Test selection shared by the whole repository: the ``slow`` marker for the fast command.

``python -m pytest -n 2 -q -m "not slow"`` skips what is listed here (whole end-to-end runs, several
processes or devices, cross-framework trajectories, XLA-heavy references); the full command runs
everything. Listed by module or test name so each test file keeps its own contents.
"""

from __future__ import annotations

import pytest

# modules whose every test trains models end to end, spawns processes or compiles many XLA programs
SLOW_MODULES = {
    "tests/test_demo.py",
    "tests/adapters/test_jax_multidevice.py",
    "tests/adapters/test_torch_ddp.py",
    "tests/adapters/test_parity_features.py",
    "tests/adapters/test_parity_torch_jax.py",
    "tests/adapters/test_parity_singd.py",
    "tests/adapters/test_checkpoint_attention.py",
    "tests/test_reliability_checkpoint.py",
    "tests/testing/test_curvature_blocks_jax.py",
    "tests/testing/test_adapters_check.py",
    "tests/zoo/test_zoo_torch.py",
    "tests/zoo/test_zoo_jax.py",
}
# single tests (name prefixes) that take tens of seconds
SLOW_TESTS = (
    "tests/test_verify_cli.py::test_verify_cli_healthy_install",
    "tests/adapters/test_jax_capture.py::test_nnx_capture_and_optimizer",
    "tests/adapters/test_jax_capture.py::test_equinox_capture_and_layout",
    "tests/adapters/test_jax_capture.py::test_linen_capture_matches_gradients",
    "tests/adapters/test_jax_transform.py::test_kfac_loss_average_and_reduction_factor_per_update",
    "tests/adapters/test_jax_transform.py::test_jit_equals_eager",
    "tests/adapters/test_jax_singd.py::test_axis_name_equals_single_device_on_the_union",
    "tests/test_reliability_nonfinite.py::test_long_run_with_nan_batches_equals_the_clean_run",
    "tests/test_reliability_fuzz.py::test_jax_update_with_malformed_inputs",
    "tests/testing/test_cli_and_docs.py::test_adapter_testing_docstring_examples",
    "tests/adapters/test_jax_attention.py::test_nnx_value_mean_and_update_equal_core[reference",
    "tests/adapters/test_jax_attention.py::test_equinox_value_mean_and_update_equal_core[reference-causal]",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        nodeid = item.nodeid
        module = nodeid.split("::", 1)[0]
        if module in SLOW_MODULES or nodeid.startswith(SLOW_TESTS):
            item.add_marker(pytest.mark.slow)
