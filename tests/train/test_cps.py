"""CPS (shared/methods/CPS.md): the §7 oracles on tiny networks, the forward order, and training through the loop."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

import imas_train.methods.cps as cps_module
import imas_train.train
from imas_core.errors import ConfigError
from imas_train.config import CpsConfig, LossConfig, ModelConfig, load_config
from imas_train.methods import METHODS, build_method
from imas_train.methods.base import StudentForward
from imas_train.methods.cps import (
    CpsMethod,
    cps_cutmix_step,
    cps_loss,
    cps_plain_step,
    cps_pseudo_labels,
    cps_total,
    init_head_kaiming,
    no_decay_param_groups,
)
from imas_train.mixing import mask_mix, sample_cps_boxes, toggled_box_mask
from imas_train.models import build_model
from imas_train.optim import param_groups
from tests.train.resume_helpers import killed_then_resumed
from tests.train.test_train import REPO, demo_cfg

CPS = CpsConfig(cps_weight=1.5, reference_world_size=1)
CE = LossConfig(supervised="ce")
H, W, B = 33, 41, 2


def _net(cfg: ModelConfig, seed: int) -> StudentForward:
    torch.manual_seed(seed)
    return StudentForward(build_model(cfg)).train()


def _batches(seed: int = 0) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    valid = torch.ones(B, H, W, dtype=torch.bool)
    valid[:, -4:, :] = False  # a padded bottom strip
    batch_l = {"image": torch.randn(B, 3, H, W, generator=g), "label": torch.randint(0, 3, (B, H, W), generator=g)}
    batch_u0 = {"image_w": torch.randn(B, 3, H, W, generator=g), "valid": valid}
    batch_u1 = {"image_w": torch.randn(B, 3, H, W, generator=g), "valid": valid.flip(1)}
    return batch_l, batch_u0, batch_u1


def _step(net_1: nn.Module, net_2: nn.Module, cps: CpsConfig = CPS, seed: int = 7) -> dict[str, Tensor]:
    batch_l, batch_u0, batch_u1 = _batches()
    gen = torch.Generator().manual_seed(seed)
    return cps_cutmix_step(net_1, net_2, batch_l, batch_u0, batch_u1, cps=cps, loss=CE, generator=gen)


# ---------------------------------------------------------------------------------------------------------------
# Pure functions (CPS.md §7)


def test_cps_loss_is_symmetric_and_crosses_the_labels() -> None:
    """Oracle 1: swapping f1 and f2 leaves L_cps unchanged; each network learns the OTHER one's labels."""
    g = torch.Generator().manual_seed(0)
    l1, l2 = torch.randn(2, 4, 5, 6, generator=g), torch.randn(2, 4, 5, 6, generator=g)
    p1, p2 = l1.argmax(1), l2.argmax(1)
    assert torch.equal(cps_loss(l1, l2, p1, p2), cps_loss(l2, l1, p2, p1))
    expected = F.cross_entropy(l1, p2) + F.cross_entropy(l2, p1)
    torch.testing.assert_close(cps_loss(l1, l2, p1, p2), expected)
    valid = torch.zeros(2, 5, 6, dtype=torch.bool)
    valid[:, :2] = True
    masked = F.cross_entropy(l1[:, :, :2], p2[:, :2]) + F.cross_entropy(l2[:, :, :2], p1[:, :2])
    torch.testing.assert_close(cps_loss(l1, l2, p1, p2, valid), masked)


