"""lm-evaluation-harness against our models (tiny model, CPU, offline), on a local multiple-choice
task over a local jsonl: `local-completions` against a running server, with our tokenizer files for
its HF tokenizer backend and with nothing but `model` and `base_url` (it then tokenizes through the
server's /tokenize), and `--model hf` on a training checkpoint directory. Every per-choice
log-likelihood must equal gpt2.evaluation's scoring of the same tokens."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from gpt2.evaluation import score_continuations  # noqa: E402
from gpt2.serve.config import HTTPConfig  # noqa: E402
from gpt2.serve.server import ServeConfig, ServerThread, build_service  # noqa: E402
from gpt2.tokenizer import Tokenizer  # noqa: E402

pytestmark = pytest.mark.slow

DOCS = [
    {"context": "The sun rises in the", "choices": ["east", "west", "sea"], "label": 0},
    {"context": "Two plus two is", "choices": ["four", "five"], "label": 0},
    {"context": "Cats like to drink", "choices": ["milk", "petrol", "sand"], "label": 0},
]

TASK = """task: gpt2_serve_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture
def offline(tmp_path, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


@pytest.fixture
def task(tmp_path):
    """TaskManager of a local task over DOCS."""
    from lm_eval.tasks import TaskManager

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local_mc.yaml").write_text(TASK.format(data=data))
    return TaskManager(include_path=str(tasks))


def evaluate(model_name: str, model_args: str, task, **kwargs) -> list:
    out = lm_eval.simple_evaluate(
        model=model_name,
        model_args=model_args,
        tasks=["gpt2_serve_local_mc"],
        task_manager=task,
        log_samples=True,
        **kwargs,
    )
    assert "acc,none" in out["results"]["gpt2_serve_local_mc"]
    return out["samples"]["gpt2_serve_local_mc"]


def assert_matches_our_scoring(model, samples: list) -> None:
    assert len(samples) == len(DOCS)
    tok = Tokenizer()
    pairs, theirs = [], []
    for sample in samples:
        for (context, continuation), (resp,) in zip(sample["arguments"], sample["resps"]):
            whole, ctx = tok.encode(context + continuation), tok.encode(context)  # lm-eval's split
            pairs.append((ctx, whole[len(ctx) :]))
            theirs.append(resp)
    assert len(pairs) == sum(len(d["choices"]) for d in DOCS)
    ours = score_continuations(model, pairs, rows_per_batch=4)
    for (ll, greedy), our_ll, our_greedy in zip(theirs, ours.logprob.tolist(), ours.greedy.tolist()):
        assert ll == pytest.approx(our_ll, abs=1e-4) and bool(greedy) == our_greedy


def test_lm_eval_local_completions_matches_our_scoring(tmp_path, offline, task, make_tiny):
    model = make_tiny()
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)  # config, weights and vocab.json / merges.txt for the tokenizer
    with ServerThread(build_service(model, "tiny", ServeConfig(max_batch=8))) as url:
        args = (
            f"base_url={url}/v1/completions,model=tiny,tokenizer_backend=huggingface,tokenizer={model_dir},"
            f"max_length={model.config.block_size},num_concurrent=2,max_retries=1,tokenized_requests=True"
        )
        samples = evaluate("local-completions", args, task)
    assert_matches_our_scoring(model, samples)


def test_lm_eval_local_completions_needs_only_model_and_base_url(offline, task, monkeypatch, make_tiny):
    """No tokenizer arguments: lm-eval finds /tokenizer_info and /tokenize and uses them. Behind an
    API key too: lm-eval sends $OPENAI_API_KEY with completions and auth_token to the tokenizer routes."""
    model = make_tiny()
    http = HTTPConfig(api_keys=("k",))
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    with ServerThread(build_service(model, "tiny", ServeConfig(max_batch=8), http)) as url:
        samples = evaluate("local-completions", f"model=tiny,base_url={url}/v1/completions,auth_token=k", task)
    assert_matches_our_scoring(model, samples)


def test_lm_eval_hf_on_a_checkpoint_directory(tmp_path, offline, task, make_tiny):
    """A training checkpoint is a directory `lm_eval --model hf` reads as it is (tokenizer files included)."""
    pytest.importorskip("accelerate")  # lm-eval's hf model needs it (lm_eval[hf])
    from gpt2.checkpoint.full import save_checkpoint

    model = make_tiny()
    ckpt = save_checkpoint(tmp_path / "run", 7, model, {"note": "test"}, {"model": "tiny"})
    samples = evaluate("hf", f"pretrained={ckpt},dtype=float32", task, device="cpu")
    assert_matches_our_scoring(model, samples)
