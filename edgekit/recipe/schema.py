"""The recipe: a closed, typed schema (unknown keys are errors, never ignored).

    name: quickstart
    teacher: {model: embedded:smollm2-135m-instruct}
    student: {init: teacher_layers, keep_every: 3}
    data: {train: data/stdlib_docs.jsonl, holdout_fraction: 0.1}
    stages: [{type: distill, ...}, {type: export, ...}, ...]

Stage configs are registered by `type` in `STAGE_CONFIGS`; the pipeline maps the same
type names to their run functions. Paths are relative to the recipe file.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

STAGE_ORDER = ("distill", "qat", "quantize", "export", "evaluate", "bench", "report")


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class ModelSpec(Closed):
    model: str = Field(description="embedded:NAME, a hub id (org/name), a model directory or a .gguf file")
    revision: str | None = None
    trust_remote_code: bool = False  # off unless the recipe says so: hub code runs on your machine
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # fp32 on CPU: bf16 is ~25x slower here
    # teacher weights in memory: nf4/int8 through bitsandbytes (frozen teacher only); fp16/fp32 set dtype
    load: Literal["fp32", "fp16", "nf4", "int8"] | None = None


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
    """How the models are spread over processes under torchrun (edgekit.distill.parallel);
    one process ignores it. sharded: FSDP2, each process holds 1/N of the parameters (and,
    for the student, of gradients and optimizer state); replicated: each holds them whole."""
    student: Literal["replicated", "sharded"] = "replicated"
    teacher: Literal["replicated", "sharded"] = "replicated"  # sharded: decoder layers; embeddings/head stay whole


class DistillConfig(Closed):
    type: Literal["distill"]
    loss: Literal["forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd", "tvd"] = "forward_kl"
    temperature: float = Field(1.0, gt=0.0)
    alpha_ce: float = Field(0.0, ge=0.0, le=1.0)  # L = alpha*CE(labels) + (1-alpha)*KD
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
    # the trunks' forward: auto = bf16 autocast on a GPU (fp32 weights, optimizer state, logits and loss),
    # fp32 on the CPU, whose bf16 is ~25x slower. Training runs on the GPU when there is one (torchrun:
    # LOCAL_RANK's GPU), the CPU otherwise.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # also train the same student on the same rows and steps with labels alone (no teacher):
    # the plain fine-tuning baseline KD has to beat
    baselines: list[Literal["sft"]] = []
    on_policy_fraction: float = Field(0.0, ge=0.0, le=1.0)  # GKD lambda: share of steps on student samples
    on_policy_temperature: float = Field(1.0, gt=0.0)
    sequence_kd: SequenceKD | None = None  # train on teacher-generated answers instead of data.train
    optimizer: Optimizer = "adamw"
    lora: LoraSpec | None = None  # train adapters instead of every weight; merged before export
    # online: the teacher runs every step. offline: its top-k next-token log-probs are computed once
    # per (teacher, rows, k, temperature), stored compressed in the cache and reused across runs and students
    teacher_logits: Literal["online", "offline"] = "online"
    top_k: int = Field(64, ge=1)  # offline: teacher tokens kept per position; the rest is one tail event
    hidden_states: HiddenStateKD | None = None
    parallel: ParallelSpec = ParallelSpec()

    @model_validator(mode="after")
    def _offline(self):
        if self.parallel.student == "sharded" and self.optimizer != "adamw":
            raise ValueError(f"parallel.student: sharded trains with PyTorch's AdamW on sharded tensors; optimizer "
                             f"'{self.optimizer}' (bitsandbytes) does not take them: use optimizer: adamw")
        if self.parallel.student == "sharded" and self.lora is not None:
            raise ValueError("parallel.student: sharded is for full-weight training; LoRA adapters are small enough "
                             "to replicate: use parallel.student: replicated with lora")
        if self.teacher_logits == "offline":
            if self.loss != "forward_kl":
                raise ValueError(f"teacher_logits: offline keeps the teacher's top-k only, which defines forward KL; "
                                 f"loss '{self.loss}' needs the full distribution: use loss: forward_kl or teacher_logits: online")
            if self.on_policy_fraction > 0:
                raise ValueError("teacher_logits: offline cannot grade sequences the student generates during training; "
                                 "set on_policy_fraction: 0 or teacher_logits: online")
            if self.hidden_states is not None:
                raise ValueError("hidden_states needs the teacher's layer outputs every step, which the offline cache "
                                 "does not keep: use teacher_logits: online with hidden_states")
            if self.sequence_kd is not None:
                raise ValueError("teacher_logits: offline caches the teacher on data.train rows; sequence_kd trains on "
                                 "generated answers instead: use teacher_logits: online with sequence_kd")
        return self


class QATConfig(Closed):
    """QAT-KD: train the fake-quantized student (llama.cpp's exact grid) against the teacher."""
    type: Literal["qat"]
    mix: Literal["q4_k_m", "q4_0", "q5_0", "q8_0"] = "q4_k_m"  # the llama.cpp type the export will use
    loss: Literal["forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd", "tvd"] = "forward_kl"
    temperature: float = Field(1.0, gt=0.0)
    alpha_ce: float = Field(0.0, ge=0.0, le=1.0)
    skew_alpha: float = Field(0.1, ge=0.0, le=1.0)
    jsd_beta: float = Field(0.5, ge=0.0, le=1.0)
    steps: int = Field(20, ge=1)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-5, gt=0.0)  # small: the weights only need to settle onto the grid
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(2, ge=0)
    grad_clip: float = Field(1.0, gt=0.0)
    loss_chunk: int = Field(128, ge=1)
    checkpoint_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0)  # every N steps (and at the end): holdout perplexity, KL to teacher, top-1; 0: off
    eval_rows: int = Field(8, ge=1)
    # recompute: each step, the format's own scale search; learn: Q8_0/Q5_0/Q4_0 block scales are
    # parameters (LSQ), trained at scale_lr (on log|scale|: ~that relative change per step); K-quants recompute
    scales: Literal["recompute", "learn"] = "recompute"
    scale_lr: float = Field(1e-3, gt=0.0)
    # float: only the weights are fake-quantized; llama_cpp: each quantized layer's input is also
    # rounded to the 8-bit blocks llama.cpp's CPU matmuls use (quant.act_rounding; straight-through)
    activations: Literal["float", "llama_cpp"] = "float"
    seed: int = 1
    # fp32 by default: under bf16 autocast the matmuls would round the grid's values (a Q8_0 value
    # needs 7 + 11 bits), so the forward would no longer be the deployed grid; bf16 trades that for speed
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    # also train a float twin: the same start, data, steps and seed without fake quantization.
    # Its llama.cpp quantization is the PTQ baseline QAT is judged against, at equal training.
    baselines: list[Literal["float"]] = ["float"]
    optimizer: Optimizer = "adamw"
    # where the latent weights start: the student as it is ("float"), or GPTQ's solution on the
    # same exact grid ("gptq": error-compensated rounding from `calibration_rows` train rows), so
    # QAT-KD refines a good post-training quantization instead of plain rounding
    init: Literal["float", "gptq"] = "float"
    calibration_rows: int = Field(32, ge=1)
    damp: float = Field(0.01, gt=0.0, le=1.0)


