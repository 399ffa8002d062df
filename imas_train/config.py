"""Typed experiment configuration: frozen dataclasses, a strict YAML loader and dotted overrides.

Unknown keys are errors that name the key and suggest the closest valid one; every value is checked against its
annotation. Only values shared by every reference run have defaults (docs/algorithm.md §7); dataset-specific values
(tau, learning rate, weight decay, crop, epochs, aux head) must be stated by each experiment.
"""

from __future__ import annotations

import copy
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from imas_core.constants import DEFAULT_WINDOW
from imas_core.errors import ConfigError
from imas_core.typed import from_dict, to_dict


@dataclass(frozen=True)
class ModelConfig:
    """DeepLabV3+ on a (dilated) ResNet (docs/algorithm.md §4)."""

    num_classes: int
    aux_head: bool  # Cityscapes yes (weight 0.4), VOC no: no universal value, so no default
    depth: Literal[18, 34, 50, 101] = 50
    stem: Literal["deep", "standard"] = "deep"  # deep = faithful; standard loads torchvision ImageNet files
    output_stride: Literal[8, 16, 32] = 16
    multi_grid: bool = True  # (2, 2, 4) grid on layer4 (docs/algorithm.md §4); False for SupOnly baselines
    base_width: int = 64  # 64 for every real ResNet; tiny test and demo models use less
    layers: tuple[int, int, int, int] | None = None  # block counts override; None = standard for `depth`
    aspp_channels: int = 256
    low_level_channels: int = 48
    decoder_channels: int = 256
    aux_channels: int = 256
    pretrained: Path | None = None  # local ImageNet backbone file; nothing is ever downloaded
    aux_labeled_only: bool = False  # §10 2b: run aux on the labeled slice only (changes aux BN statistics)
    decoder: Literal["imas", "u2pl"] = "imas"  # u2pl: U2PL's decoder (3x3 ASPP projection, dropout; U2PL.md §5)
    rep_head: bool = False  # U2PL's representation head on the classifier input (training only; not exported)
    rep_channels: int = 256  # its output width (U2PL: 256)
    drop_path_rate: float = 0.0  # stochastic depth p_max over the ResNet blocks, training only (0 = off; see
    # check_consistency: method dual_teacher sets its student's own rate from dual_teacher.drop_path_rate)


@dataclass(frozen=True)
class DemoConfig:
    """The procedural demo dataset (no files): sizes and seed."""

    num_labeled: int = 24
    num_unlabeled: int = 192
    num_val: int = 24
    height: int = 96
    width: int = 128
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    """Dataset, split lists and the weak augmentation geometry (docs/algorithm.md §5)."""

    dataset: Literal["cityscapes", "voc", "folder", "demo"]
    crop_size: int  # 769 Cityscapes, 513 VOC
    batch_size: int  # per process, for the labeled and the unlabeled stream each (B)
    scale_mode: Literal["fixed_base", "long_side", "relative"]  # Cityscapes / VOC / custom resize rule
    root: Path | None = None
    labeled_list: Path | None = None
    unlabeled_list: Path | None = None
    val_list: Path | None = None
    scale_range: tuple[float, float] = (0.5, 2.0)  # s for fixed_base and relative
    base_size: tuple[int, int] = (1024, 2048)  # (H, W) resized by s in fixed_base mode (Cityscapes)
    long_side_range: tuple[int, int] = (250, 1000)  # inclusive, long_side mode (VOC)
    class_names: tuple[str, ...] | None = None  # folder datasets only; built in for the others
    palette: tuple[tuple[int, int, int], ...] | None = None  # folder datasets only; generated when absent
    image_dir: str = "images"  # folder datasets: image folder under root
    mask_dir: str = "masks"  # folder datasets: mask folder under root
    mask_suffix: str = ".png"
    ignore_values: tuple[int, ...] = ()  # folder datasets: raw mask values mapped to the ignore label
    value_remap: dict[int, int] | None = None  # folder datasets: raw mask value -> class index
    exif_orientation: bool = True  # turn images as viewers do (EXIF tag), like imas-infer; labels: imas_core.images
    num_workers: int = 2
    demo: DemoConfig = field(default_factory=DemoConfig)


