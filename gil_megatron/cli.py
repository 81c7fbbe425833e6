"""Command-line plumbing shared by every tool: user errors become one line and a non-zero exit,
``--help`` on every entry point, and the pre-launch check of a config.

    python -m gil_megatron.cli validate ppo|sft|reward_model|dpo [CONFIG.yaml] [key=value ...] \\
        [--world-size N] [--no-paths]
    python -m gil_megatron.cli keys ppo|sft|reward_model|dpo        every config key, default and meaning

``validate`` is what examples/run_gil_ppo.sh runs before torchrun starts any worker: the config
(unknown key, wrong type, bad value), the world size against parallel.tp * parallel.pp and the
batch sizes, and (unless --no-paths) that data sources, model directories and reward functions
exist. A problem is one ``error:`` line and exit status 2; success prints nothing.
"""

import argparse
import ast
import dataclasses
import importlib.util
import inspect
import os
import sys
import typing
from typing import Dict, List, Optional, Sequence

# Errors the user can fix from the message alone; anything else is a bug and keeps its traceback.
# FloatingPointError: a run stopped by the non-finite guard (it names what went bad).
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, KeyError, ImportError, PermissionError,
               FloatingPointError, MemoryError)

HELP_FLAGS = ("-h", "--help")


def fail(message) -> None:
    rank = os.environ.get("RANK")
    prefix = f"error (rank {rank}): " if rank not in (None, "0") else "error: "
    print(f"{prefix}{message}", file=sys.stderr, flush=True)
    sys.exit(2)


def run_cli(main, *args, **kwargs) -> None:
    """Run ``main``; a user error becomes one ``error:`` line and exit 2. For a config-driven entry
    point (one without argparse), ``-h``/``--help`` in sys.argv prints the module's docstring and exits 0."""
    module = sys.modules.get(getattr(main, "__module__", ""), None)
    # config-driven entry points ([CONFIG.yaml] [key=value ...]); argparse tools print their own help
    if not args and not kwargs and any(a in HELP_FLAGS for a in sys.argv[1:]) and \
            "argparse" not in vars(module or sys):
        print((getattr(module, "__doc__", None) or "").strip() + "\n\nConfig keys: python -m gil_megatron.cli keys "
              "ppo|sft|reward_model|dpo")
        sys.exit(0)
    try:
        main(*args, **kwargs)
    except USER_ERRORS as exc:
        fail(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)


def stage_main(module_name: str, argv: Optional[Sequence[str]] = None) -> None:
    """``python -m gil_megatron.stages.<name>`` and tools/train_*.py: help, then the stage's main."""
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    module = importlib.import_module(module_name)
    if any(a in HELP_FLAGS for a in argv):
        print(module.__doc__.strip())
        print(f"\nUsage: torchrun --nproc-per-node N -m {module_name} CONFIG.yaml [key=value ...]")
        print(f"Config keys: python -m gil_megatron.cli keys {module_name.rsplit('.', 1)[1]}")
        sys.exit(0)
    from gil_megatron.parallel import distributed

    try:
        run_cli(module.main, argv)
    finally:
        distributed.destroy()


# ---- config schemas by job name ------------------------------------------------------------------


def schema_of(job: str):
    from gil_megatron import config

    schemas = {"ppo": config.PPOConfig, "sft": config.SFTConfig, "reward_model": config.RewardModelConfig,
               "dpo": config.DPOConfig}
    if job not in schemas:
        raise ValueError(f"unknown job {job!r}; valid: {', '.join(schemas)}")
    return schemas[job]


def _field_docs(cls) -> Dict[str, str]:
    """Attribute docstrings (the string literal under each field) of a dataclass and its bases."""
    docs: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                    and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def config_keys(schema, prefix: str = "") -> List[str]:
    """'key = default  # doc' lines for every leaf of a config dataclass."""
    lines = []
    docs = _field_docs(schema)
    hints = typing.get_type_hints(schema)
    instance = schema()
    for f in dataclasses.fields(schema):
        value = getattr(instance, f.name)
        t = hints.get(f.name)
        if dataclasses.is_dataclass(value):
            lines.extend(config_keys(type(value), f"{prefix}{f.name}."))
            continue
        doc = docs.get(f.name, "")
        lines.append(f"{prefix}{f.name} = {value!r}" + (f"    # {doc}" if doc else "") if t is not None else "")
    return [line for line in lines if line]


