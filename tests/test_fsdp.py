"""FSDP2 on CPU (gloo, 2 processes): same training as DDP and as one process, exact sharded resume,
resharding (2 ranks -> 1, 1 -> 2), consolidation to one state dict, activation checkpointing."""

from __future__ import annotations

import json
import os
import pickle
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from gpt2 import GPT, GPTConfig
from gpt2.checkpoint.sharded import consolidate, is_sharded_checkpoint, load_sharded, read_extra_state, save_sharded
from gpt2.training.parallel import gather_full_model, shard_model

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

CONFIG = GPTConfig.from_name("tiny", vocab_size=128)  # 2 layers, 2 heads, C=32, block_size 64
WORLD, B, T, STEPS = 2, 2, 32, 3  # per-rank micro-batch B x T; STEPS optimizer steps before the save
LR, SEED = 1e-2, 0


# ---------------------------------------------------------------------------------------------
# What every process does the same way


def batches() -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of STEPS + 1 global batches: (STEPS + 1, WORLD * B, T) each."""
    g = torch.Generator().manual_seed(1234)
    stream = torch.randint(0, CONFIG.vocab_size, (37,), generator=g).repeat(8)  # periodic: learnable
    starts = torch.randint(0, 37, (STEPS + 1, WORLD * B), generator=g)
    tokens = torch.stack([torch.stack([stream[i : i + T + 1] for i in row]) for row in starts.tolist()])
    return tokens[..., :-1], tokens[..., 1:]


def rows(rank: int) -> slice:
    """The rows of a global batch that `rank` trains on (the DDP split)."""
    return slice(rank * B, (rank + 1) * B)


def new_model(seed: int = SEED) -> GPT:
    torch.manual_seed(seed)
    return GPT(CONFIG)


def new_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW as gpt2 training builds it: weight decay on 2-D parameters only."""
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), eps=1e-8)


def train_step(model, optimizer, x, y, *, keep_grads: bool = False):
    """One optimizer step with gradient clipping at 1.0; returns (local loss, grad norm, grads or None)."""
    optimizer.zero_grad(set_to_none=True)
    _, loss = model(x, y)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    grads = None
    if keep_grads:
        grads = {n: _local(p.grad).clone() for n, p in model.named_parameters()}
    optimizer.step()
    return loss.detach(), norm, grads


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def global_mean(loss: torch.Tensor) -> float:
    t = loss.detach().clone()
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def init_group(rank: int, world: int, store: Path) -> None:
    torch.set_num_threads(1)  # 2 processes on 2 cores; no OpenMP pool in a forked child
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )


# ---------------------------------------------------------------------------------------------
# The two launches of 2 processes


