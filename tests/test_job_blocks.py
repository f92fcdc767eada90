"""Building blocks of the reference job: model, data, checkpoints, distributed set-up."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from schedany import cosine_annealing_with_warmup, extend_optimizer
from schedany.config import ModelSection
from schedany.job.checkpoint import (
    CheckpointError,
    capture_rng_state,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from schedany.job.data import Corpus, MicroBatchSampler, eval_batches, load_corpus
from schedany.job.distributed import (
    init_distributed,
    is_rank0,
    resolve_strategy,
    teardown,
    wrap_model,
)
from schedany.job.model import IGNORE_INDEX, Batch, build_model, loss, param_groups

TINY = ModelSection(d_model=32, n_layers=2, n_heads=2, seq_len=32)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return load_corpus(max_bytes=300_000)


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: Batch) -> float:
    value, _ = loss(model, batch)
    value.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return value.item()


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [
        p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
        for p in model.parameters()
    ]


# --- model ---------------------------------------------------------------------------


def test_forward_backward_shapes_and_param_groups(corpus: Corpus) -> None:
    model = build_model(TINY, seed=0)
    batch = next(MicroBatchSampler(corpus, 3, TINY.seq_len))
    logits = model(batch.inputs)
    assert logits.shape == (3, TINY.seq_len, 256)
    loss(model, batch)[0].backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())

    groups = param_groups(model, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each exactly once
    no_decay = {id(p) for p in groups[1]["params"]}
    assert id(model.tok_emb.weight) in no_decay and id(model.pos_emb.weight) in no_decay
    assert all(p.ndim == 2 for p in groups[0]["params"])


def test_init_is_a_function_of_the_seed_only() -> None:
    torch.manual_seed(123)
    a = build_model(TINY, seed=5)
    torch.manual_seed(456)
    b = build_model(TINY, seed=5)
    c = build_model(TINY, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.head.weight, c.head.weight)


def test_loss_sum_is_mean_times_count_and_padding_is_inert(corpus: Corpus) -> None:
    model = build_model(TINY, seed=0)
    batch = next(MicroBatchSampler(corpus, 4, TINY.seq_len, seed=1))
    assert batch.num_tokens == int((batch.targets != IGNORE_INDEX).sum())
    assert batch.num_tokens < 4 * TINY.seq_len  # some rows are padded
    total, n = loss(model, batch, "sum")
    mean, m = loss(model, batch, "mean")
    assert n == m == batch.num_tokens
    torch.testing.assert_close(total, mean * n)
    # Right padding + causal attention: what sits in the pad positions changes nothing.
    noisy = batch.inputs.masked_fill(batch.targets == IGNORE_INDEX, 77)
    torch.testing.assert_close(loss(model, batch._replace(inputs=noisy), "sum")[0], total)
    with pytest.raises(ValueError, match="reduction"):
        loss(model, batch, "avg")  # type: ignore[arg-type]


def test_model_config_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="n_heads"):
        ModelSection(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="n_layers"):
        ModelSection(n_layers=0)


# --- data ----------------------------------------------------------------------------


def test_default_corpus_is_stdlib_capped_and_split_by_document(corpus: Corpus) -> None:
    assert corpus.num_bytes == 300_000
    assert list(corpus.names) == sorted(corpus.names)
    assert all(name.endswith(".py") and "site-packages" not in name for name in corpus.names)
    train, held = corpus.split(0.2, seed=0)
    assert set(train.names).isdisjoint(held.names)
    assert set(train.names) | set(held.names) == set(corpus.names)
    assert train.num_bytes + held.num_bytes == corpus.num_bytes
    assert corpus.split(0.2, seed=0)[1].names == held.names
    assert corpus.split(0.2, seed=1)[1].names != held.names


def test_folder_corpus_reads_in_path_order_and_cuts_at_the_cap(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.txt").write_bytes(b"0123456789")
    (tmp_path / "a.txt").write_bytes(b"abcdef")
    (tmp_path / ".hidden").write_bytes(b"never")
    (tmp_path / "c.txt").write_bytes(b"z")
    c = load_corpus(tmp_path, max_bytes=12)
    assert c.names == ("a.txt", "b/x.txt")
    assert bytes(c.data.tolist()) == b"abcdef012345"
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_corpus(tmp_path / "missing")


def test_sampler_is_deterministic_and_token_counts_vary(corpus: Corpus) -> None:
    first = next(MicroBatchSampler(corpus, 8, 64, seed=3))
    s1, s2 = MicroBatchSampler(corpus, 8, 64, seed=3), MicroBatchSampler(corpus, 8, 64, seed=3)
    b1 = [next(s1) for _ in range(10)]
    b2 = [next(s2) for _ in range(10)]
    assert torch.equal(first.inputs, b1[0].inputs)
    assert all(
        torch.equal(x.inputs, y.inputs) and x.num_tokens == y.num_tokens for x, y in zip(b1, b2)
    )
    counts = {b.num_tokens for b in b1}
    assert len(counts) > 5, counts
    assert not torch.equal(next(MicroBatchSampler(corpus, 8, 64, seed=4)).inputs, b1[0].inputs)
    for b in b1:  # rows are right-padded: real targets first, then only padding
        real = b.targets != IGNORE_INDEX
        assert torch.equal(real, real.cummin(dim=1).values)
        assert torch.equal(b.inputs[:, 1:][real[:, 1:]], b.targets[:, :-1][real[:, 1:]])


def test_sampler_resumes_exactly_from_its_state(corpus: Corpus) -> None:
    s = MicroBatchSampler(corpus, 4, 32, seed=9)
    for _ in range(5):
        next(s)
    state = s.state_dict()
    assert state == {"seed": 9, "cursor": 20}
    expected = [next(s) for _ in range(5)]
    resumed = MicroBatchSampler(corpus, 4, 32, seed=0)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # plain data survives JSON
    assert all(torch.equal(x.inputs, next(resumed).inputs) for x in expected)
    with pytest.raises(KeyError, match="cursor"):
        resumed.load_state_dict({"seed": 1})


def test_ranks_shard_one_global_stream(corpus: Corpus) -> None:
    """Rank r of W with micro-batch B: the union is a single process's micro-batch W*B."""
    single = MicroBatchSampler(corpus, 6, 32, seed=2)
    ranks = [MicroBatchSampler(corpus, 2, 32, seed=2, rank=r, world_size=3) for r in range(3)]
    for _ in range(4):
        whole = next(single).inputs
        parts = torch.cat([next(r).inputs for r in ranks])
        assert torch.equal(whole, parts)
    # Resuming under another world size continues the same stream.
    other = MicroBatchSampler(corpus, 3, 32, seed=0, rank=1, world_size=2)
    other.load_state_dict(ranks[0].state_dict())
    assert torch.equal(next(other).inputs, next(single).inputs[3:])


