"""A snapshot of the seeded tiny model's outputs: catches silent architecture or initialisation drift.

The values were recorded from this code with torch 2.13 on CPU. A deliberate change of the architecture, the
initialisation or the parameter layout must update them (and say why in the commit); an accidental one fails here
even when every shape test still passes. The tolerance absorbs float summation-order differences between CPUs.
"""

from __future__ import annotations

import hashlib

import torch

from imas_train.config import ModelConfig
from imas_train.models import build_model

POSITIONS = [(0, 0, 0, 0), (0, 1, 32, 48), (1, 2, 64, 96), (1, 0, 10, 80), (0, 2, 50, 5), (1, 1, 33, 33)]
LOGITS = [0.0671426, -0.0510753, 0.1807797, 0.0681939, 0.1745633, -0.0469639]
AUX = [-0.0411155, 0.1816848, -0.1025381, -0.0174513, -0.2277787, 0.1793937]
MEAN, STD, AUX_ABS_MEAN = 0.0627649, 0.08944469, 0.14491236
NUM_TENSORS, NUM_PARAMETERS = 179, 1_088_782
LAYOUT_SHA256 = "273494dca0774b7eb720473ebfbfae8c865344a388e24d4d04e4058fbd2414e9"  # sorted "name:shape" lines


def test_tiny_model_outputs_match_the_snapshot(tiny_model_cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg).eval()
    state = model.state_dict()
    layout = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(state.items()))
    assert (len(state), sum(p.numel() for p in model.parameters())) == (NUM_TENSORS, NUM_PARAMETERS)
    assert hashlib.sha256(layout.encode()).hexdigest() == LAYOUT_SHA256
    x = torch.randn(2, 3, 65, 97, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, aux = model.forward_with_aux(x)
        plain = model(x)
    assert torch.equal(plain, logits)  # forward() is the main head of forward_with_aux
    got = torch.tensor([logits[p].item() for p in POSITIONS], dtype=torch.float64)
    got_aux = torch.tensor([aux[p].item() for p in POSITIONS], dtype=torch.float64)
    torch.testing.assert_close(got, torch.tensor(LOGITS, dtype=torch.float64), rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(got_aux, torch.tensor(AUX, dtype=torch.float64), rtol=1e-4, atol=2e-6)
    stats = [logits.double().mean().item(), logits.double().std().item(), aux.double().abs().mean().item()]
    torch.testing.assert_close(torch.tensor(stats), torch.tensor([MEAN, STD, AUX_ABS_MEAN]), rtol=1e-4, atol=1e-6)
