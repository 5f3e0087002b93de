"""lm-evaluation-harness's `local-completions` model against a running server (tiny model, CPU,
offline): a local multiple-choice task over a local jsonl, our tokenizer files for its HF tokenizer
backend. Its per-choice log-likelihoods must equal gpt2.evaluation's scoring of the same tokens."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from gpt2.evaluation import score_continuations  # noqa: E402
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


def test_lm_eval_local_completions_matches_our_scoring(tmp_path, monkeypatch, make_tiny):
    from lm_eval.tasks import TaskManager

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    model = make_tiny()
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)  # config, weights and vocab.json / merges.txt for the tokenizer
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local_mc.yaml").write_text(TASK.format(data=data))
    service = build_service(model, "tiny", ServeConfig(max_batch=8))
    with ServerThread(service) as url:
        args = (
            f"base_url={url}/v1/completions,model=tiny,tokenizer_backend=huggingface,tokenizer={model_dir},"
            f"max_length={model.config.block_size},num_concurrent=2,max_retries=1,tokenized_requests=True"
        )
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=args,
            tasks=["gpt2_serve_local_mc"],
            task_manager=TaskManager(include_path=str(tasks)),
            log_samples=True,
        )
    samples = out["samples"]["gpt2_serve_local_mc"]
    assert len(samples) == len(DOCS) and "acc,none" in out["results"]["gpt2_serve_local_mc"]
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