@dataclass(frozen=True)
class LossConfig:
    """Supervised loss (docs/algorithm.md §6.1)."""

    supervised: Literal["ce", "ohem"]  # OHEM Cityscapes, CE VOC
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 100_000
    aux_weight: float = 0.4


@dataclass(frozen=True)
class OptimConfig:
    """SGD with a per-iteration poly schedule (docs/algorithm.md §3 step 0, §7)."""

    lr: float  # backbone base LR: 0.01 Cityscapes, 0.001 VOC
    weight_decay: float  # 5e-4 Cityscapes, 1e-4 VOC
    head_lr_mult: float  # 1 Cityscapes, 10 VOC (head = decoder + aux)
    epochs: int  # 240 Cityscapes, 80 VOC
    momentum: float = 0.9
    poly_power: float = 0.9
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"  # rule when the global batch differs from 16+16
    reference_global_batch: int = 16  # labeled images per optimizer step in the paper's runs
    grad_accum_steps: int = 1
    max_iters: int | None = None  # stop early (demo, smoke tests); the schedule still spans epochs


@dataclass(frozen=True)
class ImasConfig:
    """The iMAS method and its ablation switches (docs/algorithm.md §3, §10)."""

    tau: float  # 0.7 Cityscapes, 0.95 VOC: no universal value, so no default
    unsup_weight: float = 3.0  # lambda_u in every reference run
    ema_decay: float = 0.996  # alpha; the decay is 0 throughout epoch 0 (§3 step 10)
    sup_only_epochs: int = 0
    ignore_class0: bool = True  # drop class 0 from the wIoU weights (road on Cityscapes, background on VOC)
    cutmix_side_range: tuple[float, float] = (0.1, 0.9)
    forward_unused_weak: bool = True  # faithful; False saves ~22% FLOPs but changes BN statistics (§10.1)
    ignore_padding_in_unsup: bool = False  # §10.9 opt-out of training on padded borders
    adaptive_loss_weight: bool = True  # False: every unlabeled image has weight 1
    adaptive_intensity: bool = True  # False: the full strong view replaces the easiness mix
    adaptive_cutmix_trigger: bool = True  # False: CutMix fires with cutmix_fixed_prob
    cutmix_fixed_prob: float = 0.5  # only when adaptive_cutmix_trigger is False
    adaptive_cutmix_pairing: bool = True  # False: random partners instead of hard-easy pairs


@dataclass(frozen=True)
class U2plConfig:
    """U2PL as its official code behaves (shared/methods/U2PL.md §3); every clean alternative is a flag (§9)."""

    sup_only_epochs: int  # s: 0 Cityscapes, 1 VOC (the VOC config omits the key, default 1): no universal value
    reference_world_size: int  # W_ref: 8 Cityscapes, 4 VOC; the contrastive term's effective weight is 1/W_ref
    ema_decay: float = 0.99  # EMA cap; decay 0 (teacher = student) throughout epoch s
    unsup_weight: float = 1.0  # lambda_u (absent from both configs -> 1)
    drop_percent: float = 80.0  # alpha_t = (100 - drop_percent) * (1 - epoch/E) % of pixels dropped from L_u
    low_entropy_threshold: float = 20.0  # alpha_0 of the contrastive partition, also decayed by (1 - epoch/E)
    low_rank: int = 3  # r_l
    high_rank: int = 20  # r_h
    anchor_threshold: float = 0.3  # delta_p
    negative_threshold: float = 1.0  # delta_n
    num_anchors: int = 256  # anchors sampled per class, with replacement
    num_negatives: int = 50  # negatives per anchor, with replacement
    temperature: float = 0.5  # tau of the InfoNCE
    bank_size: int = 30_000  # memory-bank rows per class ...
    bank_size_class0: int = 50_000  # ... and for class 0
    contrast_weight: float = 1.0  # loss_weight (absent -> 1); effective weight contrast_weight / reference_world_size
    cutmix_prob: float = 0.5  # one draw per iteration, the same on every process
    negatives_require_label: bool = True  # faithful; false: negatives of any label (the paper)
    fix_class_indexing: bool = False  # faithful index bug; true: anchors, positive and bank all of class v_k
    label_pad_value: int = 0  # faithful: padded crop pixels are class 0; 255 ignores them
    ema_buffers: bool = False  # faithful: the teacher's BN statistics come from its own train-mode forwards
    per_image_onehot: bool = False  # faithful batch-slot-0 union one-hot; true: an ordinary one-hot


