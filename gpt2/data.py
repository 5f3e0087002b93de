"""Token shards on disk, and the loader that streams them to every rank.

Shard format (version 1): a 64-byte little-endian header, then the tokens.

    offset  size  field
    0       8     magic b"GPT2TOKS"
    8       4     format version (uint32, 1)
    12      4     header size in bytes (uint32, 64; tokens start here)
    16      8     token dtype, ASCII, NUL-padded ("uint16"; "uint32" for vocabularies > 65,536)
    24      8     number of tokens (uint64)
    32      4     vocabulary size (uint32; every token id is below it)
    36      28    zero

A reader checks magic, version, dtype and that the file size is exactly header + tokens, so a
truncated or foreign file fails with one line instead of training on garbage (modded-nanogpt checks
its shards the same way). Shards are named `<prefix>_<split>_<index:06d>.bin` with manifest.json
beside them (written by gpt2.prepare).

The loader views a split's shards as one token stream of N tokens, cut into K = (N-1) // (B*T)
chunks of B*T+1 tokens (the +1 is the last target). Step s of rank r reads chunk s*W + r: ranks
stride by B*T*W from a per-rank offset, across shard boundaries, so an epoch loses at most W-1
chunks plus B*T tokens at the very end instead of a remainder per shard (build-nanogpt PR #109).
With shuffle, each epoch permutes the shard order and the chunk order within each shard, seeded by
(seed, epoch), so every rank computes the same order without communication (build-nanogpt PR #52).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gpt2.config import VOCAB_SIZE
from gpt2.fileio import atomic_write

MAGIC = b"GPT2TOKS"
VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sII8sQI")  # magic, version, header bytes, dtype, num tokens, vocab size
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
MANIFEST = "manifest.json"  # a shard directory's record of its shards (gpt2 prepare writes it)


@dataclass(frozen=True)
class ShardHeader:
    """What a shard's header says about the tokens that follow it."""

    version: int
    dtype: str  # a key of DTYPES
    num_tokens: int
    vocab_size: int
    header_bytes: int = HEADER_BYTES

    @property
    def file_bytes(self) -> int:
        return self.header_bytes + self.num_tokens * DTYPES[self.dtype].itemsize


def shard_dtype(vocab_size: int) -> str:
    """The smallest token dtype that holds ids below `vocab_size`."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def write_shard(path: str | Path, tokens: np.ndarray, *, vocab_size: int = VOCAB_SIZE) -> str:
    """Write 1-D token ids (all < vocab_size) as a shard and return the file's sha256 hex digest.

    Crash-safe: the bytes go to a hidden temporary name, are fsync'ed, then renamed over `path`,
    so a reader never sees a half-written shard."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"write_shard needs a 1-D array of token ids, got shape {tokens.shape}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(f"token ids must be in [0, {vocab_size}) to be written to {path}")
    dtype = shard_dtype(vocab_size)
    data = np.ascontiguousarray(tokens, dtype=DTYPES[dtype])
    header = _HEADER.pack(MAGIC, VERSION, HEADER_BYTES, dtype.encode("ascii"), data.size, vocab_size)
    header = header.ljust(HEADER_BYTES, b"\0")
    digest = hashlib.sha256(header)
    digest.update(memoryview(data).cast("B"))

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(memoryview(data).cast("B"))

    atomic_write(path, write)  # a full disk: a one-line WriteError naming the shard
    return digest.hexdigest()


