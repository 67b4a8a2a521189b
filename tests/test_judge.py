"""The LLM judge, win-rate and head-to-head arithmetic, against a real OpenAI-compatible
server (llama-cpp-python on the embedded GGUF) and a real proxy that injects 429s, 500s
and hangs."""

import json
import math

import pytest

from lidr.eval import alpaca
from lidr.eval.h2h import head_to_head, reward_accuracy
from lidr.eval.judge import Judge, JudgeParseError, JudgmentCache, parse_reply
from lidr.eval.stats import h2h_outcome, mean_ci, tally, win_rate
from lidr.openai_client import OpenAIClient, RequestFailed
from lidr.records import load_records
from servers import FaultyProxy


# ---- arithmetic ---------------------------------------------------------------------------
def test_win_rate_is_mean_preference_in_percent_with_standard_error():
    wr, se = win_rate([1.0, 0.0, 1.0, 1.0])
    assert wr == 75.0
    assert se == pytest.approx(100 * math.sqrt(0.25 / 4), abs=0.01)  # sd 0.5, n 4
    assert win_rate([]) == (None, None)
    assert win_rate([0.3]) == (30.0, None)


def test_h2h_needs_both_orders_to_agree():
    assert h2h_outcome(0.9, 0.8) == "win"
    assert h2h_outcome(0.1, 0.2) == "lose"
    assert h2h_outcome(0.9, 0.2) == "tie"  # position bias: each order prefers the first answer
    assert h2h_outcome(0.5, 0.9) == "tie"
    t = tally(["win", "win", "tie", "lose"])
    assert t == {"n": 4, "win": 2, "tie": 1, "lose": 1, "win_rate": 0.625}


def test_mean_ci_normal_interval():
    mean, (lo, hi) = mean_ci([-1.0, -2.0, -3.0])
    assert mean == -2.0 and lo == pytest.approx(-2 - 1.96 / math.sqrt(3)) and hi == pytest.approx(-2 + 1.96 / math.sqrt(3))


# ---- parsing the judge's reply ------------------------------------------------------------
def _reply(text, alts=None):
    choice = {"message": {"role": "assistant", "content": text}}
    if alts is not None:
        choice["logprobs"] = {"content": [{"token": text, "logprob": alts[0][1],
                                           "top_logprobs": [{"token": t, "logprob": lp} for t, lp in alts]}]}
    return {"choices": [choice]}


def test_preference_weighted_by_token_probabilities():
    j = parse_reply(_reply("m", [("m", math.log(0.6)), ("M", math.log(0.2)), ("x", math.log(0.2))]))
    assert j.weighted and j.p_first == pytest.approx(0.75)
    # tokens with a leading space count for their label
    j = parse_reply(_reply("M", [("M", math.log(0.5)), (" M", math.log(0.25)), ("m", math.log(0.25))]))
    assert j.p_first == pytest.approx(0.25)


def test_discrete_preference_without_logprobs_and_unreadable_replies():
    assert parse_reply(_reply("M")).p_first == 0.0
    # a constrained reply lists only the chosen label: not weighted
    j = parse_reply(_reply("M", [("I", -3.2), ("M", -7.1)]))
    assert (j.p_first, j.weighted) == (0.0, False)
    assert parse_reply(_reply(" m\n")).p_first == 1.0
    assert not parse_reply(_reply("m")).weighted
    with pytest.raises(JudgeParseError):
        parse_reply(_reply("Model"))
    with pytest.raises(JudgeParseError):
        parse_reply({"error": "nope"})


# ---- against a real server ------------------------------------------------------------------
# A 270M model does not follow the judge's instructions on its own: a grammar (llama.cpp's
# extra request field) makes it answer with one of the two labels, as guided_choice does on vLLM.
LABELS_ONLY = {"grammar": 'root ::= "m" | "M"'}


def _judge(url, tmp_path, **kw):
    client = OpenAIClient(url, "gemma-3-270m", api_key_env=None, backoff=0.05, extra_body=LABELS_ONLY, **kw)
    return Judge(client, JudgmentCache(tmp_path / "cache.jsonl"))


def test_real_server_judgment_is_cached(llama_url, tmp_path):
    judge = _judge(llama_url, tmp_path)
    j1 = judge.compare("Name a fruit.", "An apple.", "Car engine oil.")
    assert 0.0 <= j1.p_first <= 1.0
    assert judge.stats == {"cached": 0, "asked": 1, "failed": 0}
    judge.close()
    # a new process (new Judge over the same cache file) does not ask again
    with FaultyProxy(llama_url) as proxy:
        judge = _judge(proxy.url, tmp_path)
        j2 = judge.compare("Name a fruit.", "An apple.", "Car engine oil.")
        assert j2 == j1 and proxy.seen == 0
        # the other order is a different judgment
        judge.compare("Name a fruit.", "Car engine oil.", "An apple.")
        assert proxy.seen == 1
        judge.close()


def test_retries_on_429_and_500_then_succeeds(llama_url, tmp_path):
    with FaultyProxy(llama_url, {1: 429, 2: 500, 3: 503}) as proxy:
        judge = _judge(proxy.url, tmp_path, max_retries=5)
        j = judge.compare("Say hi.", "Hi!", "Goodbye.")
        assert proxy.seen == 4 and judge.client.stats["retries"] == 3
        assert 0.0 <= j.p_first <= 1.0 and len(judge.cache) == 1
        judge.close()


