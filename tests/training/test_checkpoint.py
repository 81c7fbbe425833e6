"""Training checkpoints (gil_megatron/training/checkpoint.py) through the SFT stage's real entry point on a
tiny model:

- a checkpoint saved at TP2 resumes at TP1 (one rank), at DP2 and at PP2 with the same next-step
  loss, gradient norm and weights as resuming at TP2 (fp32 tolerance); resuming at TP2 equals an
  uninterrupted run bit for bit;
- loading never runs pickled code: every pickle-bearing file replaced by a code-running pickle is
  refused with one line;
- a checkpoint saved with a virtual pipeline (PP2, two chunks per rank) resumes bit-identically and
  at plain PP2;
- bf16 parameters with fp32 main weights at DP2: megatron's DistributedOptimizer takes the plain
  mixed-precision optimizer's steps, and its checkpoint resumes exactly (slow).
"""

import contextlib
import importlib.util
import io
import json
import multiprocessing
import os
import pickle
import shutil

import pytest
import torch

from dist_utils import run_single, spawn

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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


# ---- resume at another layout -------------------------------------------------------------------
def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _weights(model_dir):
    from gil_megatron.models.weights import hf_tensors_of_checkpoint

    return dict(hf_tensors_of_checkpoint(model_dir))


def _copy_run(src, dst):
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
    torch.distributed.barrier()


def _resumes(root: str, out: str, saved_layout, layouts, straight: bool, *extra):
    """On every rank: train 2 steps at ``saved_layout`` (a checkpoint), then for each of ``layouts``
    resume a copy of that run for a third step; optionally 3 steps straight at ``saved_layout``."""
    from gil_megatron.parallel import distributed

    distributed.initialize(1, 1)
    sft = _tool("train_sft")
    saved = os.path.join(out, "saved")
    if saved_layout is not None:
        sft.main(sft_args(root, saved, "train.steps=2", *saved_layout, *extra))
    for name, layout in layouts.items():
        _copy_run(saved, os.path.join(out, name))
        sft.main(sft_args(root, os.path.join(out, name), "train.steps=3", "checkpoint.resume=auto", *layout, *extra))
    if straight:
        sft.main(sft_args(root, os.path.join(out, "straight"), "train.steps=3", *saved_layout, *extra))
    # saves are synchronous: no helper process (megatron's Manager) outlives them to orphan on a crash
    assert not multiprocessing.active_children(), multiprocessing.active_children()


STEP_KEYS = ("train/loss", "train/tokens", "optim/grad_norm", "optim/lr")


def _check_resumes(out, names, exact_to=None, rtol=1e-5, atol=1e-6, same="tp2"):
    """Step 3 of each resumed run vs the same-layout resume ``same``: metrics and final weights."""
    ref_m, ref_w = _metrics(os.path.join(out, same))[-1], _weights(os.path.join(out, same, "model"))
    assert ref_m["iteration"] == 3
    from gil_megatron.training.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(os.path.join(out, same))
    assert os.path.isfile(os.path.join(ckpt, "model", "tokenizer.json"))  # the checkpoint's model travels
    for name in names:
        m, w = _metrics(os.path.join(out, name))[-1], _weights(os.path.join(out, name, "model"))
        assert m["iteration"] == 3, name
        for k in STEP_KEYS:
            assert m[k] == pytest.approx(ref_m[k], rel=rtol, abs=atol), (name, k, m[k], ref_m[k])
        assert sorted(w) == sorted(ref_w)
        for t in w:
            torch.testing.assert_close(w[t], ref_w[t], rtol=rtol, atol=atol, msg=f"{name}: {t}")
    if exact_to is not None:  # same layout: bit for bit the uninterrupted run
        straight = [{k: m[k] for k in STEP_KEYS} for m in _metrics(os.path.join(out, exact_to))]
        resumed = [{k: m[k] for k in STEP_KEYS} for m in _metrics(os.path.join(out, same))]
        assert straight == resumed
        ws = _weights(os.path.join(out, exact_to, "model"))
        assert all(torch.equal(ws[t], ref_w[t]) for t in ws)


def test_resume_at_another_layout(sft_data, tmp_path):
    out = str(tmp_path)
    spawn(_resumes, 2, str(sft_data), out, ["parallel.tp=2"],
          {"tp2": ["parallel.tp=2"], "dp2": ["parallel.tp=1"], "pp2": ["parallel.pp=2"]}, True)
    spawn(_resumes, 1, str(sft_data), out, None, {"tp1": []}, False)
    _check_resumes(out, ["tp1", "dp2", "pp2"], exact_to="straight")


