"""Training checkpoints (gil_megatron/checkpoint.py) through the SFT stage's real entry point on a
tiny model: loading never runs pickled code.
"""

import contextlib
import importlib.util
import io
import os
import pickle
import shutil

import pytest
import torch

from dist_utils import run_single

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--hidden-size", "32", "--intermediate-size", "64", "--num-layers", "2", "--num-attention-heads", "4",
        "--num-kv-heads", "2", "--max-position-embeddings", "64", "--seed", "0"]
COMMON = ["train.global_batch_size=8", "train.micro_batch_size=2", "logging.progress=false", "optim.lr=1e-3"]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    """Miniature SFT data and a fresh tiny model directory (with its tokenizer)."""
    from gil_megatron.miniature.prepare import prepare

    root = tmp_path_factory.mktemp("ckpt")
    data = root / "data"
    prepare(str(data), seed=0, n_sft=32, n_prompts_train=8, n_prompts_eval=8, n_prompts_ood=8, n_rm_train=8,
            n_rm_eval=8)
    _tool("init_model").main(["--save-dir", str(root / "init"), "--tokenizer", str(data / "tokenizer"), *TINY])
    return root


def sft_args(root, run_dir, *extra):
    root = str(root)
    return [f"init={os.path.join(root, 'init')}", f"data.train={os.path.join(root, 'data', 'sft.jsonl')}",
            f"run_dir={run_dir}", *COMMON, *extra]


# ---- loading never unpickles arbitrary objects -------------------------------------------------
class _WritesMarker:
    """Unpickling this runs exec(...) and writes the marker file: what a tampered checkpoint does."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _pickle_files(ckpt_dir: str):
    """Every file of a checkpoint that Python would unpickle: torch.save zips and raw pickles."""
    found = []
    for dirpath, _, files in os.walk(ckpt_dir):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                head = f.read(2)
            if head[:2] == b"PK" or head[:1] == b"\x80":
                found.append(path)
    return sorted(found)


def _tamper_and_resume(root: str, run_dir: str, marker: str):
    """Write a checkpoint, then for each pickle-bearing file: replace it by a crafted pickle and resume.
    Returns {file: (exit code, stderr)} and whether the marker was ever written."""
    from gil_megatron.checkpoint import latest_checkpoint
    from gil_megatron.cli import run_cli

    sft = _tool("train_sft")
    sft.main(sft_args(root, run_dir, "train.steps=1", "checkpoint.resume=none"))
    ckpt = latest_checkpoint(run_dir)
    pristine = ckpt + ".pristine"
    shutil.copytree(ckpt, pristine)
    results = {}
    for path in _pickle_files(pristine):
        rel = os.path.relpath(path, pristine)
        shutil.rmtree(ckpt)
        shutil.copytree(pristine, ckpt)
        target = os.path.join(ckpt, rel)
        with open(path, "rb") as f:
            is_zip = f.read(2) == b"PK"
        if is_zip:
            torch.save(_WritesMarker(marker), target)
        else:
            with open(target, "wb") as f:
                pickle.dump(_WritesMarker(marker), f)
        err = io.StringIO()
        code = 0
        with contextlib.redirect_stderr(err):
            try:
                run_cli(sft.main, sft_args(root, run_dir, "train.steps=2", "checkpoint.resume=auto"))
            except SystemExit as exc:
                code = exc.code
        results[rel] = (code, err.getvalue())
    return results, os.path.exists(marker)


def test_crafted_pickle_in_a_checkpoint_is_refused(sft_data, tmp_path):
    marker = str(tmp_path / "MARKER")
    results, marker_written = run_single(_tamper_and_resume, str(sft_data), str(tmp_path / "run"), marker)
    assert results, "the checkpoint holds no pickle-bearing file to tamper with"
    assert not marker_written and not os.path.exists(marker)
    for rel, (code, err) in results.items():
        lines = [line for line in err.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error")]
        assert code == 2, (rel, code, err[-1000:])
        assert len(errors) == 1 and "Traceback" not in err, (rel, err[-1000:])
        assert "refusing to load" in errors[0], (rel, errors[0])
