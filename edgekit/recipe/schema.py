"""The recipe: a closed, typed schema (unknown keys are errors, never ignored).

    name: quickstart
    teacher: {model: embedded:smollm2-135m-instruct}
    student: {init: teacher_layers, keep_every: 3}
    data: {train: data/stdlib_docs.jsonl, holdout_fraction: 0.1}
    stages: [{type: distill, ...}, {type: export, ...}, ...]

This module holds what every recipe has (teacher, student, data) and the pieces stage
configs share (training settings, the stage base). Each stage type's own config lives in
its module under edgekit/stages/, and `recipe_model` builds the whole recipe's schema from
that registry. Paths are relative to the recipe file.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class ModelSpec(Closed):
    model: str = Field(description="embedded:NAME, a hub id (org/name), a model directory or a .gguf file")
    revision: str | None = None
    trust_remote_code: bool = False  # off unless the recipe says so: hub code runs on your machine
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # fp32 on CPU: bf16 is ~25x slower here
    # teacher weights in memory: nf4/int8 through bitsandbytes (frozen teacher only); fp32/fp16/bf16 set dtype
    # (bf16: half fp32's memory without fp16's overflow; fast only where the CPU multiplies bf16 natively)
    load: Literal["fp32", "fp16", "bf16", "nf4", "int8"] | None = None

    @property
    def weights(self) -> str:
        """The format the weights are held in: `load`, else the one `dtype` gives."""
        return self.load or {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[self.dtype]


class StudentSpec(Closed):
    init: Literal["teacher_layers", "model"] = "teacher_layers"
    # teacher_layers: keep every k-th teacher layer (first and last always kept), or an explicit list
    keep_every: int | None = Field(3, ge=1)
    keep_layers: list[int] | None = None
    # which layers: "spacing" keeps every k-th; "importance" keeps as many (len of the every-k-th set),
    # chosen by Block Influence measured on `importance_rows` train rows (Minitron/ShortGPT depth pruning)
    keep_by: Literal["spacing", "importance"] = "spacing"
    importance_rows: int = Field(8, ge=1)
    # narrower MLPs: keep this fraction of each layer's MLP channels (rounded to a multiple of 32),
    # those with the largest mean activation on `importance_rows` train rows (Minitron width pruning)
    mlp_keep: float | None = Field(None, gt=0.0, lt=1.0)
    model: str | None = None  # for init: model, a smaller model with the teacher's tokenizer
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.init == "model" and not self.model:
            raise ValueError("student.init is 'model' but student.model is not set; name a model or use init: teacher_layers")
        if self.keep_by == "importance" and self.keep_layers:
            raise ValueError("student.keep_layers names the layers itself; keep_by: importance chooses them: use one or the other")
        if self.mlp_keep is not None and self.init != "teacher_layers":
            raise ValueError("student.mlp_keep narrows the MLPs of layers copied from the teacher; with init: model "
                             "the student's widths are its own: remove mlp_keep or use init: teacher_layers")
        if self.keep_layers is not None and len(self.keep_layers) == 0:
            raise ValueError("student.keep_layers is empty; list at least one teacher layer index")
        return self


class DataSpec(Closed):
    train: str = Field(description="JSONL (text, prompt/response or messages), a .txt file, or hf:DATASET")
    holdout: str | None = None  # a separate holdout file; otherwise split off `train` by document
    holdout_fraction: float = Field(0.1, gt=0.0, lt=0.9)
    max_documents: int | None = Field(None, ge=2)
    seq_len: int = Field(256, ge=8, le=32768)
    split_seed: int = 0
    # {FIELD: {VALUE: k}}: training documents whose JSONL FIELD is VALUE are packed k times (a row's
    # own `weight` wins), e.g. {genre: {dialogue: 3}}; the holdout is split off first and not weighted
    weights: dict[str, dict[str, Annotated[int, Field(ge=1)]]] = {}


class SequenceKD(Closed):
    """Sequence-level KD (Kim & Rush, 2016): train on the teacher's own answers to prompts.
    Works across tokenizers: with a student of another vocabulary it trains on labels alone."""
    prompts: str  # JSONL (prompt / messages / text per row) or text file, relative to the recipe
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.7, ge=0.0)  # 0: greedy
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    batch_size: int = Field(8, ge=1)
    seed: int = 0
    min_chars: int = Field(1, ge=0)
    max_chars: int = Field(20000, ge=1)
    drop_truncated: bool = True  # answers cut off by max_new_tokens
    near_duplicate: float = Field(0.9, gt=0.0, le=1.0)  # 5-gram Jaccard at or above this is a near duplicate
    verifier: str | None = None  # command; reads {"prompt","response"} JSON on stdin; exit 0 keeps the answer


class LoraSpec(Closed):
    """LoRA adapters on the student (peft), merged into its weights when the stage ends."""
    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                        "gate_proj", "up_proj", "down_proj"], min_length=1)


class HiddenStateKD(Closed):
    """Hidden-state distillation (edgekit.distill.hidden): student layer outputs pulled toward
    the teacher's, through a learned projection where widths differ; added to the logit loss."""
    weight: float = Field(1.0, gt=0.0)
    loss: Literal["cosine", "mse"] = "cosine"  # mse is relative to the teacher state's norm
    # student layer -> teacher layer; unset: each kept layer's source (init: teacher_layers), else uniform depth
    layer_map: dict[int, int] | None = None


Optimizer = Literal["adamw", "adamw8bit", "paged_adamw8bit"]  # 8-bit states: bitsandbytes