def test_timeouts_exhaust_retries_count_a_failure_and_cache_nothing(llama_url, tmp_path):
    with FaultyProxy(llama_url, always="hang", hang_seconds=3) as proxy:
        judge = _judge(proxy.url, tmp_path, timeout=0.5, max_retries=1)
        with pytest.raises(RequestFailed, match="gave up after 2 attempts"):
            judge.compare("Say hi.", "Hi!", "Goodbye.")
        assert judge.stats["failed"] == 1 and len(judge.cache) == 0
        judge.close()
    assert load_records(tmp_path / "cache.jsonl") == []


def test_client_error_is_not_retried(llama_url, tmp_path):
    with FaultyProxy(llama_url, always=401) as proxy:
        judge = _judge(proxy.url, tmp_path)
        with pytest.raises(RequestFailed, match="401"):
            judge.compare("Say hi.", "Hi!", "Goodbye.")
        assert proxy.seen == 1
        judge.close()


def _alpaca_data():
    items = [{"id": i, "instruction": q, "reference": ref, "dataset": "t"} for i, (q, ref) in enumerate([
        ("Name a colour.", "Blue."), ("What is 2 + 2?", "4."), ("Name an animal.", "A cat."),
        ("Say hello in Spanish.", "Hola."), ("Name a planet.", "Mars.")])]
    return {"en": items}


def _write_answers(out, data, outputs):
    (out / "answers").mkdir(parents=True)
    with open(out / "answers" / "en.jsonl", "w") as f:
        for it, o in zip(data["en"], outputs):
            f.write(json.dumps(alpaca.score_answer(it, "en", o, "stop")) + "\n")


def test_win_rate_run_survives_failures_and_resumes_without_paying_twice(llama_url, tmp_path):
    data = _alpaca_data()
    out = tmp_path / "alpaca"
    _write_answers(out, data, ["Red.", "5.", "A dog.", "Hello.", "Venus."])
    # requests 2 and 3 fail for good (500 with no retries left); the others succeed
    with FaultyProxy(llama_url, {2: 500, 3: 500}) as proxy:
        judge = _judge(proxy.url, tmp_path, max_retries=0, concurrency=1)
        failures = alpaca.judge_against_reference(judge, data, out, seed=1)
        summary = alpaca.summarize(out, data, judge.describe(), failures)
        judge.close()
    assert failures == {"en": 2}
    v = summary["languages"]["en"]
    assert v["judged"] == 3 and v["judge_failures"] == 2 and summary["judge_failures"] == 2
    recs = load_records(out / "judgments" / "en.jsonl")
    assert len(recs) == 3
    # the win rate is exactly the mean preference of what was judged
    assert v["win_rate"] == pytest.approx(round(100 * sum(r["p_model"] for r in recs) / 3, 2))
    # model_first is the seeded order, and the preference is for the model's answer either way
    assert all(r["model_first"] == alpaca.model_shown_first(1, "en", r["id"]) for r in recs)
    # the answer order is randomised: both orders occur over the 5 items
    assert len({alpaca.model_shown_first(1, "en", i) for i in range(5)}) == 2
    # a re-run asks only for the 2 missing judgments
    with FaultyProxy(llama_url) as proxy:
        judge = _judge(proxy.url, tmp_path)
        failures = alpaca.judge_against_reference(judge, data, out, seed=1)
        summary = alpaca.summarize(out, data, judge.describe(), failures)
        judge.close()
        assert proxy.seen == 2
    assert summary["languages"]["en"]["judged"] == 5 and summary["judge_failures"] == 0
    assert len(load_records(tmp_path / "cache.jsonl")) == 5


def test_head_to_head_both_orders_and_reward_accuracy(llama_url, tmp_path):
    data = _alpaca_data()["en"]
    a = {"en": {it["id"]: {"instruction": it["instruction"], "output": it["reference"]} for it in data}}
    b = {"en": {it["id"]: {"instruction": it["instruction"], "output": "I don't know."} for it in data}}
    judge = _judge(llama_url, tmp_path)
    s = head_to_head(judge, a, b, tmp_path / "h2h", name_a="A", name_b="B")
    recs = load_records(tmp_path / "h2h" / "en.jsonl")
    assert len(recs) == 5 and judge.stats["asked"] == 10  # every item judged in both orders
    for r in recs:
        assert r["outcome"] == h2h_outcome(r["p_a_ab"], r["p_a_ba"])
    v = s["languages"]["en"]
    assert v["win"] + v["tie"] + v["lose"] == 5 and v["failures"] == 0
    assert v["win_rate"] == pytest.approx((v["win"] + v["tie"] / 2) / 5)
    # swapping A and B swaps win and lose (the cached judgments are reused: no new requests)
    s2 = head_to_head(judge, b, a, tmp_path / "h2h-swapped", name_a="B", name_b="A")
    assert judge.stats["asked"] == 10
    assert (s2["languages"]["en"]["win"], s2["languages"]["en"]["lose"]) == (v["lose"], v["win"])

    pairs = [{"id": it["id"], "lang": "en", "prompt": it["instruction"], "chosen": it["reference"],
              "rejected": "No.", "kind": "translated_beats_native"} for it in data]
    s = reward_accuracy(judge, pairs, tmp_path / "ra", seed=0)
    v = s["languages"]["en"]
    recs = load_records(tmp_path / "ra" / "en.jsonl")
    assert v["n"] == 5 and v["agree"] == sum(r["p_chosen"] > 0.5 for r in recs)
    assert v["accuracy"] == v["agree"] / 5
    judge.close()