@dataclass(frozen=True)
class CpsConfig:
    """CPS as its official code behaves (shared/methods/CPS.md §2-3); alternatives are flags (docs/methods.md)."""

    cps_weight: float  # 5 Cityscapes, 1 VOC with CutMix; 6 / 1.5 for plain CPS (§3): no universal value
    reference_world_size: int  # W_ref: loss x 1/W_ref, the reference's gradient scale (§2.A item 9): 8 / 4; 1 = none
    cutmix: bool = True  # the reported configuration (§2.A); false = plain CPS (§2.C)
    n_boxes: int = 3  # toggled boxes per image, every CPS config (§2.B)
    box_prop_range: tuple[float, float] = (0.25, 0.5)  # p ~ U(lo, hi), box area p / n_boxes (§2.B)
    head_init: Literal["kaiming_fan_in", "toolkit"] = "kaiming_fan_in"  # reference head init (§3); toolkit = torch's
    ignore_padding_in_unsup: bool = False  # faithful trains on padded unlabeled pixels (README §3 item 4)
    eval_f2: bool = False  # also score f2 each evaluation; the reference evaluates f1 only (§2.E)


@dataclass(frozen=True)
class DualTeacherConfig:
    """Dual Teacher as its official (SegFormer) code behaves (shared/methods/DualTeacher.md §2-3; docs/methods.md).

    Every default is the official value except ``drop_path_rate``, an assumption for the ResNet student (§3, §5).
    """

    drop_path_rate: float = 0.1  # student stochastic depth p_max (ASSUMED for ResNet: the MiT value); teachers 0
    ema_decay: float = 0.99  # cap of alpha = min(1 - 1/(i + 1), cap), i = iteration within the epoch (§2 item 7)
    conf_threshold: float = 0.95  # CutMix image weights, ClassMix batch weight, consistency mask (§3)
    mix_weight: float = 1.0  # L_mix (§2 item 6)
    consistency_weight: float = 0.2  # L_ic (§2 item 6)
    quantise_conf: bool = True  # faithful: CutMix confidences pass through 8 bits (conf counts iff >= 243/255)
    post_mix_augment: bool = True  # faithful: per-image jitter p 0.8, blur p 0.5, flip p 0.5 after CutMix (§2 3c)
    strong_view: Literal["normalised", "pixel"] = "normalised"  # faithful: jitter on normalised tensors, clamped
    consistency_mask_from_labeled: bool = True  # faithful: L_ic mask/normaliser from the labeled batch's 255s (§4.7)
    second_teacher_forward: bool = True  # faithful: L_ic pseudo-labels from a second train-mode teacher forward
    eval_model: Literal["student", "teacher"] = "student"  # selected and exported; the reference validates the student