class ParallelSpec(Closed):
    """How the models are spread over processes under torchrun (edgekit.parallel);
    one process ignores it. sharded: FSDP2, each process holds 1/N of the parameters (and,
    for the student, of gradients and optimizer state); replicated: each holds them whole."""
    student: Literal["replicated", "sharded"] = "replicated"
    teacher: Literal["replicated", "sharded"] = "replicated"  # sharded: decoder layers; embeddings/head stay whole


Loss = Literal["forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd", "tvd"]


class TrainSettings(Closed):
    """Everything the KD trainer (edgekit.distill.trainer) reads, declared once: the distill and
    qat stage configs extend it (with their own defaults), and the trainer takes it as is."""
    loss: Loss = "forward_kl"
    temperature: float = Field(1.0, gt=0.0)
    alpha_ce: float = Field(0.0, ge=0.0, le=1.0)  # L = alpha*CE(labels) + (1-alpha)*KD; 1.0 with no teacher: SFT
    skew_alpha: float = Field(0.1, ge=0.0, le=1.0)  # DistiLLM mixing for skew KL
    jsd_beta: float = Field(0.5, ge=0.0, le=1.0)  # GKD: beta->0 forward KL, beta->1 reverse KL
    steps: int = Field(40, ge=1)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(4, ge=0)
    grad_clip: float = Field(1.0, gt=0.0)
    loss_chunk: int = Field(128, ge=1)  # positions per loss chunk: peak memory grows with this, not B*T*V
    checkpoint_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0)  # every N steps (and at the end): holdout perplexity, KL to teacher, top-1; 0: off
    eval_rows: int = Field(8, ge=1)  # holdout rows that evaluation scores
    seed: int = 0
    # auto = bf16 autocast of the trunks' forward on a GPU, the output heads' matmuls in bf16 (fp32
    # weights, optimizer state, loss and its gradient). On a CPU with native bf16: bf16_matmul where
    # oneDNN's "medium" fp32 matmuls really multiply bf16-rounded inputs (AMX: fp32 tensors
    # everywhere, ~2x fp32's speed), else bf16 as on a GPU (AVX-512 BF16 on Zen 4, whose oneDNN keeps
    # those matmuls fp32: trunks 1.55x faster); fp32 on other CPUs, whose bf16 is ~25x slower
    # (distill.precision.resolved_precision). Training runs on the GPU when there is one (torchrun:
    # LOCAL_RANK's GPU), the CPU otherwise.
    precision: Literal["auto", "fp32", "bf16", "bf16_matmul"] = "auto"
    on_policy_fraction: float = Field(0.0, ge=0.0, le=1.0)  # GKD lambda: share of steps on student samples
    on_policy_temperature: float = Field(1.0, gt=0.0)
    optimizer: Optimizer = "adamw"
    parallel: ParallelSpec = ParallelSpec()

    @property
    def shard_student(self) -> bool:
        return self.parallel.student == "sharded"

    @property
    def shard_teacher(self) -> bool:
        return self.parallel.teacher == "sharded"

    @model_validator(mode="after")
    def _sharded_optimizer(self):
        if self.parallel.student == "sharded" and self.optimizer != "adamw":
            raise ValueError(f"parallel.student: sharded trains with PyTorch's AdamW on sharded tensors; optimizer "
                             f"'{self.optimizer}' (bitsandbytes) does not take them: use optimizer: adamw")
        return self


def student_needs_training(stage: str, model: str, recipe) -> list[str]:
    """A stage that takes 'the student' needs a stage that made one (or a student model)."""
    if model == "student" and recipe.stage("distill") is None and recipe.stage("qat") is None \
            and recipe.student.init == "teacher_layers":
        return [f"{stage}.model is 'student' but no distill stage trains one; add a distill stage or set {stage}.model: teacher"]
    return []


class StageConfig(Closed):
    """The base of every stage's config (edgekit/stages/<type>.py)."""

    def recipe_problems(self, recipe: "RecipeBase") -> list[str]:
        """What this stage finds wrong with the rest of the recipe (cross-stage rules)."""
        return []


class RecipeBase(Closed):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    seed: int = 0
    teacher: ModelSpec
    student: StudentSpec = StudentSpec()
    data: DataSpec

    # filled by recipe_model from the stage registry
    STAGE_CONFIGS: ClassVar[dict[str, type]] = {}
    STAGE_REQUIRES: ClassVar[dict[str, tuple[str, ...]]] = {}

    def stage(self, type_name: str):
        """This recipe's stage config of that type, or None."""
        return next((s for s in self.stages if s.type == type_name), None)

    @model_validator(mode="after")
    def _stage_order(self):
        """Cross-stage rules: registry order, each type once, consumers after producers, and
        each stage's own checks of the others."""
        order = list(self.STAGE_CONFIGS)
        types = [s.type for s in self.stages]
        problems = [f"stage type '{t}' appears {types.count(t)} times; keep one" for t in dict.fromkeys(types)
                    if types.count(t) > 1]
        ranks = [order.index(t) for t in types]
        if ranks != sorted(ranks):
            problems.append(f"stages are in the order {types}; they must follow {order}")
        for t in types:
            for need in self.STAGE_REQUIRES.get(t, ()):
                if need not in types:
                    problems.append(f"a '{t}' stage needs an '{need}' stage before it")
        for s in self.stages:
            problems += s.recipe_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self


def recipe_model(configs: dict[str, type[StageConfig]], requires: dict[str, tuple[str, ...]]) -> type[RecipeBase]:
    """The whole recipe's schema: `stages` is a list of any registered stage config, told
    apart by `type`; `configs` is in pipeline order."""
    union = Annotated[Union[tuple(configs.values())], Field(discriminator="type")]
    model = create_model("Recipe", __base__=RecipeBase, stages=(list[union], Field(min_length=1)))
    model.STAGE_CONFIGS = dict(configs)
    model.STAGE_REQUIRES = dict(requires)
    return model
