"""CCT (shared/methods/CCT.md): gradient routing (§7 oracle 9), the step's total, the decoders, the configs, and
training, resuming and exporting through the real loop."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from torch import Tensor, nn

import imas_train.train
from imas_core.errors import ConfigError
from imas_train.cct import softmax_mse
from imas_train.config import CctConfig, ModelConfig, TrainConfig, load_config
from imas_train.methods import METHODS, build_method
from imas_train.methods.base import StepContext
from imas_train.methods.cct import AUX, AuxForward, CctForward, CctMethod, cct_total, decoder_kinds
from imas_train.models import build_model
from imas_train.models.cct_decoders import CctAuxDecoders
from tests.train.resume_helpers import killed_then_resumed
from tests.train.test_train import REPO, demo_cfg

H, W, B = 33, 41, 2


def _cfg(tiny_model_cfg: ModelConfig, *overrides: str) -> TrainConfig:
    return dataclasses.replace(demo_cfg(Path("unused"), "method=cct", *overrides), model=tiny_model_cfg)


def _setup(cfg: TrainConfig) -> tuple[CctMethod, dict[str, nn.Module], dict[str, nn.Module]]:
    method = build_method(cfg)
    assert isinstance(method, CctMethod)
    torch.manual_seed(0)
    nets = method.build_networks(lambda: build_model(cfg.model))
    forwards = {name: method.forward_adaptor(net).train() for name, net in nets.items()}
    return method, nets, forwards


def _batches(seed: int = 0) -> dict[str, dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    labeled = {"image": torch.randn(B, 3, H, W, generator=g), "label": torch.randint(0, 3, (B, H, W), generator=g)}
    unlabeled = {"image_w": torch.randn(B, 3, H, W, generator=g), "valid": torch.ones(B, H, W, dtype=torch.bool)}
    return {"labeled": labeled, "unlabeled": unlabeled}


def _ctx(step: int = 0, seed: int = 5, autocast: bool = False) -> StepContext:
    return StepContext(step=step, epoch=0, iters_per_epoch=2, rank=0, world_size=1, device=torch.device("cpu"),
                       generator=torch.Generator().manual_seed(seed),
                       autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast))  # fmt: skip


def _grads(module: nn.Module) -> list[Tensor]:
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


def test_decoder_kinds_port_default_and_official_counts() -> None:
    """§3: the port's K = 12 (2 of each kind, no VAT) by default; the official K = 30 with its counts."""
    port = decoder_kinds(CctConfig(reference_world_size=4))
    assert len(port) == 12 and "vat" not in port and all(port.count(k) == 2 for k in set(port))
    official = CctConfig(reference_world_size=1, vat=2, dropout=6, cutout=6, feature_drop=6, feature_noise=6)
    kinds = decoder_kinds(official)
    assert len(kinds) == 30 and kinds[:2] == ("vat", "vat") and kinds.count("cutout") == 6


def test_unsupervised_loss_never_reaches_the_main_decoder(tiny_model_cfg: ModelConfig) -> None:
    """Oracle 9, L_u half: the consistency loss gives zero gradient to the main decoder (the classifier's final 1x1
    conv) and a non-zero one to the encoder and to every auxiliary decoder."""
    _, nets, forwards = _setup(_cfg(tiny_model_cfg))
    u = _batches()["unlabeled"]["image_w"]
    logits_u, z_u, _ = forwards["student"](u, with_aux=False)
    outputs = forwards[AUX](z_u, logits_u.detach(), torch.Generator().manual_seed(1))
    loss_u = torch.stack([softmax_mse(o, logits_u.detach().softmax(1)) for o in outputs]).mean()
    loss_u.backward()
    model = nets["student"]
    main = model.classifier[-1]
    assert all(float(g.abs().sum()) == 0.0 for g in _grads(main))
    assert float(sum(g.abs().sum() for g in _grads(model.backbone))) > 0  # the encoder learns from L_u
    for decoder in nets[AUX].decoders:
        assert float(sum(g.abs().sum() for g in _grads(decoder))) > 0, decoder.kind


def test_supervised_loss_never_reaches_the_aux_decoders(tiny_model_cfg: ModelConfig) -> None:
    """Oracle 9, L_s half: with w_u = 0 the step's loss is L_s alone and leaves every auxiliary decoder's gradient
    at zero, while the main decoder gets one."""
    method, nets, forwards = _setup(_cfg(tiny_model_cfg, "cct.unsup_weight=0"))
    out = method.step(forwards, _batches(), _ctx())
    out.loss.backward()
    assert all(float(g.abs().sum()) == 0.0 for g in _grads(nets[AUX]))
    assert float(sum(g.abs().sum() for g in _grads(nets["student"].classifier[-1]))) > 0


