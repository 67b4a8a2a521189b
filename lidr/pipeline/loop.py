"""Iterations, state and resume: M_{t-1} makes the data that trains M_t.

Each stage of each iteration is recorded in state.json with a fingerprint of its inputs
(the config slice it depends on, the files it reads, the model it uses). A finished
stage whose fingerprint still matches is skipped; one that was interrupted continues
(JSONL stages keep the ids already written); one whose inputs changed is refused,
naming the stage and what changed, unless `force` is set, which redoes it.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

from rich.table import Table

from lidr.config import Config
from lidr.console import console, progress
from lidr.models import check_model_spec, libraries_frozen, resolve_model
from lidr.prompts import PromptSet, check_enough, load_prompts, translation_task_ids
from lidr.records import (atomic_write_jsonl, atomic_write_json, digest, file_digest, load_records,
                          remove_stale_temporaries)
from lidr.rundir import STAGES, RunDir, State
from lidr.templates import PromptFormat, choose_format


class StageConflict(RuntimeError):
    pass


def changed_inputs(recorded: dict, now: dict) -> list[str]:
    """Names of the input parts whose fingerprint differs from the recorded one."""
    return sorted(k for k in set(now) | set(recorded) if now.get(k) != recorded.get(k))


class StageNotReady(RuntimeError):
    pass


def eval_key(k: int) -> str:
    """state.json key of the evaluation of M_k."""
    return f"eval/M{k}"


class Loop:
    def __init__(self, cfg: Config, root: str | Path, force: bool = False):
        self.cfg, self.run, self.force = cfg, RunDir(root), force
        # Everything cheap is checked here, before any model loads.
        check_model_spec(cfg.model)
        tr = cfg.translator
        for spec in (cfg.generation.tokenizer, tr and tr.model, tr and tr.tokenizer):
            if spec:
                check_model_spec(spec)
        self.langs = cfg.languages.all
        self.prompts: PromptSet = load_prompts(cfg.prompts, self.langs)
        for note in self.prompts.notes:
            console.print(f"[yellow]warning:[/] {note}")
        check_enough(self.prompts, cfg)
        from lidr.pipeline import launch

        launch.check(cfg.training)  # the accelerate config of a multi-GPU train stage
        from lidr.eval.suite import prepare

        self.eval_plan = prepare(cfg.eval, self.langs)  # evaluation data checked now, too
        if self.eval_plan is not None:
            for note in self.eval_plan.notes:
                console.print(f"[yellow]warning:[/] {note}")
        elif cfg.eval.enabled:
            console.print("[yellow]note:[/] no evaluation data (set eval.data or $LIDR_DATA): "
                          "models are trained but not evaluated")
        self.state = State(self.run.root / "state.json")
        self._backend = None  # the generation engine, loaded on first need
        self._backend_model: Path | None = None
        self._kept_model: dict[int, object] = {}  # t -> M_t, taken from the engine for training (release_backend)
        self._trained_model: dict[Path, object] = {}  # folder -> the model training saved there, in memory
        self._translator = None  # (engine, prompt format) of `translator`, when set
        self._base_model: Path | None = None
        self._tokenizers: dict[Path, object] = {}
        self._task_ids: dict[int, set] = {}

    # ---- models -------------------------------------------------------------------
    def base_model(self) -> Path:
        if self._base_model is None:
            self._base_model = resolve_model(self.cfg.model)
        return self._base_model

    def model_in(self, t: int) -> Path:
        """The model iteration t starts from: M0 for t = 1, else the previous output."""
        return self.base_model() if t == 1 else self.run.model(t - 1)

    def backend(self, t: int):
        path = self.model_in(t)
        if self._backend_model != path:
            trained = self._trained_model.pop(path, None)  # (release_backend drops any other)
            self.release_backend()
            from lidr.backends import make_backend

            g = self.cfg.generation
            # openai: `path` only gives the tokenizer (generation.tokenizer may name M0's)
            local = path
            if g.backend == "openai" and g.tokenizer and t == 1:
                from lidr.backends.openai import tokenizer_source

                local = tokenizer_source(g.tokenizer)
            with console.status(f"loading {local}"):
                self._backend = make_backend(
                    g.backend, local, dtype=g.dtype,
                    trust_remote_code=self.cfg.trust_remote_code, server=g.server, vllm=g.vllm,
                    cpu_packed_weights=g.cpu_packed_weights, model=trained,
                )
            self._backend_model = path
            if g.backend == "openai" and t > 1:
                self._check_served(t)
        return self._backend

    def _check_served(self, t: int) -> None:
        """A server cannot be told to load M_{t-1}: refuse unless it says it serves that
        folder (vLLM lists it as `root`, llama.cpp as `id`), rather than make iteration
        t's data with another model."""
        want, server = self.model_in(t).resolve(), self.cfg.generation.server
        try:
            entries = self._backend.served_models()
        except Exception:  # noqa: BLE001 - treated as "does not say"
            entries = []
        for e in entries:
            for v in (e.get("root"), e.get("id")):
                if e.get("id") == server.model and v and (
                        Path(v).expanduser().resolve() == want or str(v).rstrip("/").endswith(f"iter-{t - 1}/model")):
                    return
        self.release_backend()
        listed = ", ".join(f"{e.get('id')} ({e.get('root', '-')})" for e in entries) or "nothing"
        raise StageNotReady(
            f"iteration {t} generates with M{t - 1} ({want}), but the server at {server.url} does not say it "
            f"serves that folder under the name {server.model!r} (it lists: {listed}). Serve it, e.g. "
            f"`vllm serve {want} --served-model-name {server.model}`, and run again (finished stages are kept)."
        )

    def release_backend(self, keep_model_for: int | None = None) -> None:
        """Close the generation engine (and the translator's). With `keep_model_for` t: where the
        engine holds M_t and training can take it (`launch.takes_model`), keep the model (in
        `_kept_model`) for training rather than load the same files again."""
        from lidr.pipeline.launch import takes_model

        self._trained_model.clear()
        if self._kept_model:  # kept and not taken (training stopped before it took it)
            from lidr import packed_linear
            from lidr.models import release_memory

            while self._kept_model:  # (a packed layer's forward refers to the layer: a cycle)
                packed_linear.unpack(self._kept_model.popitem()[1])
            release_memory(collect=False)
        if (keep_model_for is not None and self._backend_model == self.model_in(keep_model_for)
                and hasattr(self._backend, "take_model") and takes_model(self.cfg.training, self._backend.model)):
            self._kept_model[keep_model_for] = self._backend.take_model()
        elif self._backend is not None:
            self._backend.close()
        self._backend, self._backend_model = None, None
        if self._translator is not None:
            self._translator[0].close()
            self._translator = None

    def translator(self) -> tuple[object, PromptFormat]:
        """Engine and prompt format of the `translator` setting (another model or server
        than the one being trained: the paper's translate-by-system ablation)."""
        if self._translator is None:
            tr = self.cfg.translator
            self.release_backend()  # one local model in memory at a time
            from lidr.backends import make_backend

            if tr.backend == "openai":
                from lidr.backends.openai import tokenizer_source

                path = tokenizer_source(tr.tokenizer or tr.model)
            else:
                path = resolve_model(tr.model)
            with console.status(f"loading translator {path}"):
                engine = make_backend(tr.backend, path, dtype=tr.dtype, trust_remote_code=self.cfg.trust_remote_code,
                                      server=tr.server, vllm=tr.vllm,
                                      cpu_packed_weights=self.cfg.generation.cpu_packed_weights)
            fmt = choose_format(engine.tokenizer, tr.prompt_format, self.cfg.generation.system_prompt)
            self._translator = (engine, fmt)
        return self._translator

    def prompt_format(self, t: int) -> PromptFormat:
        path = self.model_in(t)
        if path not in self._tokenizers:
            if self._backend_model == path:  # the generation engine already loaded it
                self._tokenizers[path] = self._backend.tokenizer
            else:
                from lidr.models import load_tokenizer

                self._tokenizers[path] = load_tokenizer(path, trust_remote_code=self.cfg.trust_remote_code)
        return choose_format(self._tokenizers[path], self.cfg.prompt_format, self.cfg.generation.system_prompt)

    # ---- fingerprints ---------------------------------------------------------------
    def ids(self, t: int) -> list:
        return self.prompts.slice(t, self.cfg.prompts.per_iteration)

    def task_ids(self, t: int) -> set:
        """Prompts of iteration t that are translation tasks (id list and/or detector)."""
        if t not in self._task_ids:
            self._task_ids[t] = translation_task_ids(
                self.prompts, self.cfg.prompts, self.cfg.languages.dominant, self.ids(t))
        return self._task_ids[t]

    def _model_fp(self, t: int) -> str:
        if t == 1:
            p = Path(self.cfg.model).expanduser()
            return digest([self.cfg.model, file_digest(p) if p.exists() else None])
        return file_digest(self.run.model(t - 1))

    def _files_fp(self, folder: Path) -> dict:
        return {f"{folder.name}/{p.name}": file_digest(p) for p in sorted(folder.glob("*.jsonl"))}

    def inputs(self, t: int, stage: str) -> dict:
        """What a stage's result depends on, each part digested separately so a refusal
        can say which part changed."""
        c = self.cfg
        # engine settings (which engine, server, sizes) do not change what greedy decoding makes
        gen = c.generation.model_dump(exclude={"batch_size", "backend", "server", "tokenizer", "vllm"})
        common = {"languages": digest(c.languages.model_dump()), "prompt_format": c.prompt_format}
        if stage == "respond":
            texts = {l: [self.prompts.text[l][i] for i in self.ids(t)] for l in self.langs}
            return {**common, "model": self._model_fp(t), "generation": digest(gen), "prompts": digest(texts)}
        if stage == "translate":
            return {**common, "model": self._model_fp(t), "generation": digest(gen),
                    "translation_tasks": digest(sorted(map(str, self.task_ids(t)))),
                    "dominant_rejected": c.pairs.dominant_rejected,
                    **({"translator": digest(c.translator.identity())} if c.translator else {}),
                    **self._files_fp(self.run.responses(t))}
        if stage == "pairs":
            return {**common, "pairs": digest(c.pairs.model_dump()), "seed": c.seed,
                    "translation_tasks": digest(sorted(map(str, self.task_ids(t)))),
                    **self._files_fp(self.run.responses(t)), **self._files_fp(self.run.translations(t))}
        if stage == "train":
            return {**common, "model": self._model_fp(t), "training": digest(c.training.model_dump()),
                    "seed": c.seed, "pairs.jsonl": file_digest(self.run.pairs(t))}
        raise ValueError(stage)

    def conflicts(self) -> list[str]:
        """Recorded stages whose inputs no longer match (checked before any work)."""
        out = []
        for t in range(1, self.cfg.iterations + 1):
            for stage in STAGES:
                rec = self.state.get(f"iter-{t}/{stage}")
                if rec is None:
                    continue
                changed = changed_inputs(rec["inputs"], self.inputs(t, stage))
                if changed:
                    out.append(f"iter-{t}/{stage} ({rec['status']}): changed {', '.join(changed)}")
        for k in self.eval_models():
            rec = self.state.get(eval_key(k))
            # M_k's inputs can only be computed once M_k exists
            if rec is not None and (k == 0 or self.run.model(k).exists()):
                changed = changed_inputs(rec["inputs"], self.eval_inputs(k))
                if changed:
                    out.append(f"{eval_key(k)} ({rec['status']}): changed {', '.join(changed)}")
        return out

    # ---- running --------------------------------------------------------------------
    def run_all(self) -> None:
        console.print(f"[bold]lidr run[/] -> {self.run.root}  ({self.cfg.iterations} iterations, "
                      f"languages {', '.join(self.langs)}, {self.cfg.prompts.per_iteration} prompts each)")
        evaluate = self.eval_plan is not None
        with libraries_frozen():  # the collections that stages set off skip the libraries' objects
            for t in range(1, self.cfg.iterations + 1):
                if evaluate:  # M_{t-1} is loaded for this iteration's generation anyway
                    self.run_eval(t - 1)
                for stage in STAGES:
                    self.run_stage(t, stage)
            if evaluate:
                self.run_eval(self.cfg.iterations)
            self.release_backend()
        self.print_summary()

    def run_stage(self, t: int, stage: str) -> None:
        self._check_ready(t, stage)
        self._execute(f"iter-{t}/{stage}", self.inputs(t, stage), lambda: getattr(self, f"_{stage}")(t),
                      clear=lambda: self._clear(t, stage), outputs=self.run.outputs(t, stage))

    def run_eval(self, k: int) -> None:
        """Evaluate M_k (0 = the base model) as configured in `eval`."""
        if self.eval_plan is None:
            raise StageNotReady("no evaluation data: set eval.data in the config or $LIDR_DATA")
        if k > 0:
            rec = self.state.get(f"iter-{k}/train")
            if rec is None or rec["status"] != "done":
                raise StageNotReady(f"{eval_key(k)} needs iter-{k}/train to be finished first")
        self._execute(eval_key(k), self.eval_inputs(k), lambda: self._eval(k), clear=lambda: self._clear_eval(k),
                      outputs=self.run.eval_outputs(k))

    def _execute(self, key: str, inputs: dict, work, clear, outputs: list[Path]) -> None:
        """Skip a finished stage, resume an interrupted one, refuse (or with --force redo)
        one whose inputs changed; record start, finish, seconds and summary in state.json.
        A stage resumed or redone first loses the temporary files of a write that was killed
        before its rename (state.json's too: this process is its only writer)."""
        remove_stale_temporaries([self.state.path])
        rec = self.state.get(key)
        if rec is not None:
            changed = changed_inputs(rec["inputs"], inputs)
            if changed and not self.force:
                raise StageConflict(
                    f"{key} was {'finished' if rec['status'] == 'done' else 'started'} with other inputs "
                    f"(changed: {', '.join(changed)}). Re-run with --force to redo it and what depends "
                    f"on it, or use another --out folder."
                )
            if changed:
                console.print(f"[yellow]{key}: inputs changed ({', '.join(changed)}), redoing[/]")
                clear()
            elif rec["status"] == "done" and not (rec.get("summary") or {}).get("judge_failures"):
                console.print(f"[dim]{key}: done, skipped[/]")
                return
            else:  # interrupted, or finished with judgments to retry
                console.print(f"[cyan]{key}: resuming[/]")
            remove_stale_temporaries(outputs)
        self.state.start(key, inputs)
        started = time.time()
        summary = work()
        seconds = time.time() - started
        self.state.finish(key, seconds, summary)
        console.print(f"[green]{key}: done in {seconds:.1f} s[/]")

    def _check_ready(self, t: int, stage: str) -> None:
        before = [(t, s) for s in STAGES[: STAGES.index(stage)]] + ([(t - 1, "train")] if t > 1 else [])
        for it, name in before:
            rec = self.state.get(f"iter-{it}/{name}")
            if rec is None or rec["status"] != "done":
                raise StageNotReady(
                    f"iter-{t}/{stage} needs iter-{it}/{name} to be finished first "
                    f"(lidr {name} {self.run.root} --iteration {it}, or lidr run)"
                )

    def _clear(self, t: int, stage: str) -> None:
        for p in self.run.outputs(t, stage):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        self.state.forget(f"iter-{t}/{stage}")

    # ---- the four stages ------------------------------------------------------------
    def _respond(self, t: int) -> dict:
        from lidr.pipeline.respond import respond

        ids = self.ids(t)
        slice_ = {l: {i: self.prompts.text[l][i] for i in ids} for l in self.langs}
        backend = self.backend(t)
        with progress() as bar:
            respond(backend, self.prompt_format(t), slice_, self.run.responses(t), self.cfg.generation, bar)
        recs = [r for l in self.langs for r in load_records(self.run.responses(t) / f"{l}.jsonl")]
        return {"responses": len(recs), "hit_token_limit": sum(r["finish_reason"] == "length" for r in recs)}

    def _responses(self, t: int) -> dict[str, dict]:
        return {l: {r["id"]: r for r in load_records(self.run.responses(t) / f"{l}.jsonl")} for l in self.langs}

    def _translations(self, t: int) -> dict[tuple[str, str], dict]:
        out = {}
        for p in sorted(self.run.translations(t).glob("*.jsonl")):
            src, tgt = p.stem.split("-", 1)
            out[(src, tgt)] = {r["id"]: r for r in load_records(p)}
        return out

    def _translate(self, t: int) -> dict:
        from lidr.pipeline.pairs import needed_translations
        from lidr.pipeline.translate import translate

        d, others = self.cfg.languages.dominant, self.cfg.languages.others
        needed = needed_translations(d, others, self.task_ids(t), self.ids(t),
                                     dominant_rejected=self.cfg.pairs.dominant_rejected)
        backend, fmt = self.translator() if self.cfg.translator else (self.backend(t), self.prompt_format(t))
        with progress() as bar:
            translate(backend, fmt, self._responses(t), needed,
                      self.run.translations(t), self.cfg.generation, bar)
        stats = {}
        for (src, tgt), recs in self._translations(t).items():
            failed = sum(not r["ok"] for r in recs.values())
            stats[f"{src}-{tgt}"] = {"n": len(recs), "failed": failed,
                                     "failure_rate": round(failed / len(recs), 4) if recs else None}
        return {"translations": stats}

    def _pairs(self, t: int) -> dict:
        from lidr.pipeline.pairs import build_pairs

        result = build_pairs(
            self._responses(t), self._translations(t), self.cfg.languages.dominant,
            self.cfg.languages.others, self.cfg.pairs, self.cfg.seed, translation_task_ids=self.task_ids(t),
        )
        atomic_write_jsonl(self.run.pairs(t), result.kept)
        atomic_write_jsonl(self.run.dropped(t), result.dropped)
        atomic_write_json(self.run.pairs_summary(t), result.counts)
        self._print_pair_counts(t, result.counts)
        return result.counts

    def _train(self, t: int) -> dict:
        from lidr.pipeline.launch import train  # in process, or under accelerate launch (num_processes > 1)

        self.release_backend(keep_model_for=t)  # free the generation engine's memory for training
        pairs = load_records(self.run.pairs(t))
        if not pairs:
            raise RuntimeError(f"iter-{t}: no preference pairs were kept (see {self.run.dropped(t)}); nothing to train")
        fmt = self.prompt_format(t)
        examples = [
            {"prompt": fmt.response_prompt(p["prompt"], p["lang"]),
             "chosen": fmt.response_text(p["chosen"]), "rejected": fmt.response_text(p["rejected"])}
            for p in pairs
        ]
        random.Random(self.cfg.seed + t).shuffle(examples)
        with progress() as bar:
            task = bar.add_task("train (steps)", total=None)

            def on_step(step, total, metrics):
                bar.update(task, completed=step, total=total,
                           description=f"train loss {metrics['loss']:.3f} acc {metrics['reward_accuracy']:.2f}")

            # M_t as the generation engine held it, where training can take it (else loaded from disk);
            # taken out of `_kept_model` by training itself, which then holds the only reference
            summary = train(self.model_in(t), examples, self.run.model(t), self.cfg.training,
                            seed=self.cfg.seed + t, log_dir=self.run.train_log(t), progress=on_step,
                            take_model=(lambda: self._kept_model.pop(t)) if t in self._kept_model else None,
                            hand_over=self._keep_trained(t))
        return summary

    def _keep_trained(self, t: int):
        """Where M_t will generate next in this process (iteration t + 1, or its evaluation) with
        the hf engine: a `hand_over` for training that keeps the M_t it saved, in memory, for
        `backend` to take instead of loading the files just written (gemma-3-270m: a 0.25-0.4 s
        load, and no second copy of the model in memory; on the benchmark VM, whose new pages are
        slow, the save with the model kept took about as much longer: bench/README.md, round 20)."""
        if self.cfg.generation.backend != "hf" or not (t < self.cfg.iterations or self.eval_plan is not None):
            return None
        return lambda model: self._trained_model.__setitem__(self.run.model(t), model)

    # ---- evaluation -----------------------------------------------------------------
    def eval_models(self) -> list[int]:
        return list(range(self.cfg.iterations + 1)) if self.eval_plan is not None else []

    def eval_inputs(self, k: int) -> dict:
        c = self.cfg
        judge = c.eval.judge
        settings = c.eval.model_dump(exclude={"judge", "batch_size", "data"})
        return {
            "model": self._model_fp(k + 1), "prompt_format": c.prompt_format,
            "eval": digest(settings), "data": str(self.eval_plan.root.resolve()),
            "generation": digest([c.generation.system_prompt, c.generation.repetition_penalty]),
            "judge": digest([judge.url, judge.model] if judge else None),
            "seed": c.seed,
        }

    def _clear_eval(self, k: int) -> None:
        for p in self.run.eval_outputs(k):
            shutil.rmtree(p, ignore_errors=True)
        self.state.forget(eval_key(k))

    def _eval(self, k: int) -> dict:
        """M_k on the configured benchmarks; with a judge, also M_k vs M0 head-to-head and
        the reward accuracy of the pairs that trained M_k."""
        from lidr.eval.suite import evaluate_model

        c = self.cfg
        backend = self.backend(k + 1)  # model_in(k + 1) is M_k
        judge = self._judge()
        try:
            with progress() as bar:
                out = evaluate_model(
                    backend, self.prompt_format(k + 1), self.eval_plan, c.eval, self.run.eval_dir(k),
                    generator=f"{Path(str(c.model)).name}-M{k}",
                    batch_size=c.eval.batch_size or c.generation.batch_size,
                    repetition_penalty=c.generation.repetition_penalty, judge=judge, seed=c.seed, progress=bar,
                )
                if judge is not None and k > 0:
                    out["judge_failures"] = out.get("judge_failures", 0) + self._judged_comparisons(k, judge, bar)
        finally:
            if judge is not None:
                judge.close()
        self._print_eval(k, out)
        return out

    def _judge(self):
        if self.cfg.eval.judge is None:
            return None
        from lidr.eval.judge import make_judge

        return make_judge(self.cfg.eval.judge, self.run.root / "eval" / "judgments-cache.jsonl")

    def _judged_comparisons(self, k: int, judge, bar) -> int:
        from lidr.eval.h2h import answers_from, head_to_head, reward_accuracy

        failures = 0
        if self.eval_plan.alpaca:
            langs = list(self.eval_plan.alpaca)
            s = head_to_head(judge, answers_from(self.run.eval_dir(k) / "alpaca", langs),
                             answers_from(self.run.eval_dir(0) / "alpaca", langs),
                             self.run.h2h_dir(k, 0), name_a=f"M{k}", name_b="M0", progress=bar)
            failures += s["failures"]
        s = reward_accuracy(judge, load_records(self.run.pairs(k)), self.run.reward_accuracy_dir(k),
                            seed=self.cfg.seed, progress=bar)
        return failures + s["failures"]

    def _print_eval(self, k: int, out: dict) -> None:
        shown = ", ".join(f"{name} {value}" for name, value in out.items() if value is not None)
        console.print(f"[bold]M{k}[/]: {shown}  (details: {self.run.eval_dir(k)})")

    # ---- reporting ------------------------------------------------------------------
    def _print_pair_counts(self, t: int, counts: dict) -> None:
        reasons = sorted({r for per in counts.get("dropped", {}).values() for r in per})
        table = Table(title=f"iter-{t} preference pairs")
        table.add_column("lang")
        table.add_column("kept", justify="right")
        for r in reasons:
            table.add_column(f"dropped: {r}", justify="right")
        for lang in self.langs:
            drops = counts.get("dropped", {}).get(lang, {})
            table.add_row(lang, str(counts.get("kept", {}).get(lang, 0)), *(str(drops.get(r, 0)) for r in reasons))
        console.print(table)

    def print_summary(self) -> None:
        table = Table(title=f"{self.run.root}: seconds per stage")
        table.add_column("iteration")
        for s in STAGES:
            table.add_column(s, justify="right")
        table.add_column("eval of its model", justify="right")
        seconds = lambda key: f"{(self.state.get(key) or {}).get('seconds', '-')}"  # noqa: E731
        if self.eval_plan is not None:
            table.add_row("0 (M0)", *["" for _ in STAGES], seconds(eval_key(0)))
        for t in range(1, self.cfg.iterations + 1):
            table.add_row(str(t), *[seconds(f"iter-{t}/{s}") for s in STAGES], seconds(eval_key(t)))
        console.print(table)
