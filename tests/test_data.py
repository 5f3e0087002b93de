"""Token shards (format, checks) and DataLoaderLite (partitioning over ranks, shuffling, exact resume)."""

from __future__ import annotations

import hashlib
import io
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2.data import (
    HEADER_BYTES,
    DataLoaderLite,
    LoaderConfig,
    read_shard,
    read_shard_header,
    write_shard,
)


def make_shards(root: Path, sizes: list[int], split: str = "train") -> np.ndarray:
    """Shards whose tokens are their global index in file order (so every token says where it came from)."""
    root.mkdir(parents=True, exist_ok=True)
    stream = np.arange(sum(sizes), dtype=np.int64)
    assert stream.size < 50257
    start = 0
    for i, n in enumerate(sizes):
        write_shard(root / f"t_{split}_{i:06d}.bin", stream[start : start + n])
        start += n
    return stream


def loaders(root: Path, world_size: int, B: int, T: int, **kw) -> list[DataLoaderLite]:
    return [
        DataLoaderLite(LoaderConfig(root, B, T, process_rank=r, world_size=world_size, **kw)) for r in range(world_size)
    ]


# -- shard format ----------------------------------------------------------------------------------


def test_shard_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, size=1000)
    tokens[:2] = [0, 50256]
    path = tmp_path / "x_train_000000.bin"
    sha = write_shard(path, tokens)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert path.stat().st_size == HEADER_BYTES + 2 * 1000
    header = read_shard_header(path)
    assert (header.version, header.dtype, header.num_tokens, header.vocab_size) == (1, "uint16", 1000, 50257)
    np.testing.assert_array_equal(read_shard(path), tokens)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    # An empty shard is valid too.
    write_shard(tmp_path / "e.bin", np.zeros(0, dtype=np.int64))
    assert read_shard(tmp_path / "e.bin").size == 0


def test_write_shard_refuses_out_of_range_ids(tmp_path):
    with pytest.raises(ValueError, match=r"\[0, 50257\)"):
        write_shard(tmp_path / "x.bin", np.array([1, 50257]))
    with pytest.raises(ValueError, match="1-D"):
        write_shard(tmp_path / "x.bin", np.zeros((2, 2), dtype=np.int64))
    assert not list(tmp_path.iterdir())


def test_large_vocab_uses_uint32(tmp_path):
    write_shard(tmp_path / "x.bin", np.array([0, 70000]), vocab_size=100277)
    assert read_shard_header(tmp_path / "x.bin").dtype == "uint32"
    np.testing.assert_array_equal(read_shard(tmp_path / "x.bin"), [0, 70000])


