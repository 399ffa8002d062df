"""Two CPU processes (gloo, started by torchrun) score an odd number of val images: each exactly once.

`accelerate launch --cpu --num_processes 2` silently runs ONE process, so the test uses torchrun, which Accelerate
picks up from the environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SETUP = textwrap.dedent(
    """
    import torch
    from imas_train.config import DataConfig, DemoConfig, ModelConfig
    from imas_train.data import build_datasets, make_val_loader
    from imas_train.models import build_model

    data = build_datasets(
        DataConfig(dataset="demo", crop_size=33, batch_size=2, scale_mode="relative",
                   demo=DemoConfig(num_labeled=2, num_unlabeled=2, num_val=5, height=24, width=40)),
        num_classes=5,
    )
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_classes=5, aux_head=False, layers=(1, 1, 1, 1), base_width=8,
                                    aspp_channels=16, low_level_channels=8, decoder_channels=16)).eval()
    with torch.no_grad():
        model.classifier[-1].weight.mul_(30.0)  # varied predictions from an untrained model
    """
)
SCRIPT = SETUP + textwrap.dedent(
    """
    import json, sys
    from accelerate import Accelerator
    from imas_train.evaluate import evaluate

    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(make_val_loader(data.val, batch_size=int(sys.argv[2])))
    result = evaluate(model, loader, accelerator, num_classes=5, window=24, stride=16, protocol="imas")
    if accelerator.is_main_process:
        with open(sys.argv[1], "w") as fh:
            json.dump({"world": accelerator.num_processes, "inter": result.inter.tolist(),
                       "union": result.union.tolist(), "indices": result.indices}, fh)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the gloo process group before exit
    """
)


def _run(tmp_path: Path, nproc: int, batch_size: int) -> dict:
    script = tmp_path / "evaluate_script.py"
    script.write_text(SCRIPT)
    out = tmp_path / f"result_{nproc}_{batch_size}.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", f"--nproc_per_node={nproc}", str(script), str(out), str(batch_size)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _single_process_reference() -> dict:
    """The same counts without Accelerate: every image once, summed in one process."""
    import torch

    from imas_train.augment import normalise_images
    from imas_train.metrics import intersection_union
    from imas_train.sliding_window import predict_sliding

    scope: dict = {}
    exec(SETUP, scope)
    inter = union = 0
    for i in range(len(scope["data"].val)):
        item = scope["data"].val[i]
        with torch.no_grad():
            probs = predict_sliding(scope["model"], normalise_images(item["image"][None]), 5, 24, 16, "imas")
        i_, u_ = intersection_union(probs.argmax(1), item["label"][None], 5)
        inter, union = inter + i_.sum(0), union + u_.sum(0)
    return {"inter": inter.tolist(), "union": union.tolist()}


@pytest.mark.slow
def test_two_processes_count_each_val_image_once(tmp_path: Path) -> None:
    single = _single_process_reference()
    double = _run(tmp_path, 2, 2)  # 5 images, 2 per batch, 2 processes: 3 batches, the 4th slot is padding
    assert double["world"] == 2
    assert double["indices"] == [0, 1, 2, 3, 4]
    assert double["inter"] == single["inter"] and double["union"] == single["union"]
    assert sum(single["union"]) > 0 and sum(single["inter"]) > 0


@pytest.mark.slow
def test_two_process_training_run(tmp_path: Path) -> None:
    """`torchrun -m imas_train` on CPU: gloo DDP (Accelerate needs cpu=True there), one easiness row per image."""
    from imas_train.teacher_artifact import load_teacher

    run = tmp_path / "run"
    overrides = [
        "data.demo.num_labeled=4", "data.demo.num_unlabeled=8", "data.demo.num_val=3", "data.demo.height=40",
        "data.demo.width=48", "data.crop_size=33", "data.batch_size=2", "eval.window=48", "optim.epochs=1",
        "run.tensorboard=false", "imas.sup_only_epochs=0",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "imas_train",
           "--config", str(REPO / "configs" / "demo.yaml"), "--output-dir", str(run), "--set", *overrides]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "devices: 2 process(es)" in proc.stderr
    rows = (run / "easiness" / "epoch_000.csv").read_text().split()[1:]
    assert sorted(int(r.split(",")[0]) for r in rows) == list(range(8))  # 2 ranks x 2 iterations x 2 images
    assert {p.name for p in (run / "state" / "step-00000002").glob("random_states_*")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    _, meta = load_teacher(run / "teacher.safetensors")
    assert meta.training_summary["world_size"] == 2


RANK_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import imas_train.train as loop
    from imas_train.config import load_config

    built = []
    original = loop.build_method

    def remember(cfg):
        built.append(original(cfg))
        return built[-1]

    loop.build_method = remember
    cfg = load_config(sys.argv[1], sys.argv[3:])
    loop.train(cfg)
    method = built[0]
    state = method.teacher.state_dict()
    digest = hashlib.sha256(b"".join(state[k].cpu().contiguous().numpy().tobytes() for k in sorted(state)))
    record = {"sha256": digest.hexdigest(), "keys": len(state)}
    bank = getattr(method, "bank", None)
    if bank is not None:
        record["bank_rows"] = [bank.count(c) for c in range(bank.num_classes)]
        record["bank_sha256"] = hashlib.sha256(b"".join(q.numpy().tobytes() for q in bank.queues)).hexdigest()
    with open(os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.json"), "w") as fh:
        json.dump(record, fh)
    """
)

U2PL_SMALL = [
    "method=u2pl", "u2pl.sup_only_epochs=0", "u2pl.num_anchors=8", "u2pl.num_negatives=4", "u2pl.bank_size=300",
    "u2pl.bank_size_class0=400", "model.rep_channels=16", "u2pl.ema_buffers=false", "u2pl.cutmix_prob=1.0",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("method", ["imas", "u2pl"])
def test_two_process_training_keeps_identical_teachers(tmp_path: Path, method: str) -> None:
    """After `train()` under torchrun (2 gloo processes, per-process BN), both ranks hold the same teacher bytes,
    and they are the bytes of the exported artifact; for U2PL the memory banks, filled from both processes'
    negatives, are identical too."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    script = tmp_path / "rank_teacher.py"
    script.write_text(RANK_SCRIPT)
    overrides = [
        f"run.output_dir={run}", "data.demo.num_labeled=4", "data.demo.num_unlabeled=8", "data.demo.num_val=2",
        "data.demo.height=40", "data.demo.width=48", "data.crop_size=33", "data.batch_size=2", "eval.window=48",
        "optim.epochs=2", "run.tensorboard=false", "imas.sup_only_epochs=0", "run.easiness_csv=false",
        *(U2PL_SMALL if method == "u2pl" else []),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", str(script), str(REPO / "configs" / "demo.yaml"),
           str(tmp_path), *overrides]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0]["keys"] > 10
    if method == "u2pl":
        assert sum(ranks[0]["bank_rows"]) > 0  # negatives of both processes were banked, identically
    saved = load_file(str(run / "teacher.safetensors"))
    digest = hashlib.sha256(b"".join(saved[k].contiguous().numpy().tobytes() for k in sorted(saved)))
    assert digest.hexdigest() == ranks[0]["sha256"]