def _train_worker(rank: int, tmp: Path) -> None:
    """Launch A: FSDP, FSDP with activation checkpointing and DDP train STEPS steps from the same
    weights on the same data; FSDP saves a sharded checkpoint, then takes one more step."""
    init_group(rank, WORLD, tmp / "store_a")
    xs, ys = batches()
    out: dict = {"fsdp": [], "ac": [], "ddp": [], "norm_fsdp": []}

    fsdp = shard_model(new_model(), mixed_precision=True, activation_checkpointing=False)
    ac = shard_model(new_model(), mixed_precision=True, activation_checkpointing=True)
    out["tied"] = fsdp.lm_head.weight is fsdp.transformer.wte.weight and ac.lm_head.weight is ac.transformer.wte.weight
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(new_model())
    opts = {name: new_optimizer(m) for name, m in (("fsdp", fsdp), ("ac", ac), ("ddp", ddp))}

    diffs = []
    for step in range(STEPS):
        x, y = xs[step, rows(rank)], ys[step, rows(rank)]
        loss, norm, grads = train_step(fsdp, opts["fsdp"], x, y, keep_grads=step == 0)
        ac_loss, _, ac_grads = train_step(ac, opts["ac"], x, y, keep_grads=step == 0)
        ddp_loss, _, _ = train_step(ddp, opts["ddp"], x, y)
        out["fsdp"].append(global_mean(loss))
        out["ac"].append(global_mean(ac_loss))
        out["ddp"].append(global_mean(ddp_loss))
        out["norm_fsdp"].append(float(norm))
        if grads is not None:
            # Same sharding in both models, so the local shards line up; names differ by the wrapper.
            assert len(grads) == len(ac_grads)
            diffs = [(a - b).abs().max().item() for a, b in zip(grads.values(), ac_grads.values())]
    out["ac_grad_max_diff"] = max(diffs)

    ckpt = tmp / "ckpt_2ranks" / "step_00000003"
    extra = {"step": STEPS, "loader": {"position": 7 + rank}, "rng": torch.get_rng_state()}
    save_sharded(ckpt, fsdp, opts["fsdp"], extra, json_files={"train_config.json": {"model": "tiny"}})
    # A second save of the AC model (names with `_checkpoint_wrapped_module.`) for the prefix check.
    save_sharded(tmp / "ckpt_ac" / "step_00000003", ac, opts["ac"], {"step": STEPS})

    full = gather_full_model(fsdp)
    if rank == 0:
        assert full.lm_head.weight is full.transformer.wte.weight
        torch.save(full.state_dict(), tmp / "full_step3.pt")
    else:
        assert full is None

    x, y = xs[STEPS, rows(rank)], ys[STEPS, rows(rank)]
    loss, _, _ = train_step(fsdp, opts["fsdp"], x, y)
    out["next_local"] = loss.item()
    out["next"] = global_mean(loss)
    per_rank = [None] * WORLD
    dist.all_gather_object(per_rank, out)
    if rank == 0:
        (tmp / "train.json").write_text(json.dumps(per_rank))
    dist.destroy_process_group()


def _resume_worker(rank: int, tmp: Path) -> None:
    """Launch B, fresh processes and process group: new weights (another seed), then load_sharded
    of the 2-rank checkpoint, and of the 1-process one; one step on the next batch from each.
    Then the 2-rank checkpoint into an unsharded model on each rank (as a DDP run would)."""
    init_group(rank, WORLD, tmp / "store_b")
    xs, ys = batches()
    x, y = xs[STEPS, rows(rank)], ys[STEPS, rows(rank)]
    out = {}
    for name in ("ckpt_2ranks", "ckpt_1rank"):
        model = shard_model(new_model(seed=99), mixed_precision=True, activation_checkpointing=False)
        optimizer = new_optimizer(model)
        extra = load_sharded(tmp / name / "step_00000003", model, optimizer)
        loss, _, _ = train_step(model, optimizer, x, y)
        out[name] = {"next_local": loss.item(), "next": global_mean(loss), "extra_step": extra["step"]}
        if name == "ckpt_2ranks":
            out[name]["loader"] = extra["loader"]
    # A DDP run (plain model on every rank) resumes an FSDP checkpoint too: each rank reads it whole.
    plain = new_model(seed=98)
    load_sharded(tmp / "ckpt_2ranks" / "step_00000003", plain, None)
    full = torch.load(tmp / "full_step3.pt", weights_only=True)
    out["plain_equal"] = all(torch.equal(plain.state_dict()[k], full[k]) for k in full)
    per_rank = [None] * WORLD
    dist.all_gather_object(per_rank, out)
    if rank == 0:
        (tmp / "resume.json").write_text(json.dumps(per_rank))
    dist.destroy_process_group()


def launch(fn, tmp: Path) -> None:
    """Run fn(rank, tmp) in WORLD processes forked from this one (torch is imported once, here)."""
    import torch.multiprocessing as mp

    if sys.platform == "win32":
        pytest.skip("the FSDP test forks processes (POSIX only)")
    import torch._dynamo  # noqa: F401  (fully_shard imports it lazily: once here, not in each child)

    mp.start_processes(fn, args=(tmp,), nprocs=WORLD, join=True, start_method="fork")


