"""A pytest plugin (`-p native_for_avx2`, with tests/ on PYTHONPATH): the native kernels built
for an AVX2 CPU without AVX-512 (-march=haswell) replace this machine's build before any test
runs, so the narrower code paths (16 vector registers, 8-float vectors) run the same checks.
Used by test_native.py::test_avx2_build_matches_reference in a subprocess."""

from lstmkit.kernels import native

native._state.update({"tried": True, "module": native._compile(march="haswell"),
                      "reason": None})


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"native build in use: {native.module().__name__}")
