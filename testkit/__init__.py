"""Test harness: generated data sets and images in the real on-disk formats, and the chaos
checks (kill and signal a trainer at every pause point). No part of the library."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # the checkout the tests run
STACKS = ["torch_ref", "flax_impl"]  # the two stacks, as the tests parametrize over them
