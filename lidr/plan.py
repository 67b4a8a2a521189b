"""`lidr plan`: what a run will do, computed from the config and the data, without loading
any model (a Hub id is only checked for its form, so this works offline).

The checks are `lidr run`'s own (`Loop.__init__`: model spec, prompts, enough ids, the
accelerate config, the evaluation data). The counts follow the stages exactly: responses
= prompts x languages; translations = `needed_translations` (translation-task ids are never
translated; `dominant_rejected` decides which back-translations are needed); pairs and
training steps are upper bounds (filters only remove pairs); tokens are an upper bound
(every answer hits max_new_tokens) and a typical estimate (answers of about
TYPICAL_ANSWER_TOKENS tokens, translations TRANSLATION_RATIO times their source).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lidr.config import Config

# Typical estimate only: an instruct model's answer to an everyday instruction is a few
# hundred tokens; a translation is about as long as its source (a little longer in most
# target scripts).
TYPICAL_ANSWER_TOKENS = 300
TRANSLATION_RATIO = 1.2


@dataclass
class Tokens:
    max: int = 0
    typical: int = 0

    def __add__(self, o: "Tokens") -> "Tokens":
        return Tokens(self.max + o.max, self.typical + o.typical)


@dataclass
class StagePlan:
    stage: str  # respond | translate | pairs | train | eval
    engine: str  # backend / launcher, in words
    work: str  # what it does, in words


@dataclass
class IterationPlan:
    t: int
    model_in: str  # "M0 (meta-llama/...)" or "M1 (iter-1/model)"
    model_out: str
    prompt_ids: tuple  # (first id, last id)
    prompts: int  # per language
    translation_tasks: int  # prompts whose answers are never translated
    responses: dict[str, int]  # lang -> answers
    translations: dict[str, int]  # "src-tgt" -> translations
    pairs_max: dict[str, int]  # lang -> at most this many pairs
    steps_max: int  # optimizer steps, at most
    tokens: dict[str, Tokens]  # respond / translate
    done: dict[str, str] = field(default_factory=dict)  # stage -> status in an existing run folder

    @property
    def n_responses(self) -> int:
        return sum(self.responses.values())

    @property
    def n_translations(self) -> int:
        return sum(self.translations.values())

    @property
    def n_pairs_max(self) -> int:
        return sum(self.pairs_max.values())


@dataclass
class EvalPlanSummary:
    models: list[str]  # M0 ... Mn
    benchmarks: list[dict]  # {name, languages, items, max_new_tokens, measures}
    engine: str
    judge: str
    tokens_per_model: Tokens = field(default_factory=Tokens)


@dataclass
class Plan:
    model: str
    languages: list[str]
    prompts_source: str
    iterations: list[IterationPlan]
    stages: list[StagePlan]
    effective_batch: int
    evaluation: EvalPlanSummary | None
    eval_note: str | None = None  # why there is no evaluation
    notes: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> Tokens:
        total = Tokens()
        for it in self.iterations:
            for v in it.tokens.values():
                total = total + v
        return total


def _typical(limit: int, expected: float) -> int:
    return int(min(limit, round(expected)))


def _engine(backend: str, server, vllm, what: str, batch: int | None = None) -> str:
    if backend == "openai":
        return (f"openai: server {server.url} (model {server.model}), "
                f"{server.concurrency} requests in flight")
    if backend == "vllm":
        gpus = vllm.tensor_parallel_size * vllm.data_parallel_size
        return (f"vllm: offline engine, {what}, {vllm.data_parallel_size} replica(s) x "
                f"{vllm.tensor_parallel_size} GPU(s) (tensor parallel) = {gpus} GPU{'s' if gpus > 1 else ''}")
    return f"hf: transformers generate in process, {what}" + (f", batch {batch}" if batch else "")


def make_plan(cfg: Config, root: str | Path) -> Plan:
    """Validate the config and data as `lidr run` does, and count what the run will do."""
    from lidr.pipeline import launch
    from lidr.pipeline.loop import Loop
    from lidr.pipeline.pairs import needed_translations
    from lidr.pipeline.train import planned_steps

    loop = Loop(cfg, root)  # the checks of `lidr run`; loads no model
    d, others = cfg.languages.dominant, cfg.languages.others
    g, tr, tc = cfg.generation, cfg.translator, cfg.training
    W = tc.num_processes
    answer_typ = _typical(g.max_new_tokens, TYPICAL_ANSWER_TOKENS)
    tr_typ = _typical(g.translation_tokens, answer_typ * TRANSLATION_RATIO)

    iterations = []
    for t in range(1, cfg.iterations + 1):
        ids = loop.ids(t)
        tasks = loop.task_ids(t)
        need = needed_translations(d, others, tasks, ids, dominant_rejected=cfg.pairs.dominant_rejected)
        translations = {f"{s}-{x}": len(v) for (s, x), v in need.items()}
        responses = {lang: len(ids) for lang in loop.langs}
        per_dom = len(others) if cfg.pairs.dominant_rejected == "per_language" else 1
        pairs_max = {d: (len(ids) - len(tasks)) * per_dom, **{lang: len(ids) for lang in others}}
        n_resp, n_tr = sum(responses.values()), sum(translations.values())
        done = {s: rec["status"] for s in ("respond", "translate", "pairs", "train")
                if (rec := loop.state.get(f"iter-{t}/{s}"))}
        iterations.append(IterationPlan(
            t=t, model_in=f"M{t - 1}" if t == 1 else f"M{t - 1} (iter-{t - 1}/model)",
            model_out=f"M{t} (iter-{t}/model)", prompt_ids=(ids[0], ids[-1]), prompts=len(ids),
            translation_tasks=len(tasks), responses=responses, translations=translations, pairs_max=pairs_max,
            steps_max=planned_steps(sum(pairs_max.values()), tc.batch_size, tc.gradient_accumulation, W, tc.epochs),
            tokens={"respond": Tokens(n_resp * g.max_new_tokens, n_resp * answer_typ),
                    "translate": Tokens(n_tr * g.translation_tokens, n_tr * tr_typ)},
            done=done))

    gen_engine = _engine(g.backend, g.server, g.vllm, f"M_(t-1) ({g.dtype})", g.batch_size)
    if tr is None:
        tr_engine = gen_engine + " (self-translation)"
    else:
        tr_engine = "translator " + _engine(tr.backend, tr.server, tr.vllm, f"{tr.model or tr.tokenizer} ({tr.dtype})",
                                            g.batch_size)
    eff = tc.batch_size * tc.gradient_accumulation * W
    what = "LoRA r={}".format(tc.lora.r) if tc.lora else "full fine-tuning"
    stages = [
        StagePlan("respond", gen_engine,
                  f"answer every prompt in {len(loop.langs)} languages: greedy, up to {g.max_new_tokens} new "
                  f"tokens, repetition penalty {g.repetition_penalty}"),
        StagePlan("translate", tr_engine,
                  f"{d} answers -> {', '.join(others)}; back into {d} "
                  f"({cfg.pairs.dominant_rejected}); up to {g.translation_tokens} new tokens, "
                  f"repetition penalty {g.translation_repetition_penalty}"),
        StagePlan("pairs", "in process (no model)",
                  "pair rules + filters (translation failed, empty, repeated lines, identical"
                  + (", wrong language" if cfg.pairs.check_language else "") + ")"),
        StagePlan("train", launch.describe(tc),
                  f"DPO + NLL (beta {tc.beta}, NLL weight {tc.nll_weight}), {what}, lr {tc.learning_rate}, "
                  f"{tc.epochs} epoch(s), effective batch {eff} = {tc.batch_size} x {tc.gradient_accumulation} "
                  f"accumulation x {W} process(es), max length {tc.max_length}"
                  + (", gradient checkpointing" if tc.gradient_checkpointing else "")
                  + (", then a metrics pass over all pairs" if tc.final_metrics else "")),
    ]

    evaluation, eval_note = None, None
    if loop.eval_plan is None:
        eval_note = ("disabled (eval.enabled: false)" if not cfg.eval.enabled
                     else "skipped: no evaluation data (set eval.data or $LIDR_DATA)")
    else:
        ep, ec = loop.eval_plan, cfg.eval
        benches, tok = [], Tokens()
        if ep.mgsm:
            n = sum(len(v) for v in ep.mgsm.values())
            benches.append({"name": "MGSM", "languages": list(ep.mgsm), "items": n,
                            "max_new_tokens": ec.mgsm.max_new_tokens, "measures": "accuracy, off-target rate"})
            tok = tok + Tokens(n * ec.mgsm.max_new_tokens, n * _typical(ec.mgsm.max_new_tokens, 200))
        if ep.alpaca:
            n = sum(len(v) for v in ep.alpaca.values())
            measures = "off-target rate" + (", reference likelihood" if ec.alpaca.likelihood else "")
            measures += ", win rate vs gpt-4-turbo (judge)" if ec.judge else ""
            benches.append({"name": "X-AlpacaEval", "languages": list(ep.alpaca), "items": n,
                            "max_new_tokens": ec.alpaca.max_new_tokens, "measures": measures})
            tok = tok + Tokens(n * ec.alpaca.max_new_tokens, n * _typical(ec.alpaca.max_new_tokens, answer_typ))
        judge = (f"{ec.judge.url} (model {ec.judge.model}): win rates, head-to-head, reward accuracy"
                 if ec.judge else "none: judge-free measures only")
        evaluation = EvalPlanSummary(
            models=[f"M{k}" for k in loop.eval_models()], benchmarks=benches,
            engine=_engine(g.backend, g.server, g.vllm, "each model", ec.batch_size or g.batch_size),
            judge=judge, tokens_per_model=tok)
        stages.append(StagePlan("eval", evaluation.engine, f"{', '.join(b['name'] for b in benches)} on "
                                f"{', '.join(evaluation.models)} (M_k before iteration k+1's generation)"))

    notes = []  # (the prompt and evaluation data warnings were printed by the checks already)
    if tc.lora is None and W == 1 and not tc.accelerate_config:
        notes.append("full fine-tuning in one process: the whole model, its gradients and AdamW states "
                     "(~16 bytes per parameter) must fit one device")
    for it in iterations:
        if it.n_pairs_max < eff:
            notes.append(f"iteration {it.t}: at most {it.n_pairs_max} pairs, fewer than the effective batch {eff}")
    src = cfg.prompts.source
    return Plan(model=cfg.model, languages=loop.langs, prompts_source=", ".join(src) if isinstance(src, list) else src,
                iterations=iterations, stages=stages, effective_batch=eff, evaluation=evaluation,
                eval_note=eval_note, notes=notes)


def _n(x: int) -> str:
    return f"{x:,}"


def print_plan(plan: Plan, console) -> None:
    """The plan as Rich tables."""
    from rich.table import Table

    it0 = plan.iterations[0]
    console.print(f"[bold]lidr plan[/]: M0 = {plan.model}, languages {', '.join(plan.languages)} "
                  f"({plan.languages[0]} dominant), {len(plan.iterations)} iteration(s), "
                  f"{it0.prompts} prompts per language per iteration from {plan.prompts_source}")

    st = Table(title="stages (each iteration)", show_lines=False)
    for c in ("stage", "backend / launcher", "work"):
        st.add_column(c, overflow="fold")
    for s in plan.stages:
        st.add_row(s.stage, s.engine, s.work)
    console.print(st)

    t = Table(title="per iteration")
    t.add_column("")
    for it in plan.iterations:
        t.add_column(f"iteration {it.t}", justify="right")
    rows = {
        "model": [f"{it.model_in} -> M{it.t}" for it in plan.iterations],
        "prompt ids": [f"{it.prompt_ids[0]} .. {it.prompt_ids[1]}" for it in plan.iterations],
        "translation-task prompts": [str(it.translation_tasks) for it in plan.iterations],
        "responses": [_n(it.n_responses) for it in plan.iterations],
        "translations": [_n(it.n_translations) for it in plan.iterations],
        "pairs (at most)": [_n(it.n_pairs_max) for it in plan.iterations],
        "training steps (at most)": [_n(it.steps_max) for it in plan.iterations],
        "generated tokens, at most": [_n((it.tokens["respond"] + it.tokens["translate"]).max)
                                      for it in plan.iterations],
        "generated tokens, typical": [_n((it.tokens["respond"] + it.tokens["translate"]).typical)
                                      for it in plan.iterations],
    }
    if any(it.done for it in plan.iterations):
        rows["in the run folder"] = [", ".join(f"{k} {v}" for k, v in it.done.items()) or "-"
                                     for it in plan.iterations]
    for name, cells in rows.items():
        t.add_row(name, *cells)
    console.print(t)

    d = Table(title="iteration 1 per language (later iterations alike, on their own prompts)")
    for c in ("", *it0.responses):
        d.add_column(c, justify="right")
    d.add_row("responses", *(_n(v) for v in it0.responses.values()))
    dom = plan.languages[0]
    d.add_row(f"translations {dom} ->", "", *(_n(it0.translations.get(f"{dom}-{l}", 0)) for l in plan.languages[1:]))
    d.add_row(f"translations -> {dom}", "", *(_n(it0.translations.get(f"{l}-{dom}", 0)) for l in plan.languages[1:]))
    d.add_row("pairs (max)", *(_n(it0.pairs_max.get(l, 0)) for l in it0.responses))
    console.print(d)
    tok = plan.tokens
    console.print(f"generated tokens, all iterations: at most {_n(tok.max)}; typically about {_n(tok.typical)} "
                  f"(answers of ~{TYPICAL_ANSWER_TOKENS} tokens, translations x{TRANSLATION_RATIO})")

    if plan.evaluation is None:
        console.print(f"evaluation: {plan.eval_note}")
    else:
        ev = plan.evaluation
        e = Table(title=f"evaluation of {', '.join(ev.models)}")
        for c in ("benchmark", "languages", "items per model", "max new tokens", "measures"):
            e.add_column(c, overflow="fold")
        for b in ev.benchmarks:
            e.add_row(b["name"], " ".join(b["languages"]), _n(b["items"]), str(b["max_new_tokens"]), b["measures"])
        console.print(e)
        console.print(f"evaluation engine: {ev.engine}; judge: {ev.judge}; generated tokens per model: at most "
                      f"{_n(ev.tokens_per_model.max)}")
    for note in plan.notes:
        console.print(f"[yellow]note:[/] {note}")


__all__ = ["Plan", "make_plan", "print_plan"]