class QuantizeConfig(Closed):
    """Post-training quantization (PTQ): GPTQ and AWQ int4 checkpoints through llm-compressor,
    and both methods carried into GGUF (GPTQ run on the GGUF grid; AWQ scales folded into
    the norms before GGUF quantization). Calibrated on the recipe's train split, never the holdout."""
    type: Literal["quantize"]
    methods: list[Literal["gptq", "awq"]] = Field(["gptq", "awq"], min_length=1)
    gguf: list[Literal["q4_k_m", "q4_0", "q8_0"]] = ["q4_k_m"]  # GGUF mixes to write per method; [] for none
    model: Literal["student", "teacher"] = "student"  # student: the float student QAT is compared with
    calibration_rows: int = Field(64, ge=1)  # rows of data.seq_len tokens from the train split (GPTQ)
    awq_rows: int = Field(16, ge=1)  # AWQ's search runs every layer block once per grid point: ~1 min/layer at 64 rows on 2 CPU cores
    group_size: int | None = Field(None, ge=8)  # int4 group; unset: largest of 128/64/32 dividing every width
    damp: float = Field(0.01, gt=0.0, le=1.0)  # GPTQ: dampening, as a fraction of the mean Hessian diagonal
    awq_grid: int = Field(10, ge=2)  # AWQ: scale exponents tried per layer group (llm-compressor's default is 20)
    parity_rows: int = Field(4, ge=1)  # holdout rows each artifact is checked on in its runtime


