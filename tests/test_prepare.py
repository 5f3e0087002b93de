"""gpt2.prepare / `gpt2 prepare`: tokens equal tiktoken's, the val rule, determinism, resume, bad input."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt2.data import read_shard
from gpt2.prepare import PRESETS, Source, iter_blocks, iter_lines, prepare
from gpt2.prepare.reading import _safe_cut, _text_pieces
from gpt2.tokenizer import encoding

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
EOT = 50256

DOCS = [
    "First document.\nIt has two lines.",
    "Second one, with unicode: café, naïve, 東京, emoji 🎉 and   odd   spacing\n\n\n  indented\n",
    "<|endoftext|> inside a document is plain text",
    "",  # empty documents are skipped
    "x" * 3000 + "\n" + "word " * 500,
] + [f"Document number {i}: " + "the quick brown fox jumps. " * (i % 7 + 1) for i in range(60)]


def reference_encoding():
    """tiktoken's own GPT-2 encoding when its files are at hand (../shared), else the package's."""
    cache = SHARED / "tiktoken-cache"
    if cache.is_dir():
        import tiktoken

        os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(cache))
        return tiktoken.get_encoding("gpt2")
    return encoding()


def expected_stream(docs: list[str]) -> np.ndarray:
    enc = reference_encoding()
    ids: list[int] = []
    for d in docs:
        if d:
            ids += [EOT] + enc.encode_ordinary(d)
    return np.array(ids, dtype=np.int64)


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def shards(out: Path, split: str | None = None) -> list[Path]:
    """Shards in index order (val first), as the manifest lists them."""
    names = [r["name"] for r in json.loads((out / "manifest.json").read_text())["shards"]]
    return [out / n for n in names if split is None or f"_{split}_" in n]


def stream_of(out: Path, split: str | None = None) -> np.ndarray:
    return np.concatenate([read_shard(p).astype(np.int64) for p in shards(out, split)])


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


# -- tokens ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_tokens_equal_tiktoken(tmp_path, workers):
    src = write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    result = prepare([str(src)], tmp_path / "out", shard_tokens=500, val_tokens=700, workers=workers, task_chars=2000)
    want = expected_stream(DOCS)
    np.testing.assert_array_equal(stream_of(tmp_path / "out"), want)
    assert result.val_tokens == 700 and result.train_tokens == want.size - 700
    assert result.docs == sum(1 for d in DOCS if d)
    names = result.shards
    assert names[:2] == ["shard_val_000000.bin", "shard_val_000001.bin"] and names[2] == "shard_train_000002.bin"
    sizes = [read_shard(tmp_path / "out" / n).size for n in names]
    assert sizes[:2] == [500, 200] and all(s == 500 for s in sizes[2:-1]) and 0 < sizes[-1] <= 500


def blocks_of(data: bytes, size: int):
    """data in blocks of `size` bytes, as a decompressor may deliver it."""
    return (data[i : i + size] for i in range(0, len(data), size))


def test_text_pieces_cut_without_changing_tokens():
    rng = np.random.default_rng(0)
    alphabet = list("ab c\n\n  \t.,'!é東") + ["\r\n", " \n", "\n ", "'s", "123", "🎉"]
    text = "".join(rng.choice(alphabet, size=20000)).encode("utf-8")
    enc = encoding()
    whole = enc.encode_ordinary(text.decode("utf-8"))
    for piece_bytes in (2, 7, 64, 1000, 10**6):
        seen = []
        for chunk in (1, 5, 4096):  # where the blocks end must not matter
            pieces = list(_text_pieces(blocks_of(text, chunk), piece_bytes))
            assert b"".join(pieces) == text
            seen.append(pieces)
        assert seen[0] == seen[1] == seen[2]
        assert len(pieces) > 100 or piece_bytes > 100
        ids = [t for p in pieces for t in enc.encode_ordinary(p.decode("utf-8"))]
        assert ids == whole, piece_bytes
    assert _safe_cut(b"ab\ncd", 10) == 2 and _safe_cut(b"ab\n cd", 10) == -1 and _safe_cut(b"ab\n", 10) == -1


@pytest.mark.skipif(not (SHARED / "tinyshakespeare").is_dir(), reason="needs ../shared/data")
def test_tiny_shakespeare_single_document(tmp_path):
    path = SHARED / "tinyshakespeare" / "input.txt"
    # Small pieces: the one document is encoded in parallel pieces, and the tokens still equal tiktoken's.
    result = prepare([str(path)], tmp_path / "out", workers=2, piece_bytes=50_000)
    want = expected_stream([path.read_text(encoding="utf-8")])
    assert want.size == 338_026  # 338,025 GPT-2 tokens + <|endoftext|>
    np.testing.assert_array_equal(stream_of(tmp_path / "out"), want)
    # Val rule: the first floor(10%) of the token stream, cut inside the single document.
    assert result.val_tokens == 33_802 and result.train_tokens == 338_026 - 33_802 and result.docs == 1
    np.testing.assert_array_equal(stream_of(tmp_path / "out", "val"), want[:33_802])


# -- validation rule --------------------------------------------------------------------------------


def test_val_fraction_is_capped_at_one_shard(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", DOCS)
    total = expected_stream(DOCS).size
    small = prepare([str(src)], tmp_path / "a", shard_tokens=10_000, workers=1)
    assert small.val_tokens == total // 10
    capped = prepare([str(src)], tmp_path / "b", shard_tokens=100, val_fraction=0.2, workers=1)
    assert capped.val_tokens == 100 and capped.shards[0] == "shard_val_000000.bin"
    assert "_val_" not in capped.shards[1]
    none = prepare([str(src)], tmp_path / "c", shard_tokens=10_000, val_tokens=0, workers=1)
    assert none.val_tokens == 0 and all("_train_" in s for s in none.shards)


def test_files_named_val_are_the_val_split(tmp_path):
    train_docs, val_docs = DOCS[:40], DOCS[40:]
    write_jsonl(tmp_path / "train.jsonl", train_docs)
    write_jsonl(tmp_path / "val.jsonl", val_docs)
    out = tmp_path / "out"
    result = prepare([str(tmp_path / "train.jsonl"), str(tmp_path / "val.jsonl")], out, shard_tokens=300, workers=2)
    np.testing.assert_array_equal(stream_of(out, "val"), expected_stream(val_docs))
    np.testing.assert_array_equal(stream_of(out, "train"), expected_stream(train_docs))
    assert result.shards[0].startswith("shard_val_000000")
    # Explicit --val-source: any file; with --val-tokens instead, val.jsonl is ordinary training text.
    write_jsonl(tmp_path / "held_out.jsonl", val_docs)
    explicit = prepare([str(tmp_path / "train.jsonl")], tmp_path / "o2", val_sources=[str(tmp_path / "held_out.jsonl")])
    assert explicit.val_tokens == expected_stream(val_docs).size
    cut = prepare([str(tmp_path / "train.jsonl"), str(tmp_path / "val.jsonl")], tmp_path / "o3", val_tokens=10)
    assert cut.val_tokens == 10 and cut.train_tokens == expected_stream(DOCS).size - 10


# -- formats -----------------------------------------------------------------------------------------


def test_compressed_and_json_inputs_give_identical_shards(tmp_path):
    raw = write_jsonl(tmp_path / "c.jsonl", DOCS).read_bytes()
    import zstandard

    (tmp_path / "c2.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "c3.jsonl.xz").write_bytes(lzma.compress(raw))
    (tmp_path / "c4.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    (tmp_path / "c5.jsonl.bz2").write_bytes(bz2.compress(raw))
    (tmp_path / "c6.json").write_text(json.dumps([{"text": d} for d in DOCS]))
    (tmp_path / "c7.json").write_bytes(raw)  # JSON lines in a .json file, as HF often ships them
    want = expected_stream(DOCS)
    for name in ["c.jsonl", "c2.jsonl.gz", "c3.jsonl.xz", "c4.jsonl.zst", "c5.jsonl.bz2", "c6.json", "c7.json"]:
        out = tmp_path / f"out_{name}"
        prepare([str(tmp_path / name)], out, shard_tokens=1000, val_tokens=0, workers=1)
        np.testing.assert_array_equal(stream_of(out), want, err_msg=name)


def test_block_reader_handles_multi_stream_and_truncated_files(tmp_path):
    import zstandard

    data = b"".join(b"line %d\n" % i for i in range(50_000))
    half = len(data) // 2
    for suffix, compress in [(".gz", gzip.compress), (".xz", lzma.compress), (".bz2", bz2.compress)]:
        path = tmp_path / f"x{suffix}"
        path.write_bytes(compress(data[:half]) + compress(data[half:]))  # two streams, as `cat a.gz b.gz` makes
        assert b"".join(iter_blocks(path)) == data
        assert list(iter_lines(iter_blocks(path))) == data.split(b"\n")[:-1]
        path.write_bytes(compress(data)[:-20])
        with pytest.raises(ValueError, match="truncated"):
            b"".join(iter_blocks(path))
    z = zstandard.ZstdCompressor()
    (tmp_path / "x.zst").write_bytes(z.compress(data[:half]) + z.compress(data[half:]))
    assert b"".join(iter_blocks(tmp_path / "x.zst")) == data
    assert list(iter_lines(blocks_of(b"a\nb\n\nc", 1))) == [b"a", b"b", b"", b"c"]


def test_text_files_globs_and_directories(tmp_path):
    (tmp_path / "d").mkdir()
    for i, doc in enumerate(DOCS[:5]):
        (tmp_path / "d" / f"{i}.txt").write_text(doc, encoding="utf-8")
    (tmp_path / "d" / "skip.csv").write_text("not text")
    want = expected_stream(DOCS[:5])  # one document per file, files in name order
    a = prepare([str(tmp_path / "d" / "*.txt")], tmp_path / "a", val_tokens=0, workers=1)
    b = prepare([str(tmp_path / "d")], tmp_path / "b", val_tokens=0, workers=1)
    np.testing.assert_array_equal(stream_of(tmp_path / "a"), want)
    np.testing.assert_array_equal(stream_of(tmp_path / "b"), want)
    assert a.docs == b.docs == 4  # the empty file is skipped


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait \xff\xfe ok \xef\xbf\xbd kept")
    line = b'{"text": "ol\xe9"}\n'
    (tmp_path / "bad.jsonl").write_bytes(line * 3)
    r1 = prepare([str(tmp_path / "bad.txt")], tmp_path / "a", val_tokens=0, workers=1)
    assert r1.replaced == 3  # \xe9, \xff, \xfe; the genuine U+FFFD is not counted
    want = expected_stream(["caf\ufffd au lait \ufffd\ufffd ok \ufffd kept"])
    np.testing.assert_array_equal(stream_of(tmp_path / "a"), want)
    r2 = prepare([str(tmp_path / "bad.jsonl")], tmp_path / "b", val_tokens=0, workers=2)
    assert r2.replaced == 3 and r2.docs == 3


def test_hf_datasets_path_on_a_local_file(tmp_path):
    pytest.importorskip("datasets")
    src = write_jsonl(tmp_path / "c.jsonl", DOCS, field="body")
    result = prepare([f"hf:json?data_files={src}&text_field=body"], tmp_path / "out", val_tokens=100, workers=2)
    np.testing.assert_array_equal(stream_of(tmp_path / "out"), expected_stream(DOCS))
    assert result.val_tokens == 100
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["settings"]["streams"][0]["sources"][0]["hf"] == "json"
    with pytest.raises(ValueError, match="has no field 'text' \\(fields: body, id\\)"):
        prepare([f"hf:json?data_files={src}"], tmp_path / "o2")
    # A dataset split named like validation is a val source (rule 3), like a file named val.jsonl.
    assert Source("hf:x", split="validation").looks_like_val() and not Source("hf:x", split="train").looks_like_val()


# -- determinism, resume, refusal ------------------------------------------------------------------


def run_args(tmp_path: Path) -> tuple[list[str], dict]:
    src = write_jsonl(tmp_path / "c.jsonl", DOCS * 3)
    return [str(src)], dict(shard_tokens=400, workers=2, task_chars=3000)


def test_idempotent(tmp_path):
    sources, kw = run_args(tmp_path)
    prepare(sources, tmp_path / "out", **kw)
    before = files(tmp_path / "out")
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    again = prepare(sources, tmp_path / "out", **{**kw, "workers": 1})  # worker count is not a setting
    assert again.already_done and files(tmp_path / "out") == before
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("val", ["fraction", "sources"])
def test_resume_after_interruption_is_byte_identical(tmp_path, val):
    sources, kw = run_args(tmp_path)
    if val == "sources":
        write_jsonl(tmp_path / "valid.jsonl", DOCS[:20])
        sources.append(str(tmp_path / "valid.jsonl"))
    prepare(sources, tmp_path / "ref", **kw)
    reference = files(tmp_path / "ref")
    assert len(reference) > 6

    for stop_after in (1, 2, 4):
        out = tmp_path / f"run{stop_after}"

        def crash(record, stop_after=stop_after, count=[0]):  # noqa: B006
            count[0] += 1
            if count[0] == stop_after:
                raise Interrupt

        with pytest.raises(Interrupt):
            prepare(sources, out, on_shard=crash, **kw)
        manifest = json.loads((out / "manifest.json").read_text())
        assert not manifest["complete"] and len(manifest["shards"]) == stop_after
        notes: list[str] = []
        result = prepare(sources, out, log=notes.append, **{**kw, "workers": 1})
        assert result.resumed_shards == stop_after and "resuming after" in notes[0]
        assert files(out) == reference


@pytest.mark.slow
def test_resume_after_kill(tmp_path):
    sources, kw = run_args(tmp_path)
    prepare(sources, tmp_path / "ref", **kw)
    script = (
        "import os, signal, sys\n"
        "from gpt2.prepare import prepare\n"
        "def kill(record):\n"
        "    if record['name'].endswith('000002.bin'):\n"
        "        open(sys.argv[2] + '/.shard_train_000003.bin.tmp', 'wb').write(b'half')  # a write cut short\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "prepare([sys.argv[1]], sys.argv[2], shard_tokens=400, workers=2, task_chars=3000, on_shard=kill)\n"
    )
    out = tmp_path / "killed"
    proc = subprocess.run(
        [sys.executable, "-c", script, sources[0], str(out)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert proc.returncode == -9
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) == 3
    prepare(sources, out, **kw)
    assert files(out) == files(tmp_path / "ref")  # the stale temporary file is gone too


def test_damaged_shard_is_rewritten(tmp_path):
    sources, kw = run_args(tmp_path)
    prepare(sources, tmp_path / "out", **kw)
    reference = files(tmp_path / "out")
    victim = shards(tmp_path / "out")[3]
    victim.write_bytes(victim.read_bytes()[:-2] + b"\x00\x00")
    (shards(tmp_path / "out")[5]).unlink()
    result = prepare(sources, tmp_path / "out", **kw)
    assert not result.already_done and result.resumed_shards == 3
    assert files(tmp_path / "out") == reference


def test_refuses_shards_of_another_corpus(tmp_path):
    sources, kw = run_args(tmp_path)
    prepare(sources, tmp_path / "out", **kw)
    before = files(tmp_path / "out")
    other = write_jsonl(tmp_path / "other.jsonl", DOCS[:10])
    with pytest.raises(
        FileExistsError, match="another corpus or with other settings \\(streams differ\\).*--overwrite"
    ):
        prepare([str(other)], tmp_path / "out", **kw)
    with pytest.raises(FileExistsError, match="shard_tokens differ"):
        prepare(sources, tmp_path / "out", **{**kw, "shard_tokens": 999})
    assert files(tmp_path / "out") == before  # nothing lost
    result = prepare([str(other)], tmp_path / "out", overwrite=True, **kw)
    assert set(files(tmp_path / "out")) == {"manifest.json", *result.shards}
    np.testing.assert_array_equal(stream_of(tmp_path / "out"), expected_stream(DOCS[:10]))


def test_refuses_foreign_shards_without_manifest(tmp_path):
    (tmp_path / "out").mkdir()
    np.save(tmp_path / "out" / "edufineweb_train_000001.npy", np.zeros(10, dtype=np.uint16))
    (tmp_path / "out" / "notes.txt").write_text("mine")
    src = write_jsonl(tmp_path / "c.jsonl", DOCS)
    with pytest.raises(FileExistsError, match="without a manifest.json"):
        prepare([str(src)], tmp_path / "out")
    prepare([str(src)], tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"  # overwrite only replaces shards


# -- bad input ---------------------------------------------------------------------------------------


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_bad_inputs(tmp_path):
    good = str(write_jsonl(tmp_path / "good.jsonl", DOCS))
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="no such file: missing.txt") as e:
        prepare(["missing.txt"], out)
    one_line(e)
    with pytest.raises(FileNotFoundError, match="matched no files"):
        prepare([str(tmp_path / "*.nothing")], out)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="no text in the sources .*empty.txt"):
        prepare([str(tmp_path / "empty.txt")], out)
    write_jsonl(tmp_path / "body.jsonl", ["a", "b"], field="body")
    with pytest.raises(
        ValueError, match=r"body.jsonl line 1 has no field 'text' \(fields: body, id\); choose one with"
    ):
        prepare([str(tmp_path / "body.jsonl")], out, workers=2)
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match="broken.jsonl line 2 is not valid JSON"):
        prepare([str(tmp_path / "broken.jsonl")], out)
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported file type"):
        prepare([str(tmp_path / "data.csv")], out)
    (tmp_path / "val.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no text in the val sources"):
        prepare([good, str(tmp_path / "val.jsonl")], out)
    with pytest.raises(ValueError, match="every source is a validation source"):
        prepare([good], out, val_sources=[good])
    with pytest.raises(ValueError, match="not both"):
        prepare([good], out, val_tokens=1, val_fraction=0.1)
    with pytest.raises(ValueError, match="not both"):
        prepare([good], out, val_sources=[good], val_tokens=1)
    with pytest.raises(ValueError, match="unknown option"):
        prepare(["hf:json?colour=red"], out)
    with pytest.raises(ValueError, match="only source"):
        prepare(["fineweb-edu-10B", good], out)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError):
        prepare([good], tmp_path / "afile")
    assert not out.exists()  # runs that failed before a shard was finished leave nothing behind
    with pytest.raises(ValueError, match="none to train; lower --val-tokens/--val-fraction and rerun with --overwrite"):
        prepare([good], out, val_tokens=10**6)


def test_preset_is_build_nanogpt_edu_fineweb():
    preset = PRESETS["fineweb-edu-10B"]
    assert preset.source == "hf:HuggingFaceFW/fineweb-edu:sample-10BT?split=train"
    assert (preset.prefix, preset.shard_tokens, preset.val_tokens, preset.out_dir) == (
        "edufineweb",
        100_000_000,
        100_000_000,
        "edu_fineweb10B",
    )


# -- the command ---------------------------------------------------------------------------------------


def test_cli(tmp_path, capsys):
    from gpt2.cli import main
    from gpt2.commands.prepare import _count

    assert [_count(s) for s in ("100M", "1e8", "100_000_000", "64k", "2.5B")] == [10**8] * 3 + [64_000, 2_500_000_000]
    src = str(write_jsonl(tmp_path / "c.jsonl", DOCS))
    assert (
        main(["prepare", src, "--out", str(tmp_path / "o"), "--shard-tokens", "1k", "--val-tokens", "500", "-q"]) == 0
    )
    summary = capsys.readouterr().out.strip()
    assert summary.count("\n") == 0 and "500 val tokens in 1 shard(s)" in summary and "tok/s" in summary
    assert (
        main(["prepare", src, "--out", str(tmp_path / "o"), "--shard-tokens", "1k", "--val-tokens", "500", "-q"]) == 0
    )
    assert "already prepared" in capsys.readouterr().out
    assert main(["prepare", src, "--out", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpt2 prepare: error:") and "--overwrite" in err and "\n" not in err
