"""train_mgn.py end to end on a tiny synthetic dataset: learning, outputs, exact resume, torchrun."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_mgn", ROOT / "train_mgn.py")
train_mgn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_mgn)

# 24 training identities of ~10 images, batches of 6 x 4: about 10 steps an epoch.
TINY = ["--synthetic-ids", "24", "12", "--ids-per-batch", "6", "--instances", "4", "--eval-batch-size", "64"]
TIMING_KEYS = {"images_per_second", "epoch_seconds"}


def _history(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_training_lowers_the_loss_and_writes_outputs(tmp_path):
    out = tmp_path / "run"
    results = train_mgn.main(TINY + ["--epochs", "4", "--eval-every", "2", "--output-dir", str(out)])
    history = _history(out / "metrics.jsonl")
    assert [r["epoch"] for r in history] == [0, 1, 2, 3, 4]
    losses = [r["loss"] for r in history[1:]]
    assert losses[-1] < losses[0]
    assert all(k in history[2] for k in ("rank1", "mAP", "mINP")) and "mAP" not in history[1]
    assert {"loss_id", "loss_triplet", "lr"} <= set(history[1])

    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert set(saved) == {"initial", "final", "train_seconds"}
    for key in ("initial", "final"):
        assert set(saved[key]) == {"rank1", "mAP", "mINP"}
        assert all(0.0 <= v <= 1.0 for v in saved[key].values())
    assert saved["initial"] == {k: history[0][k] for k in ("rank1", "mAP", "mINP")}
    assert saved["final"] == {k: history[-1][k] for k in ("rank1", "mAP", "mINP")}
    assert saved["train_seconds"] > 0
    with Image.open(out / "curves.png") as img:
        assert img.format == "PNG" and img.size[0] > 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)  # tensors and plain data only
    assert state["epoch"] == 4 and {"model", "optimizer", "rng", "history"} <= set(state)
    assert not any(name.endswith(".tmp") for name in os.listdir(out))

    # --eval-only reproduces the final evaluation from the checkpoint.
    evaluation = train_mgn.main(TINY + ["--epochs", "4", "--output-dir", str(out), "--resume", "--eval-only"])
    assert {k: evaluation[k] for k in ("rank1", "mAP", "mINP")} == saved["final"]
    assert json.loads((out / "evaluation.json").read_text()) == evaluation


def test_rerank_writes_metrics_with_and_without_re_ranking(tmp_path):
    out = tmp_path / "run"
    results = train_mgn.main(TINY + ["--epochs", "1", "--rerank", "--rerank-k1", "8", "--output-dir", str(out)])
    keys = {"rank1", "mAP", "mINP"}
    history = _history(out / "metrics.jsonl")
    assert [set(r["rerank"]) for r in history] == [keys, keys]  # the initial and the epoch-1 evaluation
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    for key, record in (("initial", history[0]), ("final", history[-1])):
        assert set(results[key]) == keys | {"rerank"}
        assert results[key] == {**{k: record[k] for k in keys}, "rerank": record["rerank"]}
        assert all(0.0 <= v <= 1.0 for v in results[key]["rerank"].values())
    # re-ranked, not the plain distances again
    assert any(results[key]["rerank"]["mAP"] != results[key]["mAP"] for key in ("initial", "final"))


@pytest.mark.parametrize("argv, message", [
    (["--rerank", "--rerank-k1", "0"], "--rerank: k1 must be an int >= 1, got 0"),
    (["--rerank", "--rerank-lambda", "1.5"], r"--rerank: lambda_value must be in \[0, 1\], got 1.5"),
    (["--rerank-k2", "3"], "--rerank-k2 is an option of --rerank"),
])
def test_rerank_options_are_checked_at_start(argv, message, capsys):
    with pytest.raises(SystemExit):
        train_mgn.parse_args(argv)
    assert re.search(message, capsys.readouterr().err)


def test_ubat_recipe_on_visible_infrared_data(tmp_path):
    results = train_mgn.main([
        "--dataset", "synthetic-vi", "--recipe", "ubat", "--epochs", "1", "--output-dir", str(tmp_path),
        "--synthetic-ids", "12", "6", "--ids-per-batch", "4", "--instances", "2",
    ])
    history = _history(tmp_path / "metrics.jsonl")
    assert "loss_hetero_center" in history[1] and all(0 <= v <= 1 for v in results["final"].values())


class _Interrupted(Exception):
    pass


def test_resume_continues_exactly(tmp_path, monkeypatch):
    args = TINY + ["--epochs", "3", "--eval-every", "1", "--warmup-epochs", "1"]
    train_mgn.main(args + ["--output-dir", str(tmp_path / "straight")])

    # Crash right after the checkpoint of epoch 2 is written, then resume.
    real_save = train_mgn.save_checkpoint

    def save_then_crash(path, state):
        real_save(path, state)
        if state["epoch"] == 2:
            raise _Interrupted

    monkeypatch.setattr(train_mgn, "save_checkpoint", save_then_crash)
    with pytest.raises(_Interrupted):
        train_mgn.main(args + ["--output-dir", str(tmp_path / "resumed")])
    monkeypatch.setattr(train_mgn, "save_checkpoint", real_save)
    train_mgn.main(args + ["--output-dir", str(tmp_path / "resumed"), "--resume"])

    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for key in pa:
            assert torch.equal(pa[key], pb[key]), key
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    assert torch.equal(a["rng"][0]["numpy"]["keys"], b["rng"][0]["numpy"]["keys"])
    assert a["rng"][0]["python"] == b["rng"][0]["python"]
    strip = lambda h: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in h]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])
    assert strip(_history(tmp_path / "resumed" / "metrics.jsonl")) == strip(a["history"])
    ra = json.loads((tmp_path / "straight" / "results.json").read_text())
    rb = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert ra["initial"] == rb["initial"] and ra["final"] == rb["final"]


def test_resume_without_checkpoint_is_explained(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
        train_mgn.main(TINY + ["--epochs", "1", "--output-dir", str(tmp_path), "--resume"])


def test_real_dataset_needs_data_root():
    with pytest.raises(SystemExit):
        train_mgn.parse_args(["--dataset", "market1501"])


def test_torchrun_two_processes_on_cpu(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(ROOT / "train_mgn.py"), *TINY, "--epochs", "2", "--global-mining", "--output-dir", str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert all(0 <= v <= 1 for v in results["final"].values())
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert len(state["rng"]) == 2  # every rank's RNG state, for an exact resume
    history = _history(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in history] == [0, 1, 2]


# --------------------------------------------------------------------------- the UBAT system


def test_ubat_model_learns_on_visible_infrared_data(tmp_path):
    results = train_mgn.main([
        "--model", "ubat", "--dataset", "synthetic-vi", "--synthetic-ids", "60", "30", "--ids-per-batch", "8",
        "--instances", "2", "--epochs", "4", "--output-dir", str(tmp_path), "--eval-batch-size", "128",
    ])
    args = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["args"]
    assert args["model"] == "ubat" and args["recipe"] == "ubat"  # the model's own recipe by default
    assert "loss_hetero_center" in _history(tmp_path / "metrics.jsonl")[1]
    assert results["final"]["mAP"] > results["initial"]["mAP"] + 0.01


def test_random_grayscale_only_on_visible_images():
    args = train_mgn.parse_args(["--model", "ubat", "--dataset", "synthetic-vi", "--ids-per-batch", "2"])
    data = train_mgn.make_synthetic(0, num_train_ids=4, num_test_ids=2, infrared=True)
    train_loader, _, _ = train_mgn.make_loaders(args, data, 0, 1, torch.device("cpu"))
    transforms = train_loader.dataset.transform
    assert transforms[0].grayscale_p == 0.5 and transforms[1].grayscale_p == 0.0
    assert transforms[0].train and transforms[1].train


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    """A finished 1-epoch run (Adam, the cpu preset's defaults); tests resume from copies of its checkpoint."""
    out = tmp_path_factory.mktemp("one_epoch")
    train_mgn.main(TINY + ["--epochs", "1", "--output-dir", str(out)])
    return out / "checkpoint.pt"


class _CreatesFileWhenUnpickled:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_crafted_checkpoint_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 1, "model": {}, "payload": _CreatesFileWhenUnpickled(str(marker))}, checkpoint)
    refused = r"not a checkpoint this trainer can load safely \(it refers to io.open, which is not plain data\)"
    for extra in ([], ["--eval-only"]):
        with pytest.raises(SystemExit, match=refused):
            train_mgn.main(TINY + ["--epochs", "2", "--output-dir", str(tmp_path / "run"), "--resume", str(checkpoint),
                                   *extra])
        assert not marker.exists()