@dataclass(frozen=True)
class CctConfig:
    """CCT as the DeepLabV3+ port runs it (shared/methods/CCT.md §2.B, §3); the official settings are flags.

    Decoder counts per perturbation: the port's 2 of each kind but VAT is the default (K = 12); the official CCT
    uses vat 2, dropout 6, cutout 6, context 2, object 2, feature_drop 6, feature_noise 6 (K = 30).
    """

    reference_world_size: int  # W_ref: loss x 1/W_ref, the port's gradient scale (§2.B item 6): 4 VOC; 1 = none
    unsup_weight: float = 30.0  # w_u
    rampup_epochs: int = 0  # sigmoid ramp of w_u over the first epochs; 0 = constant (port); official 8 of 80
    vat: int = 0  # intermediate VAT decoders (official only)
    dropout: int = 2  # channel dropout (Dropout2d)
    cutout: int = 2  # guided cutout
    context_masking: int = 2
    object_masking: int = 2
    feature_drop: int = 2
    feature_noise: int = 2
    drop_rate: float = 0.5  # Dropout2d p
    erase: float = 0.4  # guided cutout box side / object bounding-box side
    cutout_min_vertices: int = 50  # only objects whose simplified contour has more vertices are cut
    vat_xi: float = 1e-6
    vat_eps: float = 2.0
    noise_amplitude: float = 0.3  # feature noise N ~ U(-a, a)
    feature_drop_range: tuple[float, float] = (0.7, 0.9)  # feature drop threshold = max attention x U(lo, hi)
    supervised: Literal["abce", "loss"] = "abce"  # abce: the port's annealed-bootstrapped CE; loss: the loss: section
    abce_final_threshold: float = 0.99  # abCE's tau anneals from 1/C to this ...
    abce_anneal_fraction: float = 0.4  # ... over this fraction of the training iterations
    abce_min_kept_per_image: int = 1  # abCE keeps at least (this x labeled batch) hardest pixels
    no_decay_bn_bias: bool = True  # port: BN parameters and biases without weight decay; false: decay everything
    ignore_padding_in_unsup: bool = False  # faithful: L_u also on padded unlabeled pixels (methods/README §3 item 4)


@dataclass(frozen=True)
class StPpConfig:
    """ST / ST++ as the reference behaves (shared/methods/STPlusPlus.md §2-3): an offline pipeline of trainings.

    The user sets the first group; ``stage`` and ``pseudo_labels`` are written by the pipeline (`imas_train.st_pp`)
    into each stage training's config and stay at their defaults in an experiment file.
    """

    plus: bool = True  # ST++ (reliability split, two re-trainings); false = ST (one re-training on everything)
    checkpoints: int = 3  # K supervised checkpoints, at the end of epochs floor(j * E / K), j = 1..K
    reliable_fraction: float = 0.5  # the top floor(fraction * N_u) by stability are re-trained on first
    tta_scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.5, 2.0)  # pseudo-labelling scales, each with and w/o flip
    tta_flip: bool = True
    double_labeled_below: int = 200  # the supervised stage repeats the labeled list twice when N_l < this
    strong_aug: Literal["pseudo", "all", "none"] = "pseudo"  # SDA + Cutout on: pseudo-labeled images (faithful)
    stage_epochs: tuple[int, ...] | None = None  # epochs of each training stage; None: optim.epochs for each
    stage: Literal["pipeline", "supervised", "retrain"] = "pipeline"  # set by the pipeline for its trainings
    pseudo_labels: tuple[Path, ...] = ()  # set by the pipeline: the pseudo-mask folders a re-training reads


@dataclass(frozen=True)
class EvalConfig:
    """Validation protocol (docs/algorithm.md §8)."""

    protocol: Literal["imas", "full_tiles", "whole"]  # imas for Cityscapes, whole for VOC
    window: int = DEFAULT_WINDOW
    stride: int | None = None  # None: floor(window * 2 / 3), 512 for 769
    every_epochs: int = 1
    student: bool = False  # also evaluate the student (the reference does; costs as much again)
    batch_size: int = 1


@dataclass(frozen=True)
class RunConfig:
    """Where and how a run executes."""

    output_dir: Path
    seed: int = 2
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None  # None: take accelerate launch's setting
    log_every: int = 20
    checkpoint_every: int = 500  # iterations between resumable checkpoints (also written at each epoch end)
    keep_checkpoints: int = 3
    compile: bool = False
    channels_last: bool = False
    deterministic: bool = False  # torch deterministic algorithms; cudnn benchmark off
    tensorboard: bool = True
    easiness_csv: bool = True
    cpu_threads: int | None = None  # torch intra-op threads per process on the CPU; None: imas_train.threads' policy