class ExportConfig(Closed):
    type: Literal["export"]
    formats: list[Literal["f32", "f16", "q8_0", "q4_0", "q4_k_m", "onnx_int4"]] = ["f16", "q4_k_m"]
    model: Literal["student", "teacher"] = "student"
    # after a qat stage, the onnx_int4 folder holds: qat_grid = the trained grid itself (Q4_0 tensors
    # at 4 bits, 5-8-bit tensors at 8 bits: QAT's quality, larger and slower); int4 = the builder's own
    # int4 round-to-nearest (smallest and fastest, QAT's grid lost). For a QAT grid that is int4 all
    # through, train with `qat.mix: q4_0`.
    onnx_weights: Literal["qat_grid", "int4"] = "qat_grid"
    # llama.cpp's quantizations weighted by an importance matrix measured on `imatrix_rows` training
    # rows (never the holdout); also written as <name>.imatrix.gguf for `llama-quantize --imatrix`.
    # A QAT grid file is written exactly as trained and does not use it.
    imatrix: bool = False
    imatrix_rows: int = Field(64, ge=1)

    @field_validator("formats")
    @classmethod
    def _nonempty(cls, v):
        if not v:
            raise ValueError("export.formats is empty; list at least one of f16, q8_0, q4_0, q4_k_m")
        return v


class EvaluateConfig(Closed):
    type: Literal["evaluate"]
    max_tokens: int = Field(4096, ge=16)  # holdout tokens scored per model
    ctx: int = Field(256, ge=16)  # window for perplexity, in tokens
    baselines: list[Literal["teacher", "student_init"]] = ["teacher", "student_init"]
    tasks: str | None = None  # JSONL task set (edgekit.bench.tasks), relative to the recipe; every model is graded on it
    task_max_new_tokens: int = Field(8, ge=1)  # greedy answer length for exact-match items
    parity_floor: bool = True  # with a qat stage: also score its model with llama.cpp's activation rounding in fp32 and fp64


class BenchConfig(Closed):
    type: Literal["bench"]
    targets: list[str] = ["laptop"]  # profiles in edgekit/bench/targets.yaml
    prompt_tokens: int = Field(64, ge=1)
    gen_tokens: int = Field(32, ge=1)
    repeats: int = Field(3, ge=1)


    @field_validator("targets")
    @classmethod
    def _known_targets(cls, v):
        from edgekit.bench.targets import PROFILES
        from edgekit.errors import did_you_mean

        for name in v:
            if name not in PROFILES:
                raise ValueError(f"unknown target '{name}'{did_you_mean(name, list(PROFILES))}; known: {', '.join(PROFILES)}")
        return v


class ReportConfig(Closed):
    type: Literal["report"]
    sample_prompt: str = "The capital of France is"
    sample_tokens: int = Field(24, ge=1)


StageConfig = Annotated[
    Union[DistillConfig, QATConfig, QuantizeConfig, ExportConfig, EvaluateConfig, BenchConfig, ReportConfig],
    Field(discriminator="type"),
]
STAGE_CONFIGS = {c.model_fields["type"].annotation.__args__[0]: c
                 for c in (DistillConfig, QATConfig, QuantizeConfig, ExportConfig, EvaluateConfig, BenchConfig, ReportConfig)}


class Recipe(Closed):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    seed: int = 0
    teacher: ModelSpec
    student: StudentSpec = StudentSpec()
    data: DataSpec
    stages: list[StageConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _stage_order(self):
        """Cross-stage rules: canonical order, each type once, consumers after producers."""
        types = [s.type for s in self.stages]
        problems = []
        for t in set(types):
            if types.count(t) > 1:
                problems.append(f"stage type '{t}' appears {types.count(t)} times; keep one")
        ranks = [STAGE_ORDER.index(t) for t in types]
        if ranks != sorted(ranks):
            problems.append(f"stages are in the order {types}; they must follow {list(STAGE_ORDER)}")
        for consumer in ("evaluate", "bench"):
            if consumer in types and "export" not in types:
                problems.append(f"a '{consumer}' stage needs an 'export' stage before it (it measures exported files)")
        for producer in ("quantize", "export"):
            if producer in types and "distill" not in types and "qat" not in types:
                if self.stages[types.index(producer)].model == "student" and self.student.init == "teacher_layers":
                    problems.append(f"{producer}.model is 'student' but no distill stage trains one; "
                                    f"add a distill stage or set {producer}.model: teacher")
        if "qat" in types and "export" in types:
            qat, exp = self.stages[types.index("qat")], self.stages[types.index("export")]
            if qat.mix not in exp.formats:
                problems.append(f"qat.mix is '{qat.mix}' but export.formats is {exp.formats}; export the format QAT trained for")
        if "distill" in types and self.stages[types.index("distill")].parallel.teacher == "sharded" \
                and self.teacher.load in ("nf4", "int8"):
            problems.append(f"distill.parallel.teacher is 'sharded' but teacher.load is '{self.teacher.load}': "
                            "FSDP shards plain tensors, not bitsandbytes' packed weights; shard an fp32/fp16 teacher "
                            "or replicate the quantized one")
        if problems:
            raise ValueError("; ".join(problems))
        return self
