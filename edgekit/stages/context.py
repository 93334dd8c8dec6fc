"""What a running stage sees: the recipe, the run's shared inputs (teacher, tokenizer,
packed rows), and the typed outputs of the stages before it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.fsutil import release_memory
from edgekit.recipe.schema import RecipeBase
from edgekit.stages import outputs as outputs_mod
from edgekit.stages.registry import REGISTRY, StageType, producer_of


@dataclass
class Artifact:
    """A finished stage as artifact.json records it, its outputs typed."""
    type: str
    dir: Path
    config: dict
    metrics: dict
    outputs: object  # the stage's output dataclass, or None
    wall_s: float
    record: dict  # artifact.json as written

    @classmethod
    def from_record(cls, record: dict, stage_dir: Path) -> "Artifact":
        produces = REGISTRY[record["type"]].produces
        outs = outputs_mod.from_json(produces, record["outputs"], stage_dir) if produces else None
        return cls(record["type"], stage_dir, record.get("config") or {}, record.get("metrics") or {}, outs,
                   record.get("wall_s", 0.0), record)


@dataclass
class RunContext:
    recipe: RecipeBase
    base: Path  # the recipe's directory: relative paths in the recipe start here
    run_dir: Path
    finished: dict[str, Artifact] = field(default_factory=dict)  # stage type -> its artifact
    current: StageType | None = None  # the stage running now: `get` holds it to what it declared
    _cache: dict = field(default_factory=dict)

    # --- earlier stages' outputs -------------------------------------------------
    def get(self, output_type: type):
        """The typed outputs of the earlier stage that produces `output_type`, or None when
        the recipe has no such stage. A stage reads only the types it declared it consumes."""
        if self.current is not None and output_type not in self.current.consumes:
            raise EdgekitError(f"stage '{self.current.name}' reads {output_type.__name__} without declaring it",
                               "add it to the stage's consumes=(...) in its @register (this is a bug in edgekit)")
        art = self.artifact(output_type)
        return art.outputs if art else None

    def artifact(self, output_type: type) -> Artifact | None:
        stage = producer_of(output_type)
        return self.finished.get(stage.name) if stage else None

    def student_path(self) -> Path:
        """The newest float student: the distilled one, else the teacher itself."""
        distilled = self.artifact(outputs_mod.DistillOutput)
        return distilled.outputs.model if distilled else self.teacher_path()

    def qat_student(self, qat: "outputs_mod.QATOutput"):
        """The QAT student as it trained: what the fake quantizers make of the latent weights,
        computed once (the same forward as in training), as a plain model on its grid."""
        from edgekit.quant.qat import prepare, strip

        model = self.load_model(qat.model)
        learned = qat.learned_scales()
        prepare(model, qat.plan_data()["plan"], "learn" if learned else "recompute", learned, importance=qat.importances())
        return strip(model, on_grid=True)

    # --- inputs shared by stages -------------------------------------------------
    def teacher_path(self) -> Path:
        if "teacher" not in self._cache:
            from edgekit.models.sources import resolve_model

            t = self.recipe.teacher
            self._cache["teacher"] = resolve_model(t.model, self.base, t.revision)
        return self._cache["teacher"].path

    def teacher_provenance(self) -> dict:
        self.teacher_path()
        return self._cache["teacher"].provenance

    def load_model(self, path: Path, trust_remote_code: bool = False, load: str | None = None):
        from edgekit.models.loading import load_causal_lm

        return load_causal_lm(path, self.recipe.teacher.dtype, trust_remote_code, load)

    def teacher(self):
        """The frozen teacher, in the recipe's `teacher.load` format (NF4/int8 through bitsandbytes)."""
        if "teacher_model" not in self._cache:
            t = self.recipe.teacher
            self._cache["teacher_model"] = self.load_model(self.teacher_path(), t.trust_remote_code, t.load)
        return self._cache["teacher_model"]

    def release_teacher(self) -> None:
        """Forget the loaded teacher: training sharded it over the processes (FSDP), so the
        stages after load it again whole."""
        self._cache.pop("teacher_model", None)

    def teacher_is_reference(self) -> bool:
        """Is the training teacher (`teacher()`) already the full-precision one?"""
        t = self.recipe.teacher
        return t.load in (None, "fp32") and t.dtype == "float32"

    def reference_teacher(self):
        """The teacher at full precision whatever `teacher.load` says: students are initialised
        from, and evaluated against, the real teacher, not its NF4/int8 copy."""
        t = self.recipe.teacher
        if self.teacher_is_reference():
            return self.teacher()
        from edgekit.models.loading import load_causal_lm

        return load_causal_lm(self.teacher_path(), "float32", t.trust_remote_code)

    def tokenizer(self):
        if "tokenizer" not in self._cache:
            from transformers import AutoTokenizer

            self._cache["tokenizer"] = AutoTokenizer.from_pretrained(
                self.teacher_path(), trust_remote_code=self.recipe.teacher.trust_remote_code)
        return self._cache["tokenizer"]

    def teacher_answers(self, sk, out: Path) -> tuple[list, dict]:
        """The teacher's answers to `sk.prompts` (schema.SequenceKD), filtered, and their stats;
        generated once and cached in `out` (the stage's folder: a resumed stage reuses them)."""
        import json

        from edgekit.data.documents import load_documents
        from edgekit.data.generate import filter_answers, generate_answers, prompt_texts

        path = out / "sequence_kd.jsonl"
        if not path.is_file():
            prompts = prompt_texts(load_documents(sk.prompts, self.base))
            rows = generate_answers(self.teacher(), self.tokenizer(), prompts, sk.max_new_tokens, sk.temperature,
                                    sk.top_p, sk.batch_size, sk.seed)
            kept, stats = filter_answers(rows, sk.min_chars, sk.max_chars, sk.drop_truncated, sk.near_duplicate,
                                         sk.verifier)
            if not kept:
                raise EdgekitError(f"sequence-level KD: every one of {len(rows)} teacher answers was filtered out "
                                   f"({stats['dropped']})",
                                   "raise sequence_kd.max_new_tokens, set drop_truncated: false, or loosen the filters")
            stats["sampling"] = sk.model_dump(exclude={"prompts", "verifier"}) | {"verifier": sk.verifier}
            (out / "sequence_kd_stats.json").write_text(json.dumps(stats, indent=2))
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        return load_documents(path.name, out), json.loads((out / "sequence_kd_stats.json").read_text())

    def rows(self, split: str):
        """Packed token rows (N, seq_len) of data/<split>.jsonl."""
        return self.rows_and_mask(split)[0]

    def rows_and_mask(self, split: str):
        """Rows and their loss mask (N, seq_len) bool: False on chat context tokens."""
        key = f"rows:{split}"
        if key not in self._cache:
            from edgekit.data.documents import load_documents
            from edgekit.data.tokens import pack

            docs = load_documents(f"{split}.jsonl", self.run_dir / "data")
            self._cache[key] = pack(docs, self.tokenizer(), self.recipe.data.seq_len, split)
        return self._cache[key]

    def initial_student(self, same_vocab: bool = True):
        """The untrained student the recipe describes (also the 'student before KD' baseline):
        (model, its tokenizer's directory, how it was made)."""
        from transformers import AutoTokenizer

        from edgekit.models.sources import resolve_model
        from edgekit.models.student import check_same_vocab

        s = self.recipe.student
        if s.init == "teacher_layers":
            return self._student_from_teacher_layers()
        src = resolve_model(s.model, self.base)
        tok = AutoTokenizer.from_pretrained(src.path, trust_remote_code=s.trust_remote_code)
        if same_vocab:
            check_same_vocab(self.tokenizer(), tok, self.recipe.teacher.model, s.model)
        return self.load_model(src.path, s.trust_remote_code), src.path, {"init": "model", "source": src.provenance}

    def _student_from_teacher_layers(self):
        from edgekit.models.student import (block_importance, init_from_teacher_layers, layers_to_keep,
                                            mlp_channel_importance, most_important, narrow_mlps)

        s = self.recipe.student
        teacher = self.reference_teacher()
        keep = layers_to_keep(teacher.config.num_hidden_layers, s.keep_every, s.keep_layers)
        info = {"init": "teacher_layers", "kept_layers": keep, "keep_by": s.keep_by}
        calib = self.rows_and_mask("train")[0][: s.importance_rows]  # for the importance measurements
        if s.keep_by == "importance":
            scores = block_importance(teacher, calib)
            keep = info["kept_layers"] = most_important(scores, len(keep))
            info["block_importance"] = [round(x, 5) for x in scores]
        student = init_from_teacher_layers(teacher, keep)
        if s.mlp_keep is not None:
            info["mlp"] = narrow_mlps(student, s.mlp_keep, mlp_channel_importance(student, calib))
        if not self.teacher_is_reference():  # a full-precision copy beside an NF4/int8 teacher: free it now
            del teacher
            release_memory()
        return student, self.teacher_path(), info
