"""The Gradio demo: ``python -m demo --workdir RUN [--port N] [--host ADDR]``.

Upload an image (or click one of the test-set examples): the page shows the top-5 classes from
torch_ref and from flax_impl side by side, computed from the same weights (the run's checkpoint,
converted for the other stack), the largest difference between their logits (a live parity
check), and the run's recipe and best test accuracy from its record. It runs offline (no
analytics, no share link) and listens on 127.0.0.1 unless --host says otherwise. `app.py` at the
repository's root starts it for a Hugging Face Space.
"""

from demo.app import build, main

__all__ = ["build", "main"]
