"""The scheduler alone, without a model or a tensor: admission, slots, cancellation, outputs. (The
engine around it is tested in test_serve_engine.py, with the tiny model.)"""

from __future__ import annotations

import warnings

import pytest

from gpt2.inference.scheduler import QueueFull, Scheduler, Sequence

EOS = 99


def make(max_batch=2, **kwargs) -> Scheduler:
    return Scheduler(max_batch, eos_id=EOS, mode_of=lambda s: 0 if s.temperature == 0 else 1, **kwargs)


def fits_all(rows: int, longest: int) -> bool:
    return True


def test_newcomers_take_the_lowest_free_slots_in_order_within_the_budget():
    sched = make(max_batch=3)
    a, b, c, d = (Sequence([1] * n, 5) for n in (2, 9, 3, 1))
    sched.submit([a, b, c, d])
    budget = lambda rows, longest: rows * longest <= 18  # noqa: E731 (a padded-shape budget)
    first = sched.admit(budget)
    assert [s.request for s in first] == [a, b] and [s.slot for s in first] == [0, 1]  # c would make 3 x 9
    assert [s.launched for s in first] == [1, 1]  # the prefill makes each one's first token
    (third,) = sched.admit(budget)
    assert third.request is c and third.slot == 2
    assert sched.admit(budget) == [] and sched.waiting == 1  # d waits: no slot is free


def test_a_finished_sequence_frees_its_slot_for_the_next():
    sched = make(max_batch=1)
    a, b = Sequence([1], 2, stop_at_eos=True), Sequence([2], 3)
    sched.submit([a, b])
    (sa,) = sched.admit(fits_all)
    assert sched.receive([(0, sa)], [7], {}, {}, first=True)[0].tokens == [7]
    (out,) = sched.receive([(0, sa)], [EOS], {}, {})
    assert out.finish_reason == "stop" and out.tokens == []  # the end of text is not a token of the text
    (sb,) = sched.admit(fits_all)
    assert sb.request is b and sb.slot == 0


def test_outputs_carry_tokens_and_logprobs_and_finish_at_max_tokens():
    sched = make()
    seq = Sequence([4, 5, 6], 2, logprobs=1, prompt_logprobs=1)
    sched.submit([seq])
    (s,) = sched.admit(fits_all)
    prompt_lp = [(-1.0, [(5, -1.0)]), (-2.0, [(6, -2.0)])]
    (o1,) = sched.receive([(0, s)], [8], {0: [(-0.5, [(8, -0.5)])]}, {0: prompt_lp}, first=True)
    assert (o1.tokens, o1.logprobs, o1.prompt_logprobs, o1.finish_reason) == (
        [8],
        [(-0.5, [(8, -0.5)])],
        prompt_lp,
        None,
    )
    assert s.next_column == 3 and s.wants_step  # the next step feeds token 8 at column 3
    sched.launched([s])
    (o2,) = sched.receive([(0, s)], [9], {0: [(-0.1, [(9, -0.1)])]}, {})
    assert o2.tokens == [9] and o2.finish_reason == "length" and not sched.has_work
    assert sched.receive([(0, s)], [10], {}, {}) == []  # the extra pipelined step of a finished sequence


def test_zero_max_tokens_only_echoes_the_prompt():
    sched = make()
    seq = Sequence([4, 5], 0, prompt_logprobs=1)
    sched.submit([seq])
    (s,) = sched.admit(fits_all)
    assert s.launched == 0 and not s.wants_step
    (out,) = sched.receive([(0, s)], [3], {}, {0: [(-1.0, [])]}, first=True)
    assert out.tokens == [] and out.finish_reason == "length" and out.prompt_logprobs == [(-1.0, [])]


def test_cancel_drops_waiting_and_running_sequences():
    sched = make(max_batch=1)
    ids = sched.submit([Sequence([1], 5), Sequence([2], 5), Sequence([3], 5)])
    (running,) = sched.admit(fits_all)
    sched.cancel([ids[0], ids[2], 12345])  # an unknown id is no error
    outs = sched.take_cancelled()
    assert sorted(o.request.prompt[0] for o in outs) == [1, 3] and {o.finish_reason for o in outs} == {"cancelled"}
    assert running.done and sched.live == {} and sched.waiting == 1
    (nxt,) = sched.admit(fits_all)
    assert nxt.request.prompt == [2] and nxt.slot == 0


def test_a_step_covers_the_live_rows_the_longest_column_and_the_highest_mode():
    sched = make(max_batch=4)
    sched.submit([Sequence([1] * 5, 9), Sequence([1] * 2, 9, temperature=1.0), Sequence([1] * 3, 9)])
    seqs = sched.admit(fits_all)
    assert sched.step_extent(seqs) == (3, 6, 1)  # slots 0..2; columns up to 5 (prompt 5: column 5 next)
    sched.receive([(0, seqs[2])], [EOS], {}, {})  # slot 2 stops: rows shrink to 2
    assert sched.step_extent(sched.stepping()) == (2, 6, 1)
    fixed = make(max_batch=4, batch_invariant=True)
    fixed.submit([Sequence([1], 3), Sequence([2], 3)])
    assert len(fixed.admit(fits_all)) == 1  # batch-invariant: one prompt per prefill
    assert fixed.step_extent(fixed.stepping())[0] == 4  # and every step over all slots


def test_the_queue_is_bounded():
    sched = make(max_queue=2)
    sched.submit([Sequence([1], 1), Sequence([2], 1)])
    with pytest.raises(QueueFull):
        sched.submit([Sequence([3], 1)])
    with pytest.raises(ValueError, match="at most 2"):
        sched.submit([Sequence([3], 1)] * 3)


def test_a_failed_pass_fails_what_runs():
    sched = make()
    sched.submit([Sequence([1], 5), Sequence([2], 5)])
    sched.admit(fits_all)
    outs = sched.fail_all("RuntimeError: boom")
    assert [(o.finish_reason, o.error) for o in outs] == [("error", "RuntimeError: boom")] * 2
    assert sched.live == {} and not sched.has_work


def test_the_old_import_paths_work_with_a_warning():
    from gpt2.inference import runner, sampling

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from gpt2.serve.batch import BatchDecoder
        from gpt2.serve.engine import Request
        from gpt2.serve.sampling import sample_rows
    assert Request is Sequence and BatchDecoder is runner.BatchDecoder and sample_rows is sampling.sample_rows
    assert len(caught) == 3 and all(issubclass(w.category, DeprecationWarning) for w in caught)
    assert "gpt2.inference.scheduler.Sequence" in str(caught[1].message)