def test_mixing_logits_then_argmax_equals_mixing_argmaxes() -> None:
    """Oracle 4 (M binary), and oracle 3's limits: M = 0 gives argmax f(u0), M = 1 gives argmax f(u1)."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 5, 16, 16, generator=g), torch.randn(3, 5, 16, 16, generator=g)
    mask = toggled_box_mask(sample_cps_boxes(3, 16, 16, g), 16, 16)
    assert mask.any() and not mask.all()
    assert torch.equal(cps_pseudo_labels(a, b, mask), torch.where(mask, b.argmax(1), a.argmax(1)))
    zeros = torch.zeros(3, 16, 16, dtype=torch.bool)
    assert torch.equal(cps_pseudo_labels(a, b, zeros), a.argmax(1))
    assert torch.equal(cps_pseudo_labels(a, b, ~zeros), b.argmax(1))


def test_total_is_constant_weight_over_reference_world_size() -> None:
    """§2.A items 8-9: (L_sup1 + L_sup2 + w L_cps) / W_ref; the weight has no schedule (§3)."""
    s1, s2, c = torch.tensor(0.5), torch.tensor(0.25), torch.tensor(2.0)
    assert float(cps_total(s1, s2, c, cps_weight=5.0, reference_world_size=8)) == pytest.approx((0.75 + 10) / 8)
    assert float(cps_total(s1, s2, c, cps_weight=1.0, reference_world_size=1)) == pytest.approx(2.75)
    with pytest.raises(ValueError, match="reference_world_size"):
        cps_total(s1, s2, c, cps_weight=1.0, reference_world_size=0)
    assert not any("ramp" in f.name or "schedule" in f.name for f in dataclasses.fields(CpsConfig))


def test_no_decay_groups_hold_every_norm_parameter_and_bias(tiny_model_cfg: ModelConfig) -> None:
    """Oracle 8: every BN weight/bias and every conv bias sits in a group with weight_decay = 0."""
    model = build_model(tiny_model_cfg)
    groups = no_decay_param_groups(model, param_groups(model, 0.02, 1.0, 1e-4))
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(decay_of) == len(list(model.parameters()))
    assert all(g["lr"] == g["base_lr"] == 0.02 for g in groups)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            no_decay = isinstance(module, nn.BatchNorm2d) or name == "bias"
            assert decay_of[id(p)] == (0.0 if no_decay else 1e-4), (module, name)


# ---------------------------------------------------------------------------------------------------------------
# One iteration on tiny networks


class Recording(StudentForward):
    """Records (network, input, grad enabled, train mode) for every call."""

    calls: list[tuple[str, Tensor, bool, bool]]

    def __init__(self, model: nn.Module, tag: str, calls: list[Any]) -> None:
        super().__init__(model)
        self.tag, self.calls = tag, calls

    def forward(self, x: Tensor, aux_batch: int | None = None, with_aux: bool = True) -> Any:
        self.calls.append((self.tag, x, torch.is_grad_enabled(), self.training))
        return super().forward(x, aux_batch, with_aux)


def test_forward_order_train_mode_and_running_statistics(tiny_model_cfg: ModelConfig) -> None:
    """§2.A items 3, 5, 7: eight separate train-mode calls in the reference's order; BN statistics move 4x/network."""
    calls: list[Any] = []
    torch.manual_seed(0)
    net_1 = Recording(build_model(tiny_model_cfg), "f1", calls).train()
    net_2 = Recording(build_model(tiny_model_cfg), "f2", calls).train()
    batch_l, batch_u0, batch_u1 = _batches()
    out = _step(net_1, net_2)
    mask = toggled_box_mask(sample_cps_boxes(B, H, W, torch.Generator().manual_seed(7)), H, W)
    image_mix = mask_mix(mask, batch_u1["image_w"], batch_u0["image_w"])
    u0, u1, x = batch_u0["image_w"], batch_u1["image_w"], batch_l["image"]
    expected = [("f1", u0, False), ("f1", u1, False), ("f2", u0, False), ("f2", u1, False),
                ("f1", image_mix, True), ("f2", image_mix, True), ("f1", x, True), ("f2", x, True)]  # fmt: skip
    assert len(calls) == len(expected)
    for (tag, inp, grad, training), (tag_e, inp_e, grad_e) in zip(calls, expected, strict=True):
        assert (tag, grad, training) == (tag_e, grad_e, True) and torch.equal(inp, inp_e)
    for net in (net_1, net_2):
        tracked = {name.split(".")[0]: set() for name, _ in net.model.named_children()}
        for name, m in net.model.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                tracked[name.split(".")[0]].add(int(m.num_batches_tracked))
        assert tracked.pop("aux") == {1}  # the aux head runs on the labeled forward only
        assert set().union(*tracked.values()) == {4}  # u0, u1, u_mix, x
    # the mask comes from the step's generator: three toggled boxes (sample_cps_boxes + toggled_box_mask)
    assert float(out["mix_fraction"]) == pytest.approx(float(mask.float().mean()))
    assert out["loss"].requires_grad and out["loss_cps"].dim() == 0