def test_checkpoint_without_trainer_state_is_named(tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 1, "model": {}}, checkpoint)
    with pytest.raises(SystemExit, match="lacks optimizer, rng, history"):
        train_mgn.main(TINY + ["--epochs", "2", "--output-dir", str(tmp_path), "--resume", str(checkpoint)])


@pytest.mark.parametrize("changed, named", [
    (["--optimizer", "sgd"], ["--optimizer 'adam' (now 'sgd')"]),
    (["--recipe", "ubat", "--seed", "3", "--lr", "0.01"],
     ["--recipe 'mgn' (now 'ubat')", "--seed 0 (now 3)", "--lr 0.006 (now 0.01)", "--margin 1.2 (now 0.25)"]),
    (["--model", "ubat"], ["--model 'mgn' (now 'ubat')", "--recipe 'mgn' (now 'ubat')"]),
])
def test_resume_with_other_arguments_names_them(one_epoch_run, tmp_path, changed, named):
    with pytest.raises(SystemExit) as info:
        train_mgn.main(TINY + ["--epochs", "2", "--output-dir", str(tmp_path), "--resume", str(one_epoch_run),
                               *changed])
    message = str(info.value)
    assert message.startswith("--resume: the checkpoint was written with other arguments")
    assert all(part in message for part in named), message
    # --eval-only needs only the same network.
    if "--model" not in changed:
        evaluation = train_mgn.main(TINY + ["--output-dir", str(tmp_path), "--resume", str(one_epoch_run),
                                            "--eval-only", *changed])
        assert 0 <= evaluation["mAP"] <= 1


