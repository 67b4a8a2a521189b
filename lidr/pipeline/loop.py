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
from lidr.models import check_model_spec, resolve_model
from lidr.prompts import PromptSet, check_enough, load_prompts, translation_task_ids
from lidr.records import atomic_write_jsonl, atomic_write_json, digest, file_digest, load_records
from lidr.rundir import STAGES, RunDir, State
from lidr.templates import PromptFormat, choose_format


class StageConflict(RuntimeError):
    pass


def changed_inputs(recorded: dict, now: dict) -> list[str]:
    """Names of the input parts whose fingerprint differs from the recorded one."""
    return sorted(k for k in set(now) | set(recorded) if now.get(k) != recorded.get(k))


class StageNotReady(RuntimeError):
    pass


class Loop:
    def __init__(self, cfg: Config, root: str | Path, force: bool = False):
        self.cfg, self.run, self.force = cfg, RunDir(root), force
        # Everything cheap is checked here, before any model loads.
        check_model_spec(cfg.model)
        self.langs = cfg.languages.all
        self.prompts: PromptSet = load_prompts(cfg.prompts, self.langs)
        for note in self.prompts.notes:
            console.print(f"[yellow]warning:[/] {note}")
        check_enough(self.prompts, cfg)
        self.state = State(self.run.root / "state.json")
        self._backend = None  # the generation engine, loaded on first need
        self._backend_model: Path | None = None
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
            self.release_backend()
            from lidr.backends import make_backend

            with console.status(f"loading {path}"):
                self._backend = make_backend(
                    self.cfg.generation.backend, path, dtype=self.cfg.generation.dtype,
                    trust_remote_code=self.cfg.trust_remote_code,
                )
            self._backend_model = path
        return self._backend

    def release_backend(self) -> None:
        if self._backend is not None:
            self._backend.close()
        self._backend, self._backend_model = None, None

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
        gen = c.generation.model_dump(exclude={"batch_size", "backend"})
        common = {"languages": digest(c.languages.model_dump()), "prompt_format": c.prompt_format}
        if stage == "respond":
            texts = {l: [self.prompts.text[l][i] for i in self.ids(t)] for l in self.langs}
            return {**common, "model": self._model_fp(t), "generation": digest(gen), "prompts": digest(texts)}
        if stage == "translate":
            return {**common, "model": self._model_fp(t), "generation": digest(gen),
                    "translation_tasks": digest(sorted(map(str, self.task_ids(t)))),
                    "dominant_rejected": c.pairs.dominant_rejected,
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
        return out

    # ---- running --------------------------------------------------------------------
    def run_all(self) -> None:
        console.print(f"[bold]lidr run[/] -> {self.run.root}  ({self.cfg.iterations} iterations, "
                      f"languages {', '.join(self.langs)}, {self.cfg.prompts.per_iteration} prompts each)")
        for t in range(1, self.cfg.iterations + 1):
            for stage in STAGES:
                self.run_stage(t, stage)
        self.release_backend()
        self.print_summary()

    def run_stage(self, t: int, stage: str) -> None:
        key = f"iter-{t}/{stage}"
        self._check_ready(t, stage)
        inputs = self.inputs(t, stage)
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
                self._clear(t, stage)
            elif rec["status"] == "done":
                console.print(f"[dim]{key}: done, skipped[/]")
                return
            else:
                console.print(f"[cyan]{key}: resuming[/]")
        self.state.start(key, inputs)
        started = time.time()
        summary = getattr(self, f"_{stage}")(t)
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
        backend = self.backend(t)
        with progress() as bar:
            translate(backend, self.prompt_format(t), self._responses(t), needed,
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
        from lidr.pipeline.train import train_dpo_nll

        self.release_backend()  # free the generation model's memory for training
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

            summary = train_dpo_nll(self.model_in(t), examples, self.run.model(t), self.cfg.training,
                                    seed=self.cfg.seed + t, log_dir=self.run.train_log(t), progress=on_step)
        return summary

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
        for t in range(1, self.cfg.iterations + 1):
            row = [f"{(self.state.get(f'iter-{t}/{s}') or {}).get('seconds', '-')}" for s in STAGES]
            table.add_row(str(t), *row)
        console.print(table)