# ---- validate -------------------------------------------------------------------------------------


def _check_paths(job: str, cfg) -> None:
    from gil_megatron.data.sources import parse_source

    for key, source in cfg.data.sources().items():
        try:
            parse_source(source, cfg.data.split)
        except ValueError as exc:
            raise ValueError(f"data.{key}: {exc}") from None
    if job == "ppo":
        m = cfg.models
        dirs = {"models.actor": m.actor, "models.reference": m.reference, "models.critic": m.critic,
                "models.reward_model": m.reward_model, "models.tokenizer": m.tokenizer}
        for name in ("reward_fn", "gold_reward_fn"):
            spec = getattr(m, name)
            if spec:
                module = spec.split(":", 1)[0]
                try:
                    found = importlib.util.find_spec(module) is not None
                except (ImportError, ValueError):
                    found = False
                if not found:
                    raise ValueError(f"models.{name}={spec}: no module {module!r} on the Python path; "
                                     "fix: check the spelling or add its directory to PYTHONPATH")
    else:
        dirs = {"init": cfg.init, "tokenizer": cfg.tokenizer, "reference": getattr(cfg, "reference", None)}
    for key, path in dirs.items():
        if path is not None and not os.path.isdir(path):
            hint = ("convert one with tools/convert_hf_checkpoint.py or write a fresh one with tools/init_model.py"
                    if key in ("init", "models.actor") else "give a model directory")
            raise ValueError(f"{key}={path}: no such directory; fix: {hint}")


def validate(job: str, argv: Sequence[str], world_size: Optional[int] = None, paths: bool = True):
    """Load and check a job's config (and world size, and paths); returns the config."""
    from gil_megatron.config import ConfigError, load_config, overrides_from_argv

    schema = schema_of(job)
    yaml_path, overrides = overrides_from_argv(list(argv))
    cfg = load_config(schema, yaml_path, overrides)
    if world_size is not None:
        tp, pp = cfg.parallel.tp, cfg.parallel.pp
        if world_size < 1 or world_size % (tp * pp):
            raise ConfigError(f"world size {world_size} is not divisible by parallel.tp*parallel.pp={tp}*{pp}; "
                              f"launch a multiple of {tp * pp} ranks (NPROC) or change parallel.tp/pp")
        if job == "ppo":
            cfg.check_world(world_size)
        else:
            dp = world_size // (tp * pp)
            cfg.train.check_world(dp)
            if cfg.data.eval and cfg.train.eval_batch_size % dp:
                raise ConfigError(f"train.eval_batch_size={cfg.train.eval_batch_size} must be divisible by "
                                  f"the data-parallel size {dp}")
    if paths:
        _check_paths(job, cfg)
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gil_megatron.cli", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check a config (and world size, paths) before launching")
    v.add_argument("job", choices=("ppo", "sft", "reward_model", "dpo"))
    v.add_argument("--world-size", type=int, default=None, help="ranks the job will get (NPROC * NNODES)")
    v.add_argument("--no-paths", action="store_true", help="skip checking that files and directories exist")
    v.add_argument("config", nargs=argparse.REMAINDER, help="[CONFIG.yaml] [key=value ...]")
    k = sub.add_parser("keys", help="list every config key with its default and meaning")
    k.add_argument("job", choices=("ppo", "sft", "reward_model", "dpo"))
    args = p.parse_args(argv)
    if args.command == "keys":
        print("\n".join(config_keys(schema_of(args.job))))
        return
    rest = [a for a in args.config if a != "--no-paths"]  # also accepted after the job name
    run_cli(validate, args.job, rest, world_size=args.world_size,
            paths=not (args.no_paths or len(rest) != len(args.config)))


if __name__ == "__main__":
    main()
