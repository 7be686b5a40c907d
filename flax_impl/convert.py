"""torch state_dicts <-> flax_impl variables: the public names of the mapping.

    from flax_impl.convert import torch_to_flax, flax_to_torch
    variables = torch_to_flax(torchvision.models.resnet50().state_dict())
    state_dict = flax_to_torch(variables)   # NumPy arrays; torch.from_numpy makes tensors

The mapping itself lives in `crossing.weights` (NumPy only, shared with torch_ref's reader of
flax_impl checkpoints and with the parity tests); this module gives it the names flax_impl's users
import. Neither function imports torch.
"""

from crossing.weights import flax_to_torch, torch_to_flax

__all__ = ["flax_to_torch", "torch_to_flax"]