@dataclass(frozen=True)
class TrainConfig:
    """One experiment: the shared sections, the method, and the method's own section (docs/design.md "Methods").

    A method's section is required when that method runs and ignored otherwise, so one file can switch methods
    with ``--set method=...``.
    """

    model: ModelConfig
    data: DataConfig
    loss: LossConfig
    optim: OptimConfig
    eval: EvalConfig
    run: RunConfig
    method: Literal["imas", "supervised", "u2pl", "cps", "st_pp", "cct", "dual_teacher"] = "imas"  # imas_train.methods
    imas: ImasConfig | None = None  # method 'imas' (docs/algorithm.md)
    u2pl: U2plConfig | None = None  # method 'u2pl' (shared/methods/U2PL.md)
    cps: CpsConfig | None = None  # method 'cps' (shared/methods/CPS.md)
    cct: CctConfig | None = None  # method 'cct' (shared/methods/CCT.md)
    st_pp: StPpConfig | None = None  # method 'st_pp' (shared/methods/STPlusPlus.md); absent: the defaults
    dual_teacher: DualTeacherConfig | None = None  # method 'dual_teacher' (methods/DualTeacher.md); absent: defaults


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_config(path: Path | str, overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """Read a YAML experiment file, apply `section.key=value` overrides, and return a checked TrainConfig.

    An error that an override brings in names that override (``--set optim.lrr=0.1: ...``), not the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    file_raw = copy.deepcopy(raw)
    for item in overrides:
        apply_override(raw, item)

    def checked(source: dict[str, Any]) -> TrainConfig:
        cfg: TrainConfig = from_dict(TrainConfig, source, where=str(path))
        check_consistency(cfg)
        return cfg

    try:
        return checked(raw)
    except ConfigError as err:
        if not overrides:
            raise
        message = str(err)
        # the first override after which the same error appears brought it in; none: the file's own error
        culprit, partial = None, copy.deepcopy(file_raw)
        for i, item in enumerate([None, *overrides]):
            if item is not None:
                apply_override(partial, item)
            try:
                checked(copy.deepcopy(partial))
            except ConfigError as step_err:
                if str(step_err) == message:
                    culprit = item if i else None
                    break
        if culprit is None:
            raise
        prefix = f"{path}: "
        detail = message[len(prefix) :] if message.startswith(prefix) else message
        raise ConfigError(f"--set {culprit}: {detail}") from err


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=value` override to a raw config dict; the value is parsed with yaml.safe_load."""
    if "=" not in item:
        raise ConfigError(f"--set {item}: an override must look like section.key=value")
    dotted, value = item.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set {item}: an override must look like section.key=value")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item}: {key!r} is not a section")
    try:
        node[keys[-1]] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item}: the value is not valid YAML ({' '.join(str(err).split())})") from err


