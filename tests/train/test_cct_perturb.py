"""CCT's pure math (shared/methods/CCT.md §7 oracles 1-8 and 11) on tiny CPU tensors."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imas_train.cct import (
    abce_tau,
    annealed_bootstrap_ce,
    context_masking,
    feature_drop,
    feature_noise,
    foreground,
    guided_cutout,
    guided_cutout_mask,
    object_masking,
    softmax_mse,
    spatial_dropout,
    unsup_weight,
    vat_perturbation,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_ramp_starts_at_e_minus_5_and_reaches_the_weight() -> None:
    """Oracle 1: w_u(0) = 30·e^-5 = 0.2021, w_u(t >= T_r) = 30, monotone in between; T_r = 0 is the port's
    constant weight."""
    assert unsup_weight(0, 800) == pytest.approx(30 * math.exp(-5)) and round(unsup_weight(0, 800), 4) == 0.2021
    assert unsup_weight(800, 800) == unsup_weight(5000, 800) == 30.0
    values = [unsup_weight(t, 800) for t in range(0, 801, 25)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False))
    assert unsup_weight(0, 0) == unsup_weight(123, 0) == 30.0
    with pytest.raises(ValueError):
        unsup_weight(0, -1)


def test_softmax_mse_is_zero_at_the_target_and_needs_a_detached_target() -> None:
    """Oracle 2: MSE(softmax(o), q) = 0 when softmax(o) = q; the target must not require grad."""
    logits = torch.randn(2, 4, 5, 6, generator=_gen(), requires_grad=True)
    q = logits.detach().softmax(dim=1)
    assert float(softmax_mse(logits, q).detach()) == pytest.approx(0.0, abs=1e-12)
    other = torch.randn(2, 4, 5, 6, generator=_gen(1)).softmax(dim=1)
    loss = softmax_mse(logits, other)
    torch.testing.assert_close(loss, F.mse_loss(logits.softmax(1), other))  # mean over B·C·H·W
    loss.backward()
    assert logits.grad is not None and not other.requires_grad
    with pytest.raises(ValueError, match="detached"):
        softmax_mse(logits, logits.softmax(1))
    valid = torch.zeros(2, 5, 6, dtype=torch.bool)
    valid[0] = True  # the padding flag: only image 0 counts
    torch.testing.assert_close(softmax_mse(logits, other, valid), F.mse_loss(logits[:1].softmax(1), other[:1]))


def test_context_and_object_masking_partition_the_features() -> None:
    """Oracle 3: P_context(z) + P_object(z) = z for any prediction; the foreground is argmax != 0, nearest-resized."""
    z = torch.randn(3, 8, 6, 7, generator=_gen())
    labels = torch.randint(0, 4, (3, 24, 28), generator=_gen(1))
    fg = foreground(labels, z.shape[-2:])
    assert fg.shape == (3, 6, 7) and set(fg.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(fg, (labels[:, ::4, ::4] != 0).float())  # nearest from 24x28 to 6x7 picks every 4th pixel
    torch.testing.assert_close(context_masking(z, fg) + object_masking(z, fg), z, rtol=0, atol=0)
    assert torch.equal(context_masking(z, fg)[fg.unsqueeze(1).expand_as(z) == 0], torch.zeros(int((fg == 0).sum()) * 8))


def test_feature_drop_drops_the_peak_and_keeps_below_the_low_fraction() -> None:
    """Oracle 4: when max a > 0 the arg-max position is always dropped and every position with a < 0.7·max kept."""
    for seed in range(20):
        z = torch.rand(2, 5, 6, 6, generator=_gen(seed)) + 0.01  # a > 0 everywhere
        out = feature_drop(z, _gen(100 + seed))
        a = z.mean(dim=1)
        for i in range(2):
            peak = a[i].max()
            dropped = (out[i] == 0).all(dim=0)
            assert dropped.flatten()[a[i].flatten().argmax()]
            keep = a[i] < 0.7 * peak
            assert torch.equal(out[i][:, keep], z[i][:, keep])
            assert torch.equal(dropped, ~((out[i] == z[i]).all(dim=0)))  # a position is dropped whole or kept


def test_feature_noise_is_one_sample_shared_by_the_batch() -> None:
    """Oracle 5: (P(z) − z)/z is identical across the batch wherever z != 0, and within U(−0.3, 0.3)."""
    z = torch.randn(4, 3, 5, 5, generator=_gen())
    ratio = (feature_noise(z, _gen(3)) - z) / z
    for i in range(1, 4):
        torch.testing.assert_close(ratio[i], ratio[0])
    assert float(ratio.abs().max()) <= 0.3 + 1e-6 and float(ratio.std()) > 0.05


def test_spatial_dropout_zeroes_or_doubles_whole_channels() -> None:
    """Oracle 6: each channel of each sample is all-zero or exactly 2x the input."""
    z = torch.rand(4, 16, 5, 5, generator=_gen()) + 0.1
    out = spatial_dropout(z, _gen(9))
    zero = (out == 0).flatten(2).all(dim=2)
    doubled = (out == 2 * z).flatten(2).all(dim=2)
    assert bool((zero ^ doubled).all())
    assert 0 < int(zero.sum()) < zero.numel()  # both outcomes occur at p = 0.5


def _disk(h: int, w: int, cy: int, cx: int, r: int) -> Tensor:
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).long()


def test_guided_cutout_on_background_rectangle_and_disk() -> None:
    """Oracle 7: all-background leaves z unchanged; a filled rectangle (4 vertices) is never cut; a disk of radius
    60 gets ONE zeroed box of ⌊0.4·(x_max − x_min)⌋ x ⌊0.4·(y_max − y_min)⌋ pixels inside its bounding box."""
    h, w = 160, 200
    z = torch.rand(1, 4, h // 4, w // 4, generator=_gen()) + 0.1
    background = torch.zeros(1, h, w, dtype=torch.long)
    assert torch.equal(guided_cutout(z, background, _gen()), z)
    rect = background.clone()
    rect[0, 20:140, 30:170] = 2
    assert torch.equal(guided_cutout_mask(rect, _gen()), torch.ones(1, h, w))
    disk = 3 * _disk(h, w, 80, 100, 60).unsqueeze(0)
    contours, _ = cv2.findContours(disk[0].numpy().astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    assert len(contours) == 1 and len(contours[0]) > 50
    for seed in range(5):
        mask = guided_cutout_mask(disk, _gen(seed))[0]
        rows, cols = torch.nonzero(mask == 0, as_tuple=True)
        assert int(rows.numel()) == int(0.4 * 120) * int(0.4 * 120)  # x and y extents of the contour are 120
        assert int(rows.max() - rows.min()) + 1 == 48 and int(cols.max() - cols.min()) + 1 == 48  # one box
        assert int(rows.min()) >= 20 and int(rows.max()) <= 140 and int(cols.min()) >= 40 and int(cols.max()) <= 160
    positions = {tuple(torch.nonzero(guided_cutout_mask(disk, _gen(s))[0] == 0)[0].tolist()) for s in range(8)}
    assert len(positions) > 1  # the box position is drawn
    out = guided_cutout(z, disk, _gen(0))
    keep = F.interpolate(guided_cutout_mask(disk, _gen(0))[None], size=z.shape[-2:], mode="nearest")
    assert torch.equal(out, z * keep)


class _Decoder(nn.Module):
    """A tiny aux decoder: 1x1 conv + bilinear x4, accepting float64 input as `AuxDecoder.decode` does."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(6, 3, 1)

    def forward(self, z: Tensor) -> Tensor:
        w, b = self.conv.weight.to(z.dtype), self.conv.bias.to(z.dtype)
        return F.interpolate(F.conv2d(z, w, b), scale_factor=4, mode="bilinear", align_corners=True)