def test_step_total_and_gradient_scale(tiny_model_cfg: ModelConfig) -> None:
    """§2.B items 5-6: loss = (L_s + 30·L_u) / W_ref; the logged total is before the factor; W_ref = 4 gives exactly
    a quarter of the W_ref = 1 gradient (same draws)."""
    grads = {}
    for w_ref in (1, 4):
        method, nets, forwards = _setup(_cfg(tiny_model_cfg, f"cct.reference_world_size={w_ref}"))
        out = method.step(forwards, _batches(), _ctx())
        logs = out.logs
        assert float(logs["unsup_weight"]) == 30.0 and set(logs) <= set(method.log_keys)
        torch.testing.assert_close(out.loss * w_ref, logs["loss_sup"] + 30.0 * logs["loss_unsup"])
        torch.testing.assert_close(logs["loss"], logs["loss_sup"] + 30.0 * logs["loss_unsup"])
        out.loss.backward()
        grads[w_ref] = torch.cat([g.flatten() for n in (nets["student"], nets[AUX]) for g in _grads(n)])
    torch.testing.assert_close(grads[4] * 4, grads[1])
    assert cct_total(torch.tensor(1.0), torch.tensor(0.5), 30.0, 8) == pytest.approx(16 / 8)


def test_ramp_up_and_plain_loss_options(tiny_model_cfg: ModelConfig) -> None:
    """The official schedule: w_u = 30·e^-5 at iteration 0 with a ramp; ``supervised: loss`` uses the loss:
    section's CE and logs no abCE values."""
    method, _, forwards = _setup(_cfg(tiny_model_cfg, "cct.rampup_epochs=1", "cct.supervised=loss"))
    out = method.step(forwards, _batches(), _ctx(step=0))
    assert float(out.logs["unsup_weight"]) == pytest.approx(30 * torch.exp(torch.tensor(-5.0)).item())
    assert "sup_threshold" not in out.logs
    assert float(method.step(forwards, _batches(), _ctx(step=2)).logs["unsup_weight"]) == 30.0


def test_every_perturbation_with_vat_under_autocast(tiny_model_cfg: ModelConfig) -> None:
    """One decoder of each of the seven kinds, in bf16 autocast: finite losses, a gradient for every decoder, and the
    same draws give the same loss (all randomness from the step's generator)."""
    kinds = ("vat", "dropout", "cutout", "context_masking", "object_masking", "feature_drop", "feature_noise")
    cfg = _cfg(tiny_model_cfg, *(f"cct.{k}=1" for k in kinds))
    method, nets, forwards = _setup(cfg)
    assert nets[AUX].kinds == kinds
    out = method.step(forwards, _batches(), _ctx(autocast=True))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for decoder in nets[AUX].decoders:
        assert float(sum(g.abs().sum() for g in _grads(decoder))) > 0, decoder.kind
    again = method.step(forwards, _batches(), _ctx(autocast=True))
    assert torch.equal(again.loss, out.loss)
    other = method.step(forwards, _batches(), _ctx(seed=6, autocast=True))
    assert not torch.equal(other.logs["loss_unsup"], out.logs["loss_unsup"])


