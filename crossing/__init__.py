"""Where the two stacks meet: a checkpoint of one used by the other.

- `weights`: torch state_dicts <-> flax_impl variables, in NumPy (names and layouts).
- `checkpoints`: either stack's checkpoint read as NumPy (torch's or Orbax's reader; neither
  stack is imported), and `read_other_stack`, the branch predict, --eval-only, the ONNX export
  and the demo take for the other stack's checkpoint.

It sits beside `demo/` and `parity_tests/`, above both stacks in what it knows, but it imports
neither: torch_ref and flax_impl import it (lazily, for a foreign checkpoint), never each other.
"""
