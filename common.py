"""
The few helpers every latentkit script shares: config overrides, DDP setup/teardown, print0,
seeding and atomic checkpoint/JSON IO. Plain functions, no hidden state, imports no script.
"""

import ast
import hashlib
import json
import os
import random
import tempfile

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# config: `python x.py [config_file.py] [--key=value ...]`


def _check_type(key, value, default, where):
    # an int is accepted for a float default (`--learning_rate=1`), None defaults take anything
    if default is None or value is None and isinstance(default, str):
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, bool) != isinstance(value, bool) or not isinstance(value, type(default)):
        raise TypeError(f"{where}: {key}={value!r} is a {type(value).__name__}, "
                        f"expected {type(default).__name__} (default {default!r})")
    return value


def _unknown_key(key, defaults, where):
    valid = "\n  ".join(sorted(defaults))
    return KeyError(f"{where}: unknown config key '{key}'. Valid keys:\n  {valid}")


def parse_config(defaults, argv):
    """Apply a config file (exec'd; it may only assign known keys) and `--key=value` overrides.
    Returns a new dict; raises on an unknown key or a value of the wrong type."""
    config = dict(defaults)
    for arg in argv:
        if not arg.startswith("--"):
            scope = {}
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), {}, scope)
            for key, value in scope.items():
                if key.startswith("_"):
                    continue
                if key not in defaults:
                    raise _unknown_key(key, defaults, arg)
                config[key] = _check_type(key, value, defaults[key], arg)
        else:
            key, sep, raw = arg[2:].partition("=")
            if not sep:
                raise ValueError(f"command line: expected --key=value, got '{arg}'")
            if key not in defaults:
                raise _unknown_key(key, defaults, "command line")
            try:
                value = ast.literal_eval(raw)
            except (SyntaxError, ValueError):
                value = raw  # a bare string such as --out_dir=out/x
            config[key] = _check_type(key, value, defaults[key], "command line")
    return config


# -----------------------------------------------------------------------------
# DDP: one code path for `python x.py` and `torchrun --nproc_per_node N x.py`


def setup_ddp(device="auto"):
    """Returns (ddp, ddp_rank, ddp_local_rank, ddp_world_size, device). torchrun sets RANK."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not ddp:
        return False, 0, 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return True, rank, local_rank, world_size, device


def teardown_ddp():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_master():
    return int(os.environ.get("RANK", 0)) == 0


def print0(*args, **kwargs):
    if is_master():
        print(*args, **kwargs, flush=True)


def replica_fingerprints(module):
    """sha256 of every parameter and buffer, from every rank (rank order): all equal when DDP kept
    the replicas in sync."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    if not (dist.is_available() and dist.is_initialized()):
        return [h.hexdigest()]
    fingerprints = [None] * dist.get_world_size()
    dist.all_gather_object(fingerprints, h.hexdigest())
    return fingerprints


def set_seed(seed):
    random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def rng_state():
    """Python and torch RNG states as plain tensors/tuples, loadable with weights_only=True."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -----------------------------------------------------------------------------
# atomic IO: write to a temp file in the same directory, then rename, so a crash leaves the
# previous file intact


def _atomic(path, write):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_checkpoint(obj, path):
    _atomic(path, lambda f: torch.save(obj, f))


def load_checkpoint(path, device="cpu"):
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=device, weights_only=True)


def write_json(obj, path):
    _atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def load_state_dict_checked(module, state_dict, source="checkpoint"):
    """load_state_dict that names every missing, unexpected or mis-shaped tensor."""
    own = module.state_dict()
    problems = [f"missing: {k}" for k in own if k not in state_dict]
    problems += [f"unexpected: {k}" for k in state_dict if k not in own]
    problems += [f"shape of {k}: {source} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                 for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    if problems:
        raise ValueError(f"{source} does not fit this model:\n  " + "\n  ".join(problems))
    module.load_state_dict(state_dict)