def check_consistency(cfg: TrainConfig) -> None:
    """Cross-field checks that no single annotation can express."""
    d = cfg.data
    if d.dataset != "demo" and d.root is None:
        raise ConfigError(f"data.root is required for dataset {d.dataset!r}")
    if d.dataset != "demo" and (d.labeled_list is None or d.val_list is None):
        raise ConfigError("data.labeled_list and data.val_list are required (see README 'Split lists')")
    if cfg.method == "imas" and d.dataset != "demo" and d.unlabeled_list is None:
        raise ConfigError("data.unlabeled_list is required for method 'imas' (or set method: supervised)")
    if d.dataset == "folder" and not d.class_names:
        raise ConfigError("data.class_names is required for dataset 'folder'")
    if d.class_names is not None and len(d.class_names) != cfg.model.num_classes:
        raise ConfigError(
            f"data.class_names has {len(d.class_names)} names but model.num_classes is {cfg.model.num_classes}"
        )
    for name, val in (
        ("data.crop_size", d.crop_size),
        ("data.batch_size", d.batch_size),
        ("optim.epochs", cfg.optim.epochs),
        ("eval.window", cfg.eval.window),
        ("optim.grad_accum_steps", cfg.optim.grad_accum_steps),
    ):
        if val < 1:
            raise ConfigError(f"{name} must be >= 1, got {val}")
    if cfg.eval.stride is not None and not 1 <= cfg.eval.stride <= cfg.eval.window:
        raise ConfigError(f"eval.stride must be in [1, eval.window={cfg.eval.window}], got {cfg.eval.stride}")
    o, inf = cfg.optim, float("inf")  # comparisons are False for NaN, so NaN fails every range below
    ranges = [  # (name, value, within range, the range in words)
        ("optim.lr", o.lr, 0.0 < o.lr < inf, "a finite number > 0"),
        ("optim.weight_decay", o.weight_decay, 0.0 <= o.weight_decay < inf, "a finite number >= 0"),
        ("optim.head_lr_mult", o.head_lr_mult, 0.0 < o.head_lr_mult < inf, "a finite number > 0"),
        ("optim.momentum", o.momentum, 0.0 <= o.momentum < 1.0, "in [0, 1)"),
        ("optim.poly_power", o.poly_power, 0.0 <= o.poly_power < inf, "a finite number >= 0"),
        ("optim.reference_global_batch", o.reference_global_batch, o.reference_global_batch >= 1, ">= 1"),
        ("optim.max_iters", o.max_iters, o.max_iters is None or o.max_iters >= 1, "null or >= 1"),
        ("loss.ohem_thresh", cfg.loss.ohem_thresh, 0.0 < cfg.loss.ohem_thresh <= 1.0, "in (0, 1]"),
        ("loss.ohem_min_kept", cfg.loss.ohem_min_kept, cfg.loss.ohem_min_kept >= 0, ">= 0"),
        ("loss.aux_weight", cfg.loss.aux_weight, 0.0 <= cfg.loss.aux_weight < inf, "a finite number >= 0"),
        ("data.scale_range", d.scale_range, 0.0 < d.scale_range[0] <= d.scale_range[1] < inf, "0 < lo <= hi"),
        ("data.long_side_range", d.long_side_range, 1 <= d.long_side_range[0] <= d.long_side_range[1], "1 <= lo <= hi"),
        ("data.base_size", d.base_size, min(d.base_size) >= 1, "two sizes >= 1"),
        ("data.num_workers", d.num_workers, d.num_workers >= 0, ">= 0"),
        ("data.demo.height/width", (d.demo.height, d.demo.width), min(d.demo.height, d.demo.width) >= 1, ">= 1"),
        ("eval.every_epochs", cfg.eval.every_epochs, cfg.eval.every_epochs >= 1, ">= 1"),
        ("eval.batch_size", cfg.eval.batch_size, cfg.eval.batch_size >= 1, ">= 1"),
        ("run.log_every", cfg.run.log_every, cfg.run.log_every >= 1, ">= 1"),
        ("run.checkpoint_every", cfg.run.checkpoint_every, cfg.run.checkpoint_every >= 1, ">= 1"),
        ("run.keep_checkpoints", cfg.run.keep_checkpoints, cfg.run.keep_checkpoints >= 1, ">= 1"),
    ]
    if cfg.imas is not None:
        m = cfg.imas
        ranges += [
            ("imas.ema_decay", m.ema_decay, 0.0 <= m.ema_decay <= 1.0, "in [0, 1]"),
            ("imas.unsup_weight", m.unsup_weight, 0.0 <= m.unsup_weight < inf, "a finite number >= 0"),
            ("imas.sup_only_epochs", m.sup_only_epochs, m.sup_only_epochs >= 0, ">= 0"),
            ("imas.cutmix_fixed_prob", m.cutmix_fixed_prob, 0.0 <= m.cutmix_fixed_prob <= 1.0, "in [0, 1]"),
        ]
    for name, value, within, allowed in ranges:
        if not within:
            raise ConfigError(f"{name} must be {allowed}, got {value}")
    if cfg.method == "imas" and cfg.imas is None:
        raise ConfigError("method 'imas' needs an imas: section (at least imas.tau; see configs/demo.yaml)")
    if cfg.method == "u2pl" and cfg.u2pl is None:
        raise ConfigError("method 'u2pl' needs a u2pl: section (at least sup_only_epochs and reference_world_size)")
    if cfg.u2pl is not None:
        u = cfg.u2pl
        if u.reference_world_size < 1 or not 0 <= u.low_rank < u.high_rank:
            raise ConfigError(
                f"u2pl: need reference_world_size >= 1 and 0 <= low_rank < high_rank, got {u.reference_world_size}, "
                f"{u.low_rank}, {u.high_rank}"
            )
        if not (0.0 <= u.drop_percent <= 100.0 and 0.0 <= u.low_entropy_threshold <= 100.0):
            raise ConfigError("u2pl.drop_percent and u2pl.low_entropy_threshold are percentages in [0, 100]")
    if cfg.imas is not None:
        if not 0.0 < cfg.imas.tau <= 1.0:
            raise ConfigError(f"imas.tau must be in (0, 1], got {cfg.imas.tau}")
        lo, hi = cfg.imas.cutmix_side_range
        if not 0.0 < lo <= hi < 1.0:
            raise ConfigError(f"imas.cutmix_side_range must satisfy 0 < lo <= hi < 1, got {(lo, hi)}")
    if cfg.method == "cps" and cfg.cps is None:
        raise ConfigError("method 'cps' needs a cps: section (at least cps_weight and reference_world_size)")
    if cfg.method == "cps" and d.dataset != "demo" and d.unlabeled_list is None:
        raise ConfigError("data.unlabeled_list is required for method 'cps'")
    if cfg.cps is not None:
        c = cfg.cps
        lo, hi = c.box_prop_range
        if c.cps_weight < 0 or c.reference_world_size < 1 or c.n_boxes < 1 or not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(
                f"cps: need cps_weight >= 0, reference_world_size >= 1, n_boxes >= 1 and 0 < lo <= hi <= 1 in "
                f"box_prop_range, got {c.cps_weight}, {c.reference_world_size}, {c.n_boxes}, {(lo, hi)}"
            )
    if cfg.method == "st_pp":
        _check_st_pp(cfg)
    _check_dual_teacher(cfg)
    if cfg.method == "cct":
        _check_cct(cfg)
    if cfg.model.aux_labeled_only and not cfg.model.aux_head:
        raise ConfigError("model.aux_labeled_only needs model.aux_head: true")