def corrupt(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: corrupt(p, 0, b"NOTASHRD"), "bad header magic"),
        (lambda p: p.write_bytes(b"GPT2"), "bad header magic"),
        (lambda p: p.write_bytes(p.read_bytes()[:-3]), "truncated"),
        (lambda p: p.write_bytes(p.read_bytes() + b"\0\0"), "truncated or corrupt"),
        (lambda p: corrupt(p, 8, struct.pack("<I", 7)), "format version 7"),
        (lambda p: corrupt(p, 16, b"float32\0"), "corrupt header"),
        (lambda p: corrupt(p, 24, struct.pack("<Q", 10**6)), "truncated"),
    ],
)
def test_bad_shards_fail_with_one_line(tmp_path, damage, message):
    path = tmp_path / "x_train_000000.bin"
    write_shard(path, np.arange(5000))
    damage(path)
    for read in (read_shard_header, read_shard, lambda p: DataLoaderLite(LoaderConfig(tmp_path, 1, 8))):
        with pytest.raises(ValueError, match=message) as info:
            read(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_token_ids_over_vocab_are_caught(tmp_path):
    path = tmp_path / "x_train_000000.bin"
    write_shard(path, np.arange(100))
    corrupt(path, HEADER_BYTES + 2 * 50, struct.pack("<H", 60000))
    with pytest.raises(ValueError, match="token id 60000 >= vocab size 50257 at position 50"):
        read_shard(path)
    loader = DataLoaderLite(LoaderConfig(tmp_path, 1, 16))
    for _ in range(3):  # chunks 0-2 (tokens 0..48) are fine
        loader.next_batch()
    with pytest.raises(ValueError, match="token id 60000 >= vocab size"):
        loader.next_batch()


def test_missing_data_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; create it with `gpt2 prepare"):
        DataLoaderLite(LoaderConfig(tmp_path / "nope", 1, 8))
    make_shards(tmp_path, [100], split="train")
    with pytest.raises(FileNotFoundError, match=r"no 'val' shards \(\*_val_\*.bin\)"):
        DataLoaderLite(LoaderConfig(tmp_path, 1, 8, split="val"))


def test_split_too_small_says_how_many_tokens(tmp_path):
    make_shards(tmp_path, [60, 40])
    with pytest.raises(ValueError, match=r"has 100 tokens, but one batch per rank needs 129 \(world_size 2 x"):
        DataLoaderLite(LoaderConfig(tmp_path, 4, 16, process_rank=1, world_size=2))
    DataLoaderLite(LoaderConfig(tmp_path, 3, 16, process_rank=1, world_size=2))  # 97 tokens needed: fits


def test_config_is_checked():
    with pytest.raises(ValueError, match="process_rank"):
        LoaderConfig("x", 1, 8, process_rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        LoaderConfig("x", 0, 8)
    with pytest.raises(ValueError, match="split"):
        LoaderConfig("x", 1, 8, split="*")


# -- batches and partitioning ----------------------------------------------------------------------


def test_batches_are_shifted_and_wrap(tmp_path):
    stream = make_shards(tmp_path, [50, 30, 21])  # 101 tokens: K = 100 // 20 = 5 chunks of B*T = 20
    loader = DataLoaderLite(LoaderConfig(tmp_path, 2, 10))
    assert (loader.num_tokens, loader.num_chunks, loader.steps_per_epoch) == (101, 5, 5)
    for step in range(5):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (2, 10) and x.dtype == y.dtype == torch.int64
        start = step * 20  # the chunk crosses shard boundaries at 50 and 80 without skipping a token
        np.testing.assert_array_equal(x.flatten().numpy(), stream[start : start + 20])
        np.testing.assert_array_equal(y.flatten().numpy(), stream[start + 1 : start + 21])
    assert loader.epoch == 0
    x, _ = loader.next_batch()
    assert loader.epoch == 1 and int(x[0, 0]) == 0
    loader.reset()
    assert (loader.epoch, loader.position) == (0, 0)
    assert int(next(iter(loader))[0][0, 0]) == 0


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_one_epoch_visits_every_chunk_once_in_order(tmp_path, world_size):
    sizes = [1000, 37, 2500, 1, 700]
    stream = make_shards(tmp_path, sizes)
    B, T = 2, 8
    ranks = loaders(tmp_path, world_size, B, T)
    K = (stream.size - 1) // (B * T)
    steps = K // world_size
    assert ranks[0].steps_per_epoch == steps
    seen = np.zeros(stream.size, dtype=np.int64)
    for step in range(steps):
        for r, loader in enumerate(ranks):
            x, y = loader.next_batch()
            chunk = step * world_size + r  # rank r strides by B*T*world_size from offset r*B*T
            np.testing.assert_array_equal(x.flatten().numpy(), stream[chunk * B * T : (chunk + 1) * B * T])
            np.testing.assert_array_equal(y.flatten().numpy(), x.flatten().numpy() + 1)
            seen[x.flatten().numpy()] += 1
    # Every token of the first steps*world_size chunks exactly once; only the final partial step is left out.
    assert (seen[: steps * world_size * B * T] == 1).all() and seen[steps * world_size * B * T :].sum() == 0
    assert stream.size - steps * world_size * B * T <= world_size * B * T  # at most W-1 chunks + B*T tokens lost
    assert all(loader.epoch == 0 for loader in ranks)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_shuffled_epoch_visits_every_chunk_once(tmp_path, world_size):
    sizes = [300, 129, 200, 7, 1]  # 637 tokens: K = 636 // 12 = 53 chunks
    make_shards(tmp_path, sizes)
    ends = set(np.cumsum(sizes) - 1)  # the last token of each shard (in file order)
    firsts = set(np.cumsum([0] + sizes[:-1]))
    B, T = 3, 4
    ranks = loaders(tmp_path, world_size, B, T, shuffle=True, seed=7)
    steps = ranks[0].steps_per_epoch
    assert steps == 53 // world_size

    def epoch_chunks() -> list[tuple[int, ...]]:
        chunks = []
        for _ in range(steps):
            for loader in ranks:
                x, y = loader.next_batch()
                xs, ys = x.flatten().numpy(), y.flatten().numpy()
                np.testing.assert_array_equal(ys[:-1], xs[1:])  # y is x shifted, also across rows
                for a, b in zip(xs, ys):  # consecutive in a shard, or a jump from a shard's end to a shard's start
                    assert b == a + 1 or (a in ends and b in firsts)
                chunks.append(tuple(xs))
        return chunks

    first = epoch_chunks()
    tokens = np.concatenate([np.array(c) for c in first])
    assert len(np.unique(tokens)) == tokens.size == steps * world_size * B * T  # no chunk twice, no overlap
    # Shuffled: not the stream order; a new order next epoch; the same order for every rank (no overlap above).
    assert [c[0] for c in first] != sorted(c[0] for c in first)
    second = epoch_chunks()
    assert all(loader.epoch == 1 for loader in ranks)
    assert second != first
    assert len(np.unique(np.concatenate([np.array(c) for c in second]))) == steps * world_size * B * T


def test_shuffle_is_seeded(tmp_path):
    make_shards(tmp_path, [400, 300])

    def firsts(seed: int) -> list[int]:
        loader = DataLoaderLite(LoaderConfig(tmp_path, 1, 8, shuffle=True, seed=seed))
        return [int(loader.next_batch()[0][0, 0]) for _ in range(20)]

    assert firsts(1) == firsts(1)
    assert firsts(1) != firsts(2)


# -- resume ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [False, True])
def test_state_dict_resumes_on_the_next_batch(tmp_path, shuffle):
    make_shards(tmp_path, [500, 333, 250])
    cfg = dict(shuffle=shuffle, seed=3)
    ranks = loaders(tmp_path, 2, 2, 8, **cfg)
    for _ in range(40):  # past the end of epoch 0 (33 steps)
        for loader in ranks:
            loader.next_batch()
    states = [loader.state_dict() for loader in ranks]
    buffer = io.BytesIO()
    torch.save(states, buffer)  # what training stores in trainer_state.pt
    buffer.seek(0)
    states = torch.load(buffer, weights_only=True)
    expected = [[loader.next_batch() for _ in range(40)] for loader in ranks]
    fresh = loaders(tmp_path, 2, 2, 8, **cfg)
    for loader, state, want in zip(fresh, states, expected):
        loader.load_state_dict(state)
        for x_want, y_want in want:
            x, y = loader.next_batch()
            assert torch.equal(x, x_want) and torch.equal(y, y_want)


def test_resume_with_another_world_size_continues_the_stream(tmp_path):
    make_shards(tmp_path, [800])
    two = loaders(tmp_path, 2, 1, 8)
    for _ in range(5):
        for loader in two:
            loader.next_batch()
    one = DataLoaderLite(LoaderConfig(tmp_path, 1, 8))
    one.load_state_dict(two[0].state_dict())
    assert int(one.next_batch()[0][0, 0]) == 10 * 8  # chunk 10: the first one nobody read


def test_state_from_other_settings_is_refused(tmp_path):
    make_shards(tmp_path, [800])
    state = DataLoaderLite(LoaderConfig(tmp_path, 2, 8)).state_dict()
    with pytest.raises(ValueError, match="different batch_size"):
        DataLoaderLite(LoaderConfig(tmp_path, 4, 8)).load_state_dict(state)
    with pytest.raises(ValueError, match="different shuffle"):
        DataLoaderLite(LoaderConfig(tmp_path, 2, 8, shuffle=True)).load_state_dict(state)


def test_reads_build_nanogpt_npy_shards(tmp_path):
    np.save(tmp_path / "edufineweb_val_000000.npy", np.arange(100, dtype=np.uint16))
    x, y = DataLoaderLite(LoaderConfig(tmp_path, 2, 4, split="val")).next_batch()
    assert x.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and y[1, 3] == 8


def test_log_only_on_master(tmp_path):
    make_shards(tmp_path, [100])
    lines: list[str] = []
    DataLoaderLite(LoaderConfig(tmp_path, 1, 8), log=lines.append)
    DataLoaderLite(LoaderConfig(tmp_path, 1, 8, master_process=False), log=lines.append)
    assert len(lines) == 1 and "100 tokens" in lines[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_match_cpu(tmp_path):
    make_shards(tmp_path, [3000, 2000])
    cpu = DataLoaderLite(LoaderConfig(tmp_path, 4, 16, shuffle=True))
    gpu = DataLoaderLite(LoaderConfig(tmp_path, 4, 16, shuffle=True), device="cuda")
    batches = [gpu.next_batch() for _ in range(30)]  # several in flight through the two pinned buffers
    for x_gpu, y_gpu in batches:
        x, y = cpu.next_batch()
        assert x_gpu.is_cuda and torch.equal(x_gpu.cpu(), x) and torch.equal(y_gpu.cpu(), y)
