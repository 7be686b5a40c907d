"""Test harness: generated data sets and images in the real on-disk formats, and the chaos
checks (kill and signal a trainer at every pause point). No part of the library."""