def dump_config(cfg: TrainConfig) -> str:
    """The resolved config as YAML text (loads back to an equal TrainConfig)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def model_config_from_dict(raw: dict[str, Any], where: str = "model_config") -> ModelConfig:
    """Rebuild a ModelConfig from an artifact's sidecar (strict, like the YAML loader)."""
    cfg: ModelConfig = from_dict(ModelConfig, raw, where)
    return cfg


def _check_st_pp(cfg: TrainConfig) -> None:
    """Method 'st_pp': its section's ranges and the data it needs."""
    s = cfg.st_pp or StPpConfig()
    if cfg.data.dataset != "demo" and cfg.data.unlabeled_list is None:
        raise ConfigError("data.unlabeled_list is required for method 'st_pp' (the images it pseudo-labels)")
    if s.checkpoints < 2:
        raise ConfigError(f"st_pp.checkpoints must be >= 2 (K: earlier checkpoints vs the last), got {s.checkpoints}")
    if not 0.0 < s.reliable_fraction < 1.0:
        raise ConfigError(f"st_pp.reliable_fraction must be in (0, 1), got {s.reliable_fraction}")
    if not s.tta_scales or not all(0.0 < x < float("inf") for x in s.tta_scales):
        raise ConfigError(f"st_pp.tta_scales must be one or more finite numbers > 0, got {list(s.tta_scales)}")
    stages = 3 if s.plus else 2
    if s.stage_epochs is not None and (len(s.stage_epochs) != stages or min(s.stage_epochs) < 1):
        raise ConfigError(
            f"st_pp.stage_epochs must list {stages} epoch counts >= 1 (supervised, then each re-training; "
            f"st_pp.plus={str(s.plus).lower()}), got {list(s.stage_epochs)}; or null for optim.epochs each"
        )
    if s.stage == "retrain" and not s.pseudo_labels:
        raise ConfigError("st_pp.stage 'retrain' needs st_pp.pseudo_labels (the pipeline sets both; leave them)")