def read_shard_header(path: str | Path) -> ShardHeader:
    """Read and check a shard's header, including that the file holds exactly the tokens it announces."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such shard: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < _HEADER.size or raw[:8] != MAGIC:
        raise ValueError(f"{path} is not a gpt2 token shard (bad header magic); re-create it with `gpt2 prepare`")
    _, version, header_bytes, dtype_raw, num_tokens, vocab_size = _HEADER.unpack_from(raw)
    if version > VERSION:
        raise ValueError(f"{path} has shard format version {version} but this gpt2 reads up to {VERSION}; upgrade gpt2")
    dtype = dtype_raw.rstrip(b"\0").decode("ascii", "replace")
    if version < 1 or header_bytes < _HEADER.size or dtype not in DTYPES or vocab_size < 1:
        raise ValueError(
            f"{path} has a corrupt header (version {version}, dtype {dtype!r}, vocab {vocab_size}); "
            "re-create it with `gpt2 prepare`"
        )
    header = ShardHeader(version, dtype, num_tokens, vocab_size, header_bytes)
    if size != header.file_bytes:
        raise ValueError(
            f"{path} is truncated or corrupt: its header says {num_tokens:,} tokens ({header.file_bytes:,} bytes) "
            f"but the file has {size:,} bytes; re-create it with `gpt2 prepare`"
        )
    return header


def open_shard(path: str | Path) -> tuple[np.ndarray, int]:
    """Memory-map a shard's tokens (read-only, nothing read yet) and return them with the vocab size.

    Also opens build-nanogpt's `.npy` shards (uint16, no header; vocab size 50257 assumed)."""
    path = Path(path)
    if path.suffix == ".npy":
        try:
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ValueError(f"{path} is not a readable .npy token shard ({e}); re-create it") from None
        if tokens.ndim != 1 or tokens.dtype.kind != "u":
            raise ValueError(f"{path} holds {tokens.dtype} of shape {tokens.shape}, not 1-D unsigned token ids")
        return tokens, VOCAB_SIZE
    header = read_shard_header(path)
    if header.num_tokens == 0:
        return np.zeros(0, dtype=DTYPES[header.dtype]), header.vocab_size
    tokens = np.memmap(
        path, dtype=DTYPES[header.dtype], mode="r", offset=header.header_bytes, shape=(header.num_tokens,)
    )
    return tokens, header.vocab_size


def read_shard(path: str | Path) -> np.ndarray:
    """All tokens of a shard, in memory, after checking the header and that every id is below the vocab size."""
    tokens, vocab_size = open_shard(path)
    tokens = np.array(tokens)
    if tokens.size and int(tokens.max()) >= vocab_size:
        where = int(np.argmax(tokens >= vocab_size))
        raise ValueError(
            f"{path} holds token id {int(tokens[where])} >= vocab size {vocab_size} at position {where:,}; "
            "the shard is corrupt or from another tokenizer, re-create it with `gpt2 prepare`"
        )
    return tokens


def find_shards(data_root: str | Path, split: str) -> list[Path]:
    """The shards of one split (`*_<split>_*.bin`, else build-nanogpt's `*_<split>_*.npy`), in name order."""
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"data directory {root} does not exist; create it with `gpt2 prepare SOURCE --out {root}`"
        )
    shards = sorted(root.glob(f"*_{split}_*.bin")) or sorted(root.glob(f"*_{split}_*.npy"))
    if not shards:
        raise FileNotFoundError(
            f"no '{split}' shards (*_{split}_*.bin) in {root}; create them with `gpt2 prepare SOURCE --out {root}`"
        )
    return shards


@dataclass(frozen=True)
class LoaderConfig:
    """Which shards to read and how this rank cuts them into batches."""

    data_root: str | Path  # directory of shards written by `gpt2 prepare`
    batch_size: int  # B: sequences per batch on this rank
    seq_len: int  # T: tokens per sequence
    split: str = "train"  # shard files are *_<split>_*.bin
    process_rank: int = 0  # this rank, 0 <= process_rank < world_size
    world_size: int = 1  # number of ranks sharing the stream
    master_process: bool = True  # only the master logs
    shuffle: bool = False  # permute shard order and chunk order within each shard, per epoch
    seed: int = 0  # shuffle seed; all ranks must use the same

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LoaderConfig.{name} must be a positive integer, got {value!r}")
        if not 0 <= self.process_rank < self.world_size:
            raise ValueError(f"LoaderConfig.process_rank must be in [0, {self.world_size}), got {self.process_rank}")
        if not self.split or any(c in self.split for c in "*?[]/\\"):
            raise ValueError(f"LoaderConfig.split must be a plain name like 'train' or 'val', got {self.split!r}")


