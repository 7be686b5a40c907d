"""Cross-framework proofs that torch_ref and flax_impl compute the same thing (the parity
contract, parity_tests/README.md), run on a CPU. `checks` measures, the tests hold the
measurements to bounds, and `python -m parity_tests.report` prints them and writes PARITY.md."""