def test_identical_networks_agree(tiny_model_cfg: ModelConfig) -> None:
    """Oracle 2: same weights -> ŷ1 = ŷ2 and L_cps = 2 CE(f(u_mix), ŷ)."""
    tiny = dataclasses.replace(tiny_model_cfg, aux_head=False)
    net = _net(tiny, 0)
    out = _step(net, copy.deepcopy(net))
    assert float(out["agreement"]) == 1.0
    batch_l, batch_u0, batch_u1 = _batches()
    mask = toggled_box_mask(sample_cps_boxes(B, H, W, torch.Generator().manual_seed(7)), H, W)
    with torch.no_grad():
        pseudo = cps_pseudo_labels(net(batch_u0["image_w"])[0], net(batch_u1["image_w"])[0], mask)
        logits_mix = net(mask_mix(mask, batch_u1["image_w"], batch_u0["image_w"]))[0]
    torch.testing.assert_close(out["loss_cps"], 2 * F.cross_entropy(logits_mix, pseudo))


def test_swapping_the_networks_swaps_the_supervised_losses_only(tiny_model_cfg: ModelConfig) -> None:
    """Oracle 1 at the step level."""
    net_1, net_2 = _net(tiny_model_cfg, 0), _net(tiny_model_cfg, 1)
    a = _step(net_1, net_2)
    b = _step(net_2, net_1)
    torch.testing.assert_close(a["loss_cps"], b["loss_cps"])
    torch.testing.assert_close(a["loss_sup_1"], b["loss_sup_2"])
    torch.testing.assert_close(a["loss"], b["loss"])
    assert float(a["agreement"]) < 1.0  # different heads disagree somewhere


@pytest.mark.parametrize("full", [False, True], ids=["mask_0", "mask_1"])
def test_empty_and_full_masks(tiny_model_cfg: ModelConfig, monkeypatch: pytest.MonkeyPatch, full: bool) -> None:
    """Oracle 3: M = 0 -> u_mix = u0, ŷ_k = argmax f_k(u0); M = 1 -> everything from u1."""
    box = [0, H, 0, W] if full else [0, 0, 0, 0]
    monkeypatch.setattr(cps_module, "sample_cps_boxes", lambda b, h, w, g, **kw: torch.tensor([[box]] * b))
    calls: list[Any] = []
    net_1 = Recording(build_model(dataclasses.replace(tiny_model_cfg, aux_head=False)), "f1", calls).train()
    net_2 = copy.deepcopy(net_1)
    out = _step(net_1, net_2)
    _, batch_u0, batch_u1 = _batches()
    source = batch_u1["image_w"] if full else batch_u0["image_w"]
    assert float(out["mix_fraction"]) == float(full)
    student_input = next(x for _, x, grad, _ in calls if grad)
    assert torch.equal(student_input, source)  # the student forward sees the clean image
    with torch.no_grad():
        logits = net_1(source)[0]
    torch.testing.assert_close(out["loss_cps"], 2 * F.cross_entropy(logits, logits.argmax(1)))


def test_gradient_is_one_over_reference_world_size(tiny_model_cfg: ModelConfig) -> None:
    """Oracle 7: with W_ref = 2 every gradient is half the gradient of the un-reduced loss (no collectives)."""
    grads = []
    for w_ref in (1, 2):
        net_1, net_2 = _net(tiny_model_cfg, 0), _net(tiny_model_cfg, 1)
        out = _step(net_1, net_2, dataclasses.replace(CPS, reference_world_size=w_ref))
        out["loss"].backward()
        grads.append([p.grad.clone() for n in (net_1, net_2) for p in n.parameters()])
    for g1, g2 in zip(*grads, strict=True):
        torch.testing.assert_close(g2, g1 / 2, rtol=1e-6, atol=0.0)