def test_resume_with_nothing_left_to_train_says_so(one_epoch_run, tmp_path):
    with pytest.raises(SystemExit, match="nothing to train: the checkpoint is after epoch 1 and --epochs is 1"):
        train_mgn.main(TINY + ["--epochs", "1", "--output-dir", str(tmp_path), "--resume", str(one_epoch_run)])


def test_resume_with_more_epochs_says_the_schedule_changes(one_epoch_run, tmp_path, capsys):
    results = train_mgn.main(TINY + ["--epochs", "2", "--output-dir", str(tmp_path), "--resume", str(one_epoch_run)])
    assert "--epochs 2 differs from the checkpoint's 1" in capsys.readouterr().out
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 2 and "mAP" in results["final"]


def test_eval_every_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        train_mgn.parse_args(["--eval-every", "0"])
    assert "--eval-every must be >= 1, got 0" in capsys.readouterr().err


def test_checkpoint_is_on_disk_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(train_mgn.os, "fsync", fsync)
    monkeypatch.setattr(train_mgn.os, "replace", replace)
    path = str(tmp_path / "checkpoint.pt")
    train_mgn.save_checkpoint(path, {"epoch": 1, "weight": torch.ones(3)})
    assert events == [("fsync", path + ".tmp"), ("replace", path + ".tmp", path), ("fsync", str(tmp_path))]
    assert torch.equal(torch.load(path, weights_only=True)["weight"], torch.ones(3))