@pytest.mark.parametrize("autocast", [False, True])
def test_vat_perturbation_has_norm_eps_and_writes_no_gradient(autocast: bool) -> None:
    """Oracle 8: ||r||_2 = ε = 2 per sample (± 1e-6), also under bf16 autocast; the power iteration writes no
    parameter gradient and nothing flows into the encoder through it; the perturbed output does train the encoder."""
    decoder = _Decoder()
    encoder = nn.Conv2d(3, 6, 1)
    x = torch.randn(3, 3, 5, 5, generator=_gen(1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        z = encoder(x)
        r = vat_perturbation(z, decoder, _gen(2), xi=1e-6, eps=2.0)
    assert r.dtype == z.dtype and not r.requires_grad
    norms = r.double().flatten(1).norm(dim=1)
    tol = 1e-6 if not autocast else 2e-2  # bf16 storage of r rounds its elements
    torch.testing.assert_close(norms, torch.full((3,), 2.0, dtype=torch.float64), rtol=0, atol=tol)
    assert all(p.grad is None for p in [*decoder.parameters(), *encoder.parameters()])
    out = decoder((z + r).float())
    out.sum().backward()
    assert encoder.weight.grad is not None and float(encoder.weight.grad.abs().sum()) > 0


def test_vat_direction_is_the_adversarial_one() -> None:
    """The power iteration turns the random start towards the KL's steepest direction: the perturbation raises the
    divergence far more than a random direction of the same norm does."""
    decoder = _Decoder().double()
    z = torch.randn(2, 6, 5, 5, generator=_gen(4), dtype=torch.float64)
    r = vat_perturbation(z, decoder, _gen(5), eps=0.5)
    rand = torch.rand(z.shape, generator=_gen(6), dtype=torch.float64) - 0.5
    rand = 0.5 * rand / rand.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    p = decoder(z).softmax(1)

    def kl(delta: Tensor) -> float:
        with torch.no_grad():
            return float(F.kl_div(decoder(z + delta).log_softmax(1), p, reduction="batchmean"))

    assert kl(r) > 3 * kl(rand)


def test_abce_threshold_and_hardest_pixels() -> None:
    """Oracle 11: τ(0) = 1/C and the threshold is max(1/C, p_(b)); with every GT probability > 0.99 only the b
    hardest pixels remain; τ anneals to ~0.99 over T_b."""
    c = 5
    assert abce_tau(0, 400, c) == pytest.approx(1 / c)
    assert abce_tau(400, 400, c) == pytest.approx(0.2 + 0.79 * (1 - math.exp(-5)))
    assert abce_tau(10**6, 400, c) == abce_tau(400, 400, c) and abce_tau(7, 0, c) == pytest.approx(0.99)
    target = torch.randint(0, c, (2, 6, 7), generator=_gen())
    logits = torch.full((2, c, 6, 7), -4.0).scatter(1, target.unsqueeze(1), 4.0)
    logits = logits + 0.01 * torch.randn(logits.shape, generator=_gen(1))  # distinct p, all > 0.99
    p = logits.softmax(1).gather(1, target.unsqueeze(1)).squeeze(1)
    assert float(p.min()) > 0.99
    b = 2
    loss, threshold, kept = annealed_bootstrap_ce(logits, target, abce_tau(0, 400, c), min_kept=b)
    assert int(kept) == b and float(threshold) == float(p.flatten().sort().values[b])
    hardest = p.flatten().argsort()[:b]
    ce = F.cross_entropy(logits, target, reduction="none").flatten()
    torch.testing.assert_close(loss, ce[hardest].mean())
    # ignored pixels never count; with all ignored the loss is 0 with the graph kept
    ignored = torch.full_like(target, 255)
    g = logits.clone().requires_grad_(True)
    loss0, _, kept0 = annealed_bootstrap_ce(g, ignored, 0.2, 2)
    assert float(loss0.detach()) == 0.0 and int(kept0) == 0 and loss0.requires_grad
    # with τ above every GT probability every valid pixel is kept
    flat = torch.zeros(1, c, 4, 4)
    _, _, kept_hi = annealed_bootstrap_ce(flat + 0.001 * torch.randn(flat.shape, generator=_gen(2)),
                                          torch.zeros(1, 4, 4, dtype=torch.long), 0.99, 1)  # fmt: skip
    assert int(kept_hi) == 16