def reference_run(tmp: Path) -> dict:
    """One process, no process group: the same STEPS steps on the whole global batches."""
    xs, ys = batches()
    model = new_model()
    optimizer = new_optimizer(model)
    losses = [train_step(model, optimizer, xs[s], ys[s])[0].item() for s in range(STEPS)]
    save_sharded(tmp / "ckpt_1rank" / "step_00000003", model, optimizer, {"step": STEPS})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    next_loss = train_step(model, optimizer, xs[STEPS], ys[STEPS])[0].item()
    return {"losses": losses, "state": state, "next": next_loss}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        launch(_train_worker, tmp)
        ref = reference_run(tmp)
        launch(_resume_worker, tmp)
    finally:
        torch.set_num_threads(threads)
    train = json.loads((tmp / "train.json").read_text())
    resume = json.loads((tmp / "resume.json").read_text())
    return {"tmp": tmp, "train": train, "resume": resume, "ref": ref}


# ---------------------------------------------------------------------------------------------
# Tests


@pytest.mark.slow
def test_fsdp_trains_like_ddp_and_one_process(runs):
    a = runs["train"][0]
    assert a["tied"]
    torch.testing.assert_close(a["fsdp"], a["ddp"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a["fsdp"], runs["ref"]["losses"], rtol=1e-5, atol=1e-6)
    assert a["fsdp"][-1] < a["fsdp"][0]  # it learns
    assert runs["train"][1]["norm_fsdp"] == a["norm_fsdp"]  # the clipped norm is the global one


@pytest.mark.slow
def test_activation_checkpointing_gives_the_same_loss_and_gradients(runs):
    a = runs["train"][0]
    torch.testing.assert_close(a["ac"], a["fsdp"], rtol=1e-6, atol=1e-7)
    assert a["ac_grad_max_diff"] < 1e-6


@pytest.mark.slow
def test_sharded_resume_in_fresh_processes_is_exact(runs):
    train, resume = runs["train"], runs["resume"]
    for rank in range(WORLD):
        r = resume[rank]["ckpt_2ranks"]
        assert r["next_local"] == train[rank]["next_local"]  # bit for bit: same shards, same ops
        assert r["extra_step"] == STEPS
        assert r["loader"] == {"position": 7}  # rank 0's extra_state is the one written
    assert all(r["plain_equal"] for r in resume)
    ckpt = runs["tmp"] / "ckpt_2ranks" / "step_00000003"
    assert is_sharded_checkpoint(ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "checkpoint.json",  # every other file's size and sha256, written last (gpt2.checkpoint.layout)
        "config.json",
        "train_config.json",
        "trainer_state.pt",
    ]
    assert not list(ckpt.parent.glob(".*"))  # no temporary directory left behind
    assert json.loads((ckpt / "train_config.json").read_text()) == {"model": "tiny"}


@pytest.mark.slow
def test_checkpoints_reshard_between_process_counts(runs):
    # 1 process -> 2 ranks
    one_to_two = runs["resume"][0]["ckpt_1rank"]["next"]
    torch.testing.assert_close(one_to_two, runs["ref"]["next"], rtol=1e-5, atol=1e-6)
    # 2 ranks -> 1 process without a process group
    xs, ys = batches()
    model = new_model(seed=7)
    optimizer = new_optimizer(model)
    extra = load_sharded(runs["tmp"] / "ckpt_2ranks" / "step_00000003", model, optimizer)
    assert extra["step"] == STEPS and isinstance(extra["rng"], torch.Tensor)
    assert model.lm_head.weight is model.transformer.wte.weight
    loss = train_step(model, optimizer, xs[STEPS], ys[STEPS])[0].item()
    torch.testing.assert_close(loss, runs["train"][0]["next"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, runs["ref"]["next"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_consolidate_gives_the_full_state_dict_for_export(runs, tmp_path):
    tmp = runs["tmp"]
    full = torch.load(tmp / "full_step3.pt", weights_only=True)
    sd = consolidate(tmp / "ckpt_2ranks" / "step_00000003")
    assert set(sd) == set(full) == set(GPT(CONFIG).state_dict())  # no module./_orig_mod. prefixes
    for k in full:
        assert sd[k].dtype == torch.float32 and torch.equal(sd[k], full[k]), k
        torch.testing.assert_close(sd[k], runs["ref"]["state"][k], rtol=1e-4, atol=1e-4)  # Adam: lr 1e-2 steps
    # the activation-checkpointed model's checkpoint has the same plain names
    assert set(consolidate(tmp / "ckpt_ac" / "step_00000003")) == set(full)

    model = GPT.from_pretrained(tmp / "ckpt_2ranks" / "step_00000003")  # consolidated in this process
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.transformer.wte.weight, full["transformer.wte.weight"])
    from gpt2.hf import save_pretrained

    load_model = GPT.from_pretrained  # the one model loader

    save_pretrained(model, tmp_path / "hf", tokenizer=False)
    again = load_model(tmp_path / "hf")
    x = batches()[0][0]
    torch.testing.assert_close(again(x)[0], model(x)[0], rtol=0, atol=0)


# Single-process checks (no process group, fast)


def test_save_and_load_in_one_process_is_exact_and_atomic(tmp_path):
    xs, ys = batches()
    model = new_model()
    optimizer = new_optimizer(model)
    train_step(model, optimizer, xs[0], ys[0])
    ckpt = tmp_path / "checkpoints" / "step_00000001"
    (tmp_path / "checkpoints" / ".step_00000001.tmp").mkdir(parents=True)  # left by a killed save
    save_sharded(ckpt, model, optimizer, {"step": 1})
    save_sharded(ckpt, model, optimizer, {"step": 1, "again": True})  # the same step saved again
    assert read_extra_state(ckpt) == {"step": 1, "again": True, "sealed": True}  # sealed: has checkpoint.json
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["step_00000001"]
    expected = train_step(model, optimizer, xs[1], ys[1])[0]

    other = new_model(seed=5)
    opt2 = new_optimizer(other)
    load_sharded(ckpt, other, opt2)
    assert torch.equal(train_step(other, opt2, xs[1], ys[1])[0], expected)

    weights_only = new_model(seed=6)
    load_sharded(ckpt, weights_only, None)
    sd = consolidate(ckpt)
    assert all(torch.equal(weights_only.state_dict()[k], sd[k]) for k in sd)


def test_sharded_checkpoints_carry_the_tokenizer_files(tmp_path):
    """As an HF-format checkpoint does: AutoTokenizer reads the directory, and the files are in its
    manifest; a small vocabulary (CONFIG's) gets none."""
    transformers = pytest.importorskip("transformers")
    from gpt2.checkpoint.layout import MANIFEST, verified
    from gpt2.tokenizer import Tokenizer

    torch.manual_seed(SEED)
    ckpt = save_sharded(tmp_path / "step_00000001", GPT(GPTConfig.from_name("tiny")), None, {"step": 1})
    verified(ckpt)
    listed = json.loads((ckpt / MANIFEST).read_text())["files"]
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= set(listed)
    hf_tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    assert hf_tok("Sharded, too.")["input_ids"] == Tokenizer().encode("Sharded, too.")
    small = save_sharded(tmp_path / "step_00000002", new_model(), None, {"step": 2})
    assert not (small / "vocab.json").exists()


def test_user_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="torchrun"):
        shard_model(new_model(), mixed_precision=False, activation_checkpointing=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        consolidate(tmp_path / "nope")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="not a complete sharded checkpoint"):
        load_sharded(tmp_path / "hf", new_model(), None)
    ckpt = tmp_path / "ckpt"
    save_sharded(ckpt, new_model(), None, {})
    other = GPT(GPTConfig.from_name("tiny", vocab_size=128, n_layer=3))
    with pytest.raises(ValueError, match="another model shape"):
        load_sharded(ckpt, other, None)


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_untrusted_metadata_is_not_unpickled(tmp_path):
    ckpt = tmp_path / "ckpt"
    save_sharded(ckpt, new_model(), None, {})
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(ValueError, match="refusing to load"):
        consolidate(ckpt)


def test_mixed_precision_is_bf16_compute_fp32_reduce_on_cuda_only():
    from gpt2.training.parallel import mixed_precision_policy

    on_gpu = mixed_precision_policy("cuda", True)
    assert (on_gpu.param_dtype, on_gpu.reduce_dtype) == (torch.bfloat16, torch.float32)
    for policy in (mixed_precision_policy("cpu", True), mixed_precision_policy("cuda", False)):
        assert (policy.param_dtype, policy.reduce_dtype) == (None, None)  # fp32 throughout