def test_padding_flag_leaves_padded_pixels_out(tiny_model_cfg: ModelConfig) -> None:
    """README §3 item 4: faithful trains on the padded pixels; the flag masks them with the mixed valid map."""
    net_1, net_2 = _net(tiny_model_cfg, 0), _net(tiny_model_cfg, 1)
    faithful = _step(net_1, net_2)
    clean = _step(net_1, net_2, dataclasses.replace(CPS, ignore_padding_in_unsup=True))
    assert float(faithful["loss_cps"]) != pytest.approx(float(clean["loss_cps"]))
    torch.testing.assert_close(faithful["loss_sup_1"], clean["loss_sup_1"])


def test_plain_cps_supervises_labeled_and_unlabeled_pixels(tiny_model_cfg: ModelConfig) -> None:
    """§2.C: four grad forwards f1(x), f1(u), f2(x), f2(u); L_cps over the 2B images of [x; u]."""
    calls: list[Any] = []
    torch.manual_seed(0)
    net_1 = Recording(build_model(tiny_model_cfg), "f1", calls).train()
    net_2 = Recording(build_model(tiny_model_cfg), "f2", calls).train()
    batch_l, batch_u, _ = _batches()
    out = cps_plain_step(net_1, net_2, batch_l, batch_u, cps=CPS, loss=CE)
    assert [(c[0], c[2]) for c in calls] == [("f1", True), ("f1", True), ("f2", True), ("f2", True)]
    assert torch.equal(calls[0][1], batch_l["image"]) and torch.equal(calls[1][1], batch_u["image_w"])
    with torch.no_grad():
        p1 = torch.cat([net_1(batch_l["image"])[0], net_1(batch_u["image_w"])[0]])
        p2 = torch.cat([net_2(batch_l["image"])[0], net_2(batch_u["image_w"])[0]])
    torch.testing.assert_close(out["loss_cps"], F.cross_entropy(p1, p2.argmax(1)) + F.cross_entropy(p2, p1.argmax(1)))
    expected = (out["loss_sup_1"] + out["loss_sup_2"] + 1.5 * out["loss_cps"]) / 1
    torch.testing.assert_close(out["loss"].detach(), expected)


# ---------------------------------------------------------------------------------------------------------------
# The method