def test_method_declares_networks_groups_and_exports_the_network(tiny_model_cfg: ModelConfig) -> None:
    """Two trained networks (the segmentation network and the aux decoders); only the network is evaluated and
    exported; the aux decoders form one head-LR group; BN parameters and biases carry no weight decay."""
    cfg = _cfg(tiny_model_cfg, "optim.head_lr_mult=10")
    method, nets, _ = _setup(cfg)
    assert METHODS["cct"] is CctMethod and list(nets) == ["student", AUX]
    assert isinstance(nets[AUX], CctAuxDecoders) and isinstance(method.forward_adaptor(nets[AUX]), AuxForward)
    assert isinstance(method.forward_adaptor(nets["student"]), CctForward)
    assert list(method.eval_models(nets)) == ["student"] and method.artifact(nets) == ("student", nets["student"])
    groups = method.param_groups(nets[AUX], 0.01)
    assert {g["name"] for g in groups} == {"head", "head_no_decay"}
    assert all(g["lr"] == pytest.approx(0.1) for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(list(nets[AUX].parameters()))
    student_groups = method.param_groups(nets["student"], 0.01)
    no_decay = {id(p) for g in student_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    bn = [m for m in nets["student"].modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(id(m.weight) in no_decay and id(m.bias) in no_decay for m in bn)
    decayed = CctMethod(dataclasses.replace(cfg, cct=dataclasses.replace(cfg.cct, no_decay_bn_bias=False)))
    assert all(g["weight_decay"] > 0 for g in decayed.param_groups(nets["student"], 0.01))
    # the model's feature hook is the forward split before the final conv
    model = nets["student"].eval()
    x = _batches()["labeled"]["image"]
    logits, features, _ = model.forward_with_features(x)
    assert torch.equal(logits, model(x)) and torch.equal(model.classify(features, x), logits)


def test_configs_follow_the_port() -> None:
    """§3 port defaults in the shipped configs; the demo needs no 1/W_ref factor."""
    for depth in (50, 101):
        for n, epochs in ((662, 32), (1323, 34), (2646, 40)):
            cfg = load_config(REPO / "configs" / f"voc_blended_cct_r{depth}_{n}.yaml")
            assert cfg.method == "cct" and cfg.cct is not None and cfg.optim.epochs == epochs
            assert (cfg.cct.reference_world_size, cfg.cct.unsup_weight, cfg.cct.rampup_epochs) == (4, 30.0, 0)
            assert len(decoder_kinds(cfg.cct)) == 12 and cfg.cct.supervised == "abce" and cfg.cct.no_decay_bn_bias
            assert (cfg.optim.lr, cfg.optim.head_lr_mult) == (0.01, 1.0)
            assert (cfg.data.crop_size, cfg.data.batch_size) == (512, 2)
            assert cfg.model.depth == depth and not cfg.model.aux_head
    for n, epochs in ((186, 128), (372, 137), (744, 160), (1488, 240)):
        cfg = load_config(REPO / "configs" / f"cityscapes_cct_r50_{n}.yaml")
        assert cfg.method == "cct" and cfg.cct is not None and cfg.optim.epochs == epochs
        assert (cfg.cct.reference_world_size, cfg.optim.lr) == (8, 0.02)
        assert (cfg.data.crop_size, cfg.data.batch_size) == (800, 1)
    demo = load_config(REPO / "configs" / "demo.yaml", ["method=cct"])
    assert demo.cct is not None and demo.cct.reference_world_size == 1


def test_method_cct_needs_its_section_and_valid_values(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    del raw["cct"]
    path = tmp_path / "no_cct.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="method 'cct' needs a cct: section"):
        load_config(path, ["method=cct"])
    assert load_config(path).cct is None  # ignored by the other methods
    demo = REPO / "configs" / "demo.yaml"
    bad = {
        "cct.reference_world_size=0": "cct.reference_world_size must be >= 1",
        "cct.drop_rate=1.0": r"cct.drop_rate must be in \[0, 1\)",
        "cct.feature_drop_range=[0.9,0.7]": "cct.feature_drop_range must be",
        "cct.dropout=-1": "decoder counts must be >= 0",
        "cct.unsup_weight=.nan": "cct.unsup_weight must be a finite number >= 0",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config(demo, ["method=cct", override])
    zero = [f"cct.{k}=0" for k in ("dropout", "cutout", "context_masking", "object_masking", "feature_drop",
                                   "feature_noise")]  # fmt: skip
    with pytest.raises(ConfigError, match="at least one decoder"):
        load_config(demo, ["method=cct", *zero])


# ---------------------------------------------------------------------------------------------------------------
# Through the real loop

SETTINGS = ("method=cct", "run.checkpoint_every=1", "run.keep_checkpoints=2", "run.tensorboard=false")


def test_cct_trains_resumes_bitwise_and_exports_without_aux_decoders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four iterations through the loop; a run killed before iteration 3 and resumed writes the same artifact bytes;
    the artifact holds the plain segmentation model only, and its ONNX export has exactly the initializers and
    convolutions of a plain (supervised) model's export, none from an auxiliary decoder."""
    import onnx

    from imas_export import OnnxExportOptions, ParityOptions, export_onnx
    from imas_train.teacher_artifact import load_teacher

    full = imas_train.train.train(demo_cfg(tmp_path / "full", *SETTINGS))
    assert full.iterations == 4
    cfg = demo_cfg(tmp_path / "split", *SETTINGS)
    resumed = killed_then_resumed(cfg, monkeypatch, at=3)
    assert resumed.iterations == 4
    assert (tmp_path / "split" / "teacher.safetensors").read_bytes() == full.teacher_path.read_bytes()
    assert resumed.miou_final == full.miou_final

    model, meta = load_teacher(full.teacher_path)
    assert meta.training_summary["method"] == "cct" and meta.training_summary["artifact_model"] == "student"
    plain_run = imas_train.train.train(demo_cfg(tmp_path / "plain", "method=supervised", "optim.max_iters=1",
                                                "run.tensorboard=false"))  # fmt: skip
    plain, _ = load_teacher(plain_run.teacher_path)
    assert model.state_dict().keys() == plain.state_dict().keys()
    graphs = {}
    for name, teacher in (("cct", full.teacher_path), ("plain", plain_run.teacher_path)):
        out = tmp_path / f"{name}.onnx"
        export_onnx(OnnxExportOptions(teacher=teacher, output=out, window=(33, 33), parity=ParityOptions(num_images=1)))
        graphs[name] = onnx.load(str(out)).graph
    cct_graph, plain_graph = graphs["cct"], graphs["plain"]
    assert len(cct_graph.initializer) == len(plain_graph.initializer)
    assert sum(int(torch.tensor(t.dims).prod()) for t in cct_graph.initializer) == sum(
        int(torch.tensor(t.dims).prod()) for t in plain_graph.initializer
    )
    ops = [n.op_type for n in cct_graph.node]
    assert ops.count("Conv") == [n.op_type for n in plain_graph.node].count("Conv")
    names = [n.name for n in cct_graph.node] + [t.name for t in cct_graph.initializer]
    assert not [n for n in names if "decoders" in n or "aux" in n.lower()]