def test_eval_set_is_fixed_and_world_size_independent(corpus: Corpus) -> None:
    _, held = corpus.split(0.2, seed=0)
    model = build_model(TINY, seed=0)
    totals = []
    for world in (1, 2, 3):
        per_rank = [
            eval_batches(held, 4, 32, max_windows=30, rank=r, world_size=world)
            for r in range(world)
        ]
        assert len({len(b) for b in per_rank}) == 1  # same number of forwards on every rank
        with torch.no_grad():
            s = sum(loss(model, b, "sum")[0].item() for bs in per_rank for b in bs)
        totals.append((round(s, 3), sum(b.num_tokens for bs in per_rank for b in bs)))
    assert totals[0] == totals[1] == totals[2]
    assert totals[0][1] > 0


# --- checkpoints ---------------------------------------------------------------------


def _make_run(corpus: Corpus, seed: int = 0):
    model = build_model(TINY, seed=seed)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=3e-3)
    extend_optimizer(opt, "gradient_norm_threshold", 1.0)
    schedule = cosine_annealing_with_warmup(opt, 1.0, 0.1, 2, 20)
    return model, opt, schedule, MicroBatchSampler(corpus, 4, TINY.seq_len, seed=1)


def _tiny_run() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model and optimizer for checkpoint tests that are about the files, not the run."""
    model = torch.nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_checkpoint_round_trip_resumes_bitwise(corpus: Corpus, tmp_path: Path) -> None:
    """Two steps, save, two steps == two steps, save, load into a fresh run, two steps."""
    model, opt, schedule, sampler = _make_run(corpus)
    for _ in range(2):
        _train_step(model, opt, next(sampler))
        schedule.step()
    opt.param_groups[1]["gradient_norm_threshold"] = 0.4
    ref = save_checkpoint(
        tmp_path,
        2,
        model,
        opt,
        {"step": 2, "schedule": schedule.state_dict(), "data": sampler.state_dict()},
        rank_state={"rng": capture_rng_state()},
    )
    for _ in range(2):
        _train_step(model, opt, next(sampler))
        schedule.step()
        torch.rand(1)  # the RNG moves on, too
    expected, expected_rand = _params(model), torch.rand(3)

    model2, opt2, schedule2, sampler2 = _make_run(corpus, seed=1)
    assert latest_valid_checkpoint(tmp_path) == ref
    state, own = load_checkpoint(ref, model2, opt2)
    assert state["step"] == 2
    schedule2.load_state_dict(state["schedule"])
    sampler2.load_state_dict(state["data"])
    restore_rng_state(own["rng"])
    for _ in range(2):
        _train_step(model2, opt2, next(sampler2))
        schedule2.step()
        torch.rand(1)
    assert all(torch.equal(a, b) for a, b in zip(expected, _params(model2)))
    assert torch.equal(torch.rand(3), expected_rand)
    assert [g["gradient_norm_threshold"] for g in opt2.param_groups] == [1.0, 0.4]


def test_rng_state_round_trip_covers_python_random() -> None:
    state = capture_rng_state()
    expected = (random.random(), torch.rand(2))
    restore_rng_state(state)
    assert random.random() == expected[0] and torch.equal(torch.rand(2), expected[1])


def test_unloadable_state_is_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"state\['schedule'\]\['fn'\] is a builtins.function"):
        save_checkpoint(tmp_path, 1, *_tiny_run(), {"schedule": {"fn": lambda t: t}})
    with pytest.raises(TypeError, match="numpy"):
        import numpy as np

        save_checkpoint(tmp_path, 1, *_tiny_run(), {"x": np.float64(1.0)})
    with pytest.raises(TypeError, match=r"rank_state\['rng'\] is a builtins.object"):
        save_checkpoint(tmp_path, 1, *_tiny_run(), {}, rank_state={"rng": object()})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest", "no_payload"])
def test_damaged_checkpoint_is_refused_and_the_previous_one_used(
    tmp_path: Path, damage: str
) -> None:
    model, opt = _tiny_run()
    for step in (1, 2):
        state = {"step": step, "w": torch.full((256,), float(step))}
        save_checkpoint(tmp_path, step, model, opt, state)
    newest = list_checkpoints(tmp_path)[0]
    plain, shard = newest.path / "state.pt", next(newest.path.glob("*.distcp"))
    if damage == "truncate":
        plain.write_bytes(plain.read_bytes()[: plain.stat().st_size // 2])
    elif damage == "flip":
        data = shard.read_bytes()
        shard.write_bytes(data[:-40] + bytes([data[-40] ^ 1]) + data[-39:])
    elif damage == "no_manifest":  # a crash between payload and manifest
        newest.manifest.unlink()
    else:
        shard.unlink()

    if damage != "no_manifest":
        with pytest.raises(CheckpointError, match="corrupt or truncated|missing"):
            load_checkpoint(newest, model, opt)
        with pytest.warns(RuntimeWarning, match="skipping checkpoint"):
            ref = latest_valid_checkpoint(tmp_path)
    else:
        with pytest.raises(CheckpointError, match="no manifest"):
            load_checkpoint(newest, model, opt)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ref = latest_valid_checkpoint(tmp_path)
    assert ref is not None and ref.step == 1
    assert load_checkpoint(ref, model, opt)[0]["step"] == 1


def test_keep_last_prunes_old_checkpoints(tmp_path: Path) -> None:
    model, opt = _tiny_run()
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model, opt, {"step": step}, keep_last=2)
    assert [r.step for r in list_checkpoints(tmp_path)] == [5, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000005"]
    # One process writes the layout N ranks write: DCP files, state, manifest.
    assert sorted(p.name for p in (tmp_path / "step_00000005").iterdir()) == [
        ".metadata",
        "MANIFEST.json",
        "__0_0.distcp",
        "state.pt",
    ]
    assert latest_valid_checkpoint(tmp_path / "nothing") is None


def test_checkpoint_ignores_partial_writes_and_foreign_pickles(
    corpus: Corpus, tmp_path: Path
) -> None:
    model, opt, _, sampler = _make_run(corpus)
    _train_step(model, opt, next(sampler))
    ref = save_checkpoint(tmp_path, 3, model, opt, {"step": 3})
    # What a crash leaves: a temporary folder, a renamed folder without its manifest.
    (tmp_path / ".tmp.step_00000009").mkdir()
    (tmp_path / "step_00000008").mkdir()
    (tmp_path / "step_00000008" / "state.pt").write_bytes(b"partial")
    assert latest_valid_checkpoint(tmp_path) == ref
    model2, opt2, _, _ = _make_run(corpus, seed=1)
    assert load_checkpoint(ref, model2, opt2) == ({"step": 3}, None)
    assert all(torch.equal(a, b) for a, b in zip(_params(model), _params(model2)))
    save_checkpoint(tmp_path, 4, model, opt, {"step": 4})  # and the next save clears them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004"]

    # A .metadata naming anything but DCP's own classes is refused, even with a
    # manifest that matches it.
    (ref.path / ".metadata").write_bytes(pickle.dumps(print))
    manifest = json.loads(ref.manifest.read_bytes())
    manifest["files"][".metadata"] = {
        "bytes": len(pickle.dumps(print)),
        "sha256": hashlib.sha256(pickle.dumps(print)).hexdigest(),
    }
    ref.manifest.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="refusing to load global builtins.print"):
        load_checkpoint(ref, model2, opt2)


# --- distributed ---------------------------------------------------------------------


def test_single_process_strategy_resolution() -> None:
    assert resolve_strategy("auto", 1) == "none" and resolve_strategy("auto", 2) == "ddp"
    assert resolve_strategy("fsdp", 1) == "fsdp"
    with pytest.raises(ValueError, match="strategy"):
        resolve_strategy("zero3", 2)  # type: ignore[arg-type]
    assert is_rank0()
    teardown()  # no group: a no-op


def test_agent_store_group_keys_live_under_the_restart_count(monkeypatch) -> None:
    # pytorch/pytorch#135712: a restarted group must not read the last attempt's keys.
    agent = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    for name, value in dict(
        RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=agent.port
    ).items():
        monkeypatch.setenv(name, str(value))
    try:
        init_distributed("cpu", timeout=timedelta(seconds=60))
        keys = agent.list_keys()
    finally:
        teardown()
    assert keys and all(key.startswith("/schedany/attempt_2/") for key in keys), keys


def _dcp_round_trip(env, strategy: str, root: Path, corpus: Corpus, single: Path) -> None:
    def make(seed: int, threshold: float | None, weight_decay: float = 0.3):
        model = wrap_model(build_model(TINY, seed=seed), strategy, env)
        opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=1e-2)
        if threshold is not None:
            extend_optimizer(opt, "gradient_norm_threshold", threshold)
        return model, opt

    model, opt = make(0, 1.0, weight_decay=0.1)
    opt.param_groups[1]["gradient_norm_threshold"] = 0.25  # differs per group
    sampler = MicroBatchSampler(corpus, 2, TINY.seq_len, rank=env.rank, world_size=env.world_size)
    for step in (1, 2):
        _train_step(model, opt, next(sampler))
        save_checkpoint(
            root,
            step,
            model,
            opt,
            {"step": step, "data": sampler.state_dict()},
            rank_state={"rank": env.rank, "rng": capture_rng_state()},
        )
        params = _params(model)  # a collective under FSDP
        if env.rank == 0:  # for the one-process load of this checkpoint, after the spawn
            torch.save(params, root.parent / f"{strategy}_step_{step}.pt")
    ref = latest_valid_checkpoint(root)
    assert ref is not None and ref.step == 2
    saved = _params(model)
    batch = next(sampler)
    _train_step(model, opt, batch)
    after = _params(model)

    # threshold=None: the key is absent and must be written in before DCP loads;
    # threshold=5.0: the key exists and DCP itself must overwrite it.
    for seed, threshold in ((7, None), (8, 5.0)):
        model2, opt2 = make(seed, threshold)
        state, own = load_checkpoint(ref, model2, opt2)
        assert state == {"step": 2, "data": {"seed": 0, "cursor": 2 * 2 * env.world_size}}
        assert own is not None and own["rank"] == env.rank
        assert [g["gradient_norm_threshold"] for g in opt2.param_groups] == [1.0, 0.25]
        assert [g["weight_decay"] for g in opt2.param_groups] == [0.1, 0.0]
        assert all(torch.equal(a, b) for a, b in zip(saved, _params(model2))), strategy
        _train_step(model2, opt2, batch)  # optimizer moments came back too
        assert all(torch.equal(a, b) for a, b in zip(after, _params(model2))), strategy

    # A damaged newest checkpoint is refused on every rank; the one before it loads.
    if env.rank == 0:
        shard = next(ref.path.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:-7])
    dist.barrier()
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(ref, *make(9, None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = latest_valid_checkpoint(root)
    assert previous is not None and previous.step == 1
    state, _ = load_checkpoint(previous, *make(9, None))
    assert state["step"] == 1

    # A checkpoint written by one process loads on every rank; rank 1, which did not
    # exist there, gets rank 0's rank_state.
    model3, opt3 = make(10, None)
    state, own = load_checkpoint(latest_valid_checkpoint(single), model3, opt3)
    assert state == {"step": 1} and own == {"rank": 0}
    expected = torch.load(single.parent / "single_step_1.pt", weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(expected, _params(model3))), strategy
    assert [g["gradient_norm_threshold"] for g in opt3.param_groups] == [1.0, 0.25]


def _dcp_worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    env = init_distributed("cpu", init_method=f"file://{tmp}/init", timeout=timedelta(seconds=60))
    try:
        assert dist.get_backend() == "gloo" and env.rank == rank and env.world_size == world
        corpus = load_corpus(max_bytes=100_000)
        for strategy in ("ddp", "fsdp"):
            _dcp_round_trip(env, strategy, Path(tmp) / strategy, corpus, Path(tmp) / "single")
    finally:
        teardown()


@pytest.mark.slow
def test_dcp_round_trip_ddp_and_fsdp2_keeps_extended_keys(corpus: Corpus, tmp_path: Path) -> None:
    """Save and load on 2 ranks (DDP, FSDP2); and across world sizes: a one-process
    checkpoint loads on 2 ranks, a 2-rank one in one process (DCP reshards)."""
    model = build_model(TINY, seed=4)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    extend_optimizer(opt, "gradient_norm_threshold", 1.0)
    opt.param_groups[1]["gradient_norm_threshold"] = 0.25
    _train_step(model, opt, next(MicroBatchSampler(corpus, 2, TINY.seq_len)))
    save_checkpoint(tmp_path / "single", 1, model, opt, {"step": 1}, rank_state={"rank": 0})
    torch.save(_params(model), tmp_path / "single_step_1.pt")

    mp.spawn(_dcp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)

    for strategy in ("ddp", "fsdp"):
        model = build_model(TINY, seed=11)
        opt = torch.optim.AdamW(param_groups(model, 0.3), lr=1e-2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the workers damaged step 2
            ref = latest_valid_checkpoint(tmp_path / strategy)
        assert ref is not None and ref.step == 1
        state, own = load_checkpoint(ref, model, opt)
        assert state["step"] == 1 and own is not None and own["rank"] == 0
        expected = torch.load(tmp_path / f"{strategy}_step_1.pt", weights_only=True)
        assert all(torch.equal(a, b) for a, b in zip(expected, _params(model))), strategy
        assert [g["gradient_norm_threshold"] for g in opt.param_groups] == [1.0, 0.25]
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
        assert all(int(s["step"]) == 1 for s in opt.state.values())