def test_networks_share_the_backbone_init_and_differ_in_the_head(tiny_model_cfg: ModelConfig) -> None:
    """§1/§3: identical backbone init (the pretrained file, or f1's draw), independent Kaiming fan_in heads."""
    cfg = dataclasses.replace(demo_cfg(Path("unused"), "method=cps"), model=tiny_model_cfg)
    torch.manual_seed(0)
    nets = build_method(cfg).build_networks(lambda: build_model(tiny_model_cfg))
    f1, f2 = nets["f1"], nets["f2"]
    assert list(nets) == ["f1", "f2"]
    for a, b in zip(f1.backbone.state_dict().values(), f2.backbone.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(f1.classifier[-1].weight, f2.classifier[-1].weight)
    conv = f1.classifier[0][0]
    fan_in = conv.weight[0].numel()
    assert float(conv.weight.detach().std()) == pytest.approx((2.0 / fan_in) ** 0.5, rel=0.1)  # Kaiming normal, fan_in
    toolkit = dataclasses.replace(cfg, cps=dataclasses.replace(cfg.cps, head_init="toolkit"))
    conv = CpsMethod(toolkit).build_networks(lambda: build_model(tiny_model_cfg))["f1"].classifier[0][0]
    assert float(conv.weight.detach().std()) == pytest.approx((1.0 / (3 * fan_in)) ** 0.5, rel=0.1)  # torch's default
    backbone = build_model(tiny_model_cfg).backbone
    before = copy.deepcopy(backbone.state_dict())
    model = build_model(tiny_model_cfg)
    model.backbone.load_state_dict(before)
    init_head_kaiming(model)
    assert all(torch.equal(v, before[k]) for k, v in model.backbone.state_dict().items())  # backbone untouched


def test_method_declares_streams_logs_and_exports_f1() -> None:
    cfg = demo_cfg(Path("unused"), "method=cps")
    method = build_method(cfg)
    assert isinstance(method, CpsMethod) and METHODS["cps"] is CpsMethod
    assert method.streams(0) == ("labeled", "unlabeled", "unlabeled_mix")
    assert CpsMethod(dataclasses.replace(cfg, cps=dataclasses.replace(cfg.cps, cutmix=False))).streams(3) == (
        "labeled",
        "unlabeled",
    )
    nets = {"f1": nn.Linear(1, 1), "f2": nn.Linear(1, 1)}
    assert list(method.eval_models(nets)) == ["f1"] and method.artifact(nets) == ("cps_f1", nets["f1"])
    both = CpsMethod(dataclasses.replace(cfg, cps=dataclasses.replace(cfg.cps, eval_f2=True)))
    assert list(both.eval_models(nets)) == ["f1", "f2"]
    assert {"loss", "loss_sup_1", "loss_sup_2", "loss_cps"} <= set(method.log_keys)


def test_configs_follow_the_reference_settings() -> None:
    """§3 defaults in the shipped configs; OHEM min_kept 50 000 per process (oracle 6: 50 000·8 // 8)."""
    for n, epochs in ((186, 128), (372, 137), (744, 160), (1488, 240)):
        cfg = load_config(REPO / "configs" / f"cityscapes_cps_r50_{n}.yaml")
        assert cfg.method == "cps" and cfg.cps is not None and cfg.optim.epochs == epochs
        assert (cfg.cps.cps_weight, cfg.cps.reference_world_size, cfg.data.crop_size, cfg.data.batch_size) == (
            5.0, 8, 800, 1,
        )  # fmt: skip
        assert (cfg.optim.lr, cfg.optim.head_lr_mult, cfg.optim.weight_decay) == (0.02, 1.0, 1e-4)
        assert cfg.loss.supervised == "ohem" and cfg.loss.ohem_min_kept == 50_000 * 8 // 8
        assert not cfg.model.aux_head and cfg.model.depth == 50
    for depth in (50, 101):
        for n, epochs in ((662, 32), (1323, 34), (2646, 40)):
            cfg = load_config(REPO / "configs" / f"voc_blended_cps_r{depth}_{n}.yaml")
            assert cfg.method == "cps" and cfg.cps is not None and cfg.optim.epochs == epochs
            assert (cfg.cps.cps_weight, cfg.cps.reference_world_size, cfg.data.crop_size, cfg.data.batch_size) == (
                1.0, 4, 512, 2,
            )  # fmt: skip
            assert (cfg.optim.lr, cfg.optim.head_lr_mult, cfg.loss.supervised) == (0.01, 1.0, "ce")
            assert cfg.model.depth == depth and not cfg.model.aux_head


def test_method_cps_needs_its_section(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    del raw["cps"]
    path = tmp_path / "no_cps.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="method 'cps' needs a cps: section"):
        load_config(path, ["method=cps"])
    assert load_config(path).cps is None  # ignored by the other methods
    with pytest.raises(ConfigError, match="reference_world_size >= 1"):
        load_config(REPO / "configs" / "demo.yaml", ["method=cps", "cps.reference_world_size=0"])


# ---------------------------------------------------------------------------------------------------------------
# Through the real loop

SETTINGS = ("method=cps", "run.checkpoint_every=1", "run.keep_checkpoints=2", "run.tensorboard=false")


def test_cps_trains_and_writes_a_loadable_artifact(tmp_path: Path) -> None:
    from imas_train.teacher_artifact import load_teacher

    run = tmp_path / "run"
    result = imas_train.train.train(demo_cfg(run, "method=cps", "optim.max_iters=2", "run.tensorboard=false"))
    assert result.iterations == 2  # L = N_u / B = 2
    model, meta = load_teacher(run / "teacher.safetensors")
    assert not model.training and meta.training_summary["method"] == "cps"
    assert meta.training_summary["artifact_model"] == "cps_f1"
    load_teacher(run / "best.safetensors")
    assert not (run / "easiness").exists()


def test_cps_resume_mid_epoch_is_bitwise_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full = imas_train.train.train(demo_cfg(tmp_path / "full", *SETTINGS))
    cfg = demo_cfg(tmp_path / "split", *SETTINGS)
    resumed = killed_then_resumed(cfg, monkeypatch, at=3)
    assert resumed.iterations == full.iterations == 4
    assert (tmp_path / "split" / "teacher.safetensors").read_bytes() == full.teacher_path.read_bytes()
    assert resumed.miou_final == full.miou_final