def test_virtual_pipeline_resumes_exactly_and_at_plain_layouts(sft_data, tmp_path):
    """Saved at PP2 with two chunks per rank (4 layers): resuming there is bit-identical to an
    uninterrupted run; resuming at plain PP2 takes the same third step (megatron keys every layer
    by its global index, so the chunks' checkpoint is the plain pipeline's)."""
    out = str(tmp_path)
    init = os.path.join(out, "init4")
    tiny4 = [a if a != "2" or TINY[i - 1] != "--num-layers" else "4" for i, a in enumerate(TINY)]
    _tool("init_model").main(["--save-dir", init, "--tokenizer", str(sft_data / "data" / "tokenizer"), *tiny4])
    vp = ["parallel.pp=2", "parallel.virtual_pp=2"]
    spawn(_resumes, 2, str(sft_data), out, vp, {"vp2": vp, "pp2": ["parallel.pp=2"]}, True,
          f"init={init}")
    from gil_megatron.models.weights import arch_of

    assert arch_of(os.path.join(out, "vp2", "model"))[3] == 4  # one stage file per chunk
    _check_resumes(out, ["pp2"], exact_to="straight", same="vp2")


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


def _tamper_common_state(ckpt: str, marker: str) -> None:
    """Point megatron's common-state entry (a byte object inside a .distcp file, which torch's load
    planner unpickles with weights_only=False) at a code-running pickle appended to that file."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    meta_path = os.path.join(ckpt, "dist", ".metadata")
    with open(meta_path, "rb") as f:
        meta = pickle.load(f)
    evil = io.BytesIO()
    torch.save(_WritesMarker(marker), evil)
    for index, info in list(meta.storage_data.items()):
        if index.fqn.startswith("common_state"):
            data_path = os.path.join(ckpt, "dist", info.relative_path)
            offset = os.path.getsize(data_path)
            with open(data_path, "ab") as f:
                f.write(evil.getvalue())
            meta.storage_data[index] = _StorageInfo(info.relative_path, offset, len(evil.getvalue()))
    with open(meta_path, "wb") as f:
        pickle.dump(meta, f)


def _tamper_and_resume(root: str, run_dir: str, marker: str):
    """Write a checkpoint, then for each pickle-bearing file (and megatron's common-state entry):
    replace it by a crafted pickle and resume. Returns {what: (exit code, stderr)} and whether the
    marker was ever written."""
    from gil_megatron.cli import run_cli
    from gil_megatron.training.checkpoint import latest_checkpoint

    sft = _tool("train_sft")
    sft.main(sft_args(root, run_dir, "train.steps=1", "checkpoint.resume=none"))
    ckpt = latest_checkpoint(run_dir)
    pristine = ckpt + ".pristine"
    shutil.copytree(ckpt, pristine)

    def replace_file(rel):
        def tamper():
            target = os.path.join(ckpt, rel)
            with open(target, "rb") as f:
                is_zip = f.read(2) == b"PK"
            if is_zip:
                torch.save(_WritesMarker(marker), target)
            else:
                with open(target, "wb") as f:
                    pickle.dump(_WritesMarker(marker), f)
        return tamper

    cases = {os.path.relpath(p, pristine): replace_file(os.path.relpath(p, pristine)) for p in _pickle_files(pristine)}
    cases["common_state entry"] = lambda: _tamper_common_state(ckpt, marker)
    results = {}
    for what, tamper in cases.items():
        shutil.rmtree(ckpt)
        shutil.copytree(pristine, ckpt)
        tamper()
        err = io.StringIO()
        code = 0
        with contextlib.redirect_stderr(err):
            try:
                run_cli(sft.main, sft_args(root, run_dir, "train.steps=2", "checkpoint.resume=auto"))
            except SystemExit as exc:
                code = exc.code
        results[what] = (code, err.getvalue())
    return results, os.path.exists(marker)


def test_crafted_pickle_in_a_checkpoint_is_refused(sft_data, tmp_path):
    marker = str(tmp_path / "MARKER")
    results, marker_written = run_single(_tamper_and_resume, str(sft_data), str(tmp_path / "run"), marker)
    assert any(rel.endswith(".metadata") for rel in results), sorted(results)  # torch_dist's pickled metadata
    assert not marker_written and not os.path.exists(marker)
    for rel, (code, err) in results.items():
        lines = [line for line in err.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error")]
        assert code == 2, (rel, code, err[-1000:])
        assert len(errors) == 1 and "Traceback" not in err, (rel, err[-1000:])
        assert "refusing to load" in errors[0], (rel, errors[0])


# ---- bf16 with fp32 main weights; megatron's distributed optimizer at DP2 --------------------------
def _bf16_steps(init: str, out: str, distributed_optimizer: bool, tp: int, steps: int, save_at=None,
                resume_from=None):
    """``steps`` optimizer steps of a bf16 actor on a fixed next-token loss (each DP rank its own
    rows); optionally save after step ``save_at`` or start from checkpoint ``resume_from``.
    Returns the final bf16 weights and fp32 main weights (full, gathered over TP/DP) and grad norms."""
    from gil_megatron.models.build import model_from_checkpoint
    from gil_megatron.models.logprobs import action_logprobs
    from gil_megatron.parallel import distributed
    from gil_megatron.training import checkpoint
    from gil_megatron.training.optim import OptimSettings, Trainable

    layout = distributed.initialize(tp, 1, seed=0)
    model = model_from_checkpoint(init, "actor", layout, torch.bfloat16)
    trainable = Trainable(model, OptimSettings(lr=1e-2, distributed_optimizer=distributed_optimizer,
                                               warmup_steps=1, decay_steps=4))
    assert trainable.distributed_optimizer == distributed_optimizer
    start, initial = 0, _main_params(trainable)
    if resume_from is not None:
        start = checkpoint.load_checkpoint(resume_from, layout, {"actor": trainable})["iteration"]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 24, (4, 10), generator=gen) for _ in range(steps)]
    norms = []
    for step in range(start, steps):
        rows = batches[step][layout.dp_rank::layout.dp]  # this DP rank's half of the global batch

        def loss_fn(mb, logits):
            return -action_logprobs(logits.float(), mb["input_ids"])[0].mean(), {}

        trainable.forward_backward([{"input_ids": rows}], loss_fn)
        updated, norm = trainable.step()
        assert updated
        norms.append(norm)
        if save_at == step + 1:
            checkpoint.save_checkpoint(out, step + 1, layout, {"actor": model}, {"actor": trainable}, {}, keep_last=1)
    main = _main_params(trainable)
    return {"norms": norms, "main": main, "initial": initial, "dtype": str(next(model.parameters()).dtype)}


def _main_params(trainable):
    """name -> fp32 main weight. megatron sets ``param.main_param`` on bf16 parameters; the
    distributed optimizer only on this DP rank's share, a slice of the flattened parameter, so the
    slices are summed over DP. fp32 parameters (megatron's local RMSNorm) are their own main weight."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    out = {}
    for name, p in trainable.module.named_parameters():
        if p.dtype == torch.float32:
            out[name] = p.detach().clone()
        elif trainable.distributed_optimizer:  # every rank takes part in the all-reduce
            full = torch.zeros(p.numel(), dtype=torch.float32)
            if getattr(p, "main_param", None) is not None:
                rng = trainable.optimizer.chained_optimizers[0]._get_model_param_range_map(p)["param"]
                full[rng.start:rng.end] = p.main_param.detach().float()
            dist.all_reduce(full, group=parallel_state.get_data_parallel_group())
            out[name] = full.view(p.shape)
        else:
            out[name] = p.main_param.detach().float().view(p.shape).clone()
    return out


def _mixed_precision_runs(init: str, out: str):
    from gil_megatron.parallel import distributed

    distributed.initialize(1, 1)
    r = {"plain": _bf16_steps(init, out, False, tp=1, steps=4),
         "distributed": _bf16_steps(init, os.path.join(out, "dist"), True, tp=1, steps=4, save_at=2)}
    ckpt = os.path.join(out, "dist", "checkpoints", "iter_0000002")
    r["resumed"] = _bf16_steps(init, out, True, tp=1, steps=4, resume_from=ckpt)
    r["resumed_tp2"] = _bf16_steps(init, out, True, tp=2, steps=4, resume_from=ckpt)
    return r


@pytest.mark.slow
def test_bf16_distributed_optimizer_and_its_checkpoint(sft_data, tmp_path):
    """bf16 weights, fp32 main weights and gradients at DP2 on CPU: megatron's DistributedOptimizer
    takes the same 4 steps as the plain mixed-precision optimizer; its checkpoint (saved after step
    2 at DP2) resumes to the uninterrupted run bit for bit, and at TP2 (DP1) within fp32 tolerance."""
    r = spawn(_mixed_precision_runs, 2, str(sft_data / "init"), str(tmp_path))[0]
    plain, sharded, resumed, tp2 = r["plain"], r["distributed"], r["resumed"], r["resumed_tp2"]
    assert plain["dtype"] == sharded["dtype"] == "torch.bfloat16"
    assert plain["norms"] == pytest.approx(sharded["norms"], rel=1e-5)
    for name, w in plain["main"].items():
        torch.testing.assert_close(sharded["main"][name], w, rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.equal(w, plain["initial"][name]), name  # training moved it
    assert resumed["norms"] == sharded["norms"][2:]
    for name, w in sharded["main"].items():
        assert torch.equal(resumed["main"][name], w), name
    # bf16 forward/backward rounds differently when the matmuls are split over TP: bf16 tolerance
    assert tp2["norms"] == pytest.approx(sharded["norms"][2:], rel=2e-3)