class DataLoaderLite:
    """Infinite (x, y) batches of shape (B, T) for one rank; y is x shifted left by one token.

    Shards are memory-mapped, so a rank only touches the pages of the chunks it reads. On CUDA,
    batches go through pinned memory with non-blocking copies (two alternating buffers, so a copy
    in flight is never overwritten)."""

    STATE_VERSION = 1

    def __init__(
        self, config: LoaderConfig, device: str | torch.device = "cpu", *, log: Callable[[str], None] | None = None
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self.shards = find_shards(config.data_root, config.split)
        opened = [open_shard(p) for p in self.shards]
        self._tokens = [t for t, _ in opened]
        self._vocab_sizes = [v for _, v in opened]
        self._sizes = np.array([t.size for t in self._tokens], dtype=np.int64)
        self.num_tokens = int(self._sizes.sum())

        B, T, W = config.batch_size, config.seq_len, config.world_size
        self.chunk_tokens = B * T
        needed = W * B * T + 1
        if self.num_tokens < needed:
            raise ValueError(
                f"the '{config.split}' split in {config.data_root} has {self.num_tokens:,} tokens, but one batch per "
                f"rank needs {needed:,} (world_size {W} x batch_size {B} x seq_len {T} + 1); "
                "use a smaller batch size or sequence length, or prepare more data"
            )
        self.num_chunks = (self.num_tokens - 1) // self.chunk_tokens  # K
        self.steps_per_epoch = self.num_chunks // W

        self._pinned: list[Tensor] = []
        self._copied: list[torch.cuda.Event | None] = []
        if self.device.type == "cuda":
            self._pinned = [torch.empty(B * T + 1, dtype=torch.int64).pin_memory() for _ in range(2)]
            self._copied = [None, None]
        self._flip = 0
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._perm_cache: dict[int, np.ndarray] = {}
        self.reset()
        if log is not None and config.master_process:
            log(
                f"data: {config.split} split of {config.data_root}: {len(self.shards)} shard(s), "
                f"{self.num_tokens:,} tokens, {self.steps_per_epoch:,} steps of {W}x{B}x{T} per epoch"
            )

    # -- position -------------------------------------------------------------------------------

    def reset(self) -> None:
        """Go back to the first batch of epoch 0 (e.g. before each validation pass)."""
        self.epoch = 0
        self.position = 0  # index, in this epoch's chunk order, of the next step's first chunk (same on all ranks)

    def state_dict(self) -> dict:
        """Plain python values that identify the next batch (torch.load(weights_only=True) can read them)."""
        c = self.config
        return {
            "version": self.STATE_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            "batch_size": c.batch_size,
            "seq_len": c.seq_len,
            "shuffle": c.shuffle,
            "seed": c.seed,
            "split": c.split,
            "num_tokens": self.num_tokens,
            "shards": [p.name for p in self.shards],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state_dict()` was taken: the next batch is the one that would have come.

        The data and the batch geometry must be the same; world_size may change (the position is global)."""
        c = self.config
        if int(state.get("version", -1)) != self.STATE_VERSION:
            raise ValueError(f"data loader state has version {state.get('version')!r}, expected {self.STATE_VERSION}")
        now = {
            "batch_size": c.batch_size,
            "seq_len": c.seq_len,
            "shuffle": c.shuffle,
            "seed": c.seed,
            "num_tokens": self.num_tokens,
            "shards": [p.name for p in self.shards],
        }
        differ = [k for k, v in now.items() if state.get(k) != v]
        if differ:
            raise ValueError(
                f"data loader state was saved with different {', '.join(differ)} "
                f"({', '.join(f'{k}={state.get(k)!r}' for k in differ if k != 'shards')}); "
                "resume with the same data and batch settings"
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.num_chunks:
            raise ValueError(f"data loader state has an invalid position (epoch {epoch}, chunk {position})")
        self.epoch, self.position = epoch, position

    # -- batches --------------------------------------------------------------------------------

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """The next (x, y), int64 of shape (B, T) on the loader's device."""
        c = self.config
        B, T, W = c.batch_size, c.seq_len, c.world_size
        if self.position + W > self.num_chunks:  # the epoch's last full step is done
            self.epoch += 1
            self.position = 0
        chunk = self._chunk_index(self.position + c.process_rank)
        self.position += W

        if self.device.type == "cuda":
            slot = self._flip
            self._flip ^= 1
            if self._copied[slot] is not None:
                self._copied[slot].synchronize()  # its previous copy must finish before we overwrite it
            host = self._pinned[slot]
            self._read_chunk(chunk, host.numpy())
            buf = host.to(self.device, non_blocking=True)  # (B*T+1,)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._copied[slot] = event
        else:
            host = np.empty(B * T + 1, dtype=np.int64)
            self._read_chunk(chunk, host)
            buf = torch.from_numpy(host)  # (B*T+1,)
        x = buf[:-1].view(B, T)  # (B, T)
        y = buf[1:].view(B, T)  # (B, T)
        return x, y

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            yield self.next_batch()

    def _epoch_layout(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This epoch's shard order, each shard's first token in the stream, and each shard's first chunk."""
        if self._epoch_cache is None or self._epoch_cache[0] != self.epoch:
            n = len(self.shards)
            if self.config.shuffle:
                order = np.random.default_rng([self.config.seed, self.epoch]).permutation(n)
            else:
                order = np.arange(n)
            starts = np.concatenate([[0], np.cumsum(self._sizes[order])])  # (n+1,) stream offsets
            # A chunk belongs to the shard that holds its first token.
            first_chunk = np.minimum(-(-starts // self.chunk_tokens), self.num_chunks)  # (n+1,) ceil, clipped
            self._epoch_cache = (self.epoch, order, starts, first_chunk)
            self._perm_cache = {}
        _, order, starts, first_chunk = self._epoch_cache
        return order, starts, first_chunk

    def _chunk_index(self, p: int) -> int:
        """The chunk (in this epoch's stream) at position p of this epoch's visiting order."""
        if not self.config.shuffle:
            return p
        _, _, first_chunk = self._epoch_layout()
        g = int(np.searchsorted(first_chunk, p, side="right")) - 1  # the shard whose chunks include p
        if g not in self._perm_cache:
            count = int(first_chunk[g + 1] - first_chunk[g])
            self._perm_cache[g] = np.random.default_rng([self.config.seed, self.epoch, g]).permutation(count)
        return int(first_chunk[g] + self._perm_cache[g][p - first_chunk[g]])

    def _read_chunk(self, chunk: int, out: np.ndarray) -> None:
        """Copy stream tokens [chunk*B*T, chunk*B*T + B*T + 1) into `out`, crossing shards as needed."""
        order, starts, _ = self._epoch_layout()
        pos = chunk * self.chunk_tokens
        filled = 0
        s = int(np.searchsorted(starts, pos, side="right")) - 1
        while filled < out.size:
            shard = int(order[s])
            local = pos + filled - int(starts[s])
            piece = self._tokens[shard][local : local + out.size - filled]
            if piece.size:
                top = int(piece.max())
                if top >= self._vocab_sizes[shard]:
                    where = local + int(np.argmax(piece >= self._vocab_sizes[shard]))
                    raise ValueError(
                        f"{self.shards[shard]} holds token id {top} >= vocab size {self._vocab_sizes[shard]} "
                        f"at position {where:,}; the shard is corrupt, re-create it with `gpt2 prepare`"
                    )
                out[filled : filled + piece.size] = piece
                filled += piece.size
            s += 1