def _check_cct(cfg: TrainConfig) -> None:
    """Method 'cct': its section, its ranges and the data it needs."""
    c = cfg.cct
    if c is None:
        raise ConfigError("method 'cct' needs a cct: section (at least reference_world_size; see configs/demo.yaml)")
    if cfg.data.dataset != "demo" and cfg.data.unlabeled_list is None:
        raise ConfigError("data.unlabeled_list is required for method 'cct'")
    counts = {k: getattr(c, k) for k in ("vat", "dropout", "cutout", "context_masking", "object_masking",
                                         "feature_drop", "feature_noise")}  # fmt: skip
    if min(counts.values()) < 0 or sum(counts.values()) < 1:
        raise ConfigError(f"cct: decoder counts must be >= 0 with at least one decoder in all, got {counts}")
    lo, hi, inf = *c.feature_drop_range, float("inf")
    ranges = [  # (name, value, within range, the range in words); NaN fails every one
        ("cct.reference_world_size", c.reference_world_size, c.reference_world_size >= 1, ">= 1"),
        ("cct.unsup_weight", c.unsup_weight, 0.0 <= c.unsup_weight < inf, "a finite number >= 0"),
        ("cct.rampup_epochs", c.rampup_epochs, c.rampup_epochs >= 0, ">= 0"),
        ("cct.drop_rate", c.drop_rate, 0.0 <= c.drop_rate < 1.0, "in [0, 1)"),
        ("cct.erase", c.erase, 0.0 <= c.erase <= 1.0, "in [0, 1]"),
        ("cct.cutout_min_vertices", c.cutout_min_vertices, c.cutout_min_vertices >= 0, ">= 0"),
        ("cct.vat_xi", c.vat_xi, 0.0 < c.vat_xi < inf, "a finite number > 0"),
        ("cct.vat_eps", c.vat_eps, 0.0 <= c.vat_eps < inf, "a finite number >= 0"),
        ("cct.noise_amplitude", c.noise_amplitude, 0.0 <= c.noise_amplitude < inf, "a finite number >= 0"),
        ("cct.feature_drop_range", c.feature_drop_range, 0.0 <= lo <= hi <= 1.0, "[lo, hi] with 0 <= lo <= hi <= 1"),
        ("cct.abce_final_threshold", c.abce_final_threshold, 0.0 < c.abce_final_threshold <= 1.0, "in (0, 1]"),
        ("cct.abce_anneal_fraction", c.abce_anneal_fraction, 0.0 <= c.abce_anneal_fraction <= 1.0, "in [0, 1]"),
        ("cct.abce_min_kept_per_image", c.abce_min_kept_per_image, c.abce_min_kept_per_image >= 0, ">= 0"),
    ]
    for name, value, within, allowed in ranges:
        if not within:
            raise ConfigError(f"{name} must be {allowed}, got {value}")


def _check_dual_teacher(cfg: TrainConfig) -> None:
    """Stochastic depth belongs to method 'dual_teacher' (and a supervised ablation); its section's ranges."""
    rate = cfg.model.drop_path_rate
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"model.drop_path_rate must be in [0, 1), got {rate}")
    if rate > 0.0 and cfg.method not in ("supervised",):
        where = "dual_teacher.drop_path_rate (its student's rate; teachers and the artifact have none)"
        raise ConfigError(
            f"model.drop_path_rate={rate} is not used with method {cfg.method!r}: set it to 0"
            + (f" and use {where}" if cfg.method == "dual_teacher" else " (stochastic depth is Dual Teacher's)")
        )
    if cfg.method != "dual_teacher":
        return
    if cfg.data.dataset != "demo" and cfg.data.unlabeled_list is None:
        raise ConfigError("data.unlabeled_list is required for method 'dual_teacher'")
    t = cfg.dual_teacher or DualTeacherConfig()
    checks = [
        ("drop_path_rate", t.drop_path_rate, 0.0 <= t.drop_path_rate < 1.0, "in [0, 1)"),
        ("ema_decay", t.ema_decay, 0.0 <= t.ema_decay <= 1.0, "in [0, 1]"),
        ("conf_threshold", t.conf_threshold, 0.0 < t.conf_threshold <= 1.0, "in (0, 1]"),
        ("mix_weight", t.mix_weight, 0.0 <= t.mix_weight < float("inf"), "finite, >= 0"),
        ("consistency_weight", t.consistency_weight, 0.0 <= t.consistency_weight < float("inf"), "finite, >= 0"),
    ]
    for name, value, within, allowed in checks:
        if not within:
            raise ConfigError(f"dual_teacher.{name} must be {allowed}, got {value}")
