"""Typed run configuration: dataclass defaults, YAML files and dotlist overrides.

``load_config(["--config", "file.yaml", "train.epochs=3"])`` merges, in order,
the dataclass defaults, the YAML file and the overrides.  Unknown keys and wrong
types are rejected with the list of valid keys, and :func:`validate` checks
ranges and relations, all before any actor starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from actors.faults import MODES as FAULT_MODES
from actors.faults import ROLES as FAULT_ROLES
from learner.algorithms import algorithm_names, get_algorithm
from learner.placement import PLACEMENTS
from policy.families import AUTO, FAMILIES, FamilyMismatchError, check_family
from policy.settings import DTYPES, ModelSettings, SamplingSettings
from plugins import ImportPathError, load_plugins
from reward_service.reconstructors import RECONSTRUCTORS
from reward_service.rewards import ALIGNMENTS, REWARDS, signature_problem

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class ConfigError(ValueError):
    """A bad configuration, with a message that names the problem and the fix."""


@dataclass
class RunConfig:
    name: str = "carve3d"
    output_dir: str = "runs"
    dir: str | None = None  # a fixed run directory instead of <output_dir>/<name>-<timestamp> (experiments)
    seed: int = 0
    ray_address: str | None = None  # None: $RAY_ADDRESS if set, else an embedded local Ray
    local_num_cpus: float | None = None  # CPUs of the embedded local Ray (None: all)
    dashboard_host: str = "127.0.0.1"  # a Ray cluster belongs on a trusted network
    # Prometheus port of the embedded local Ray's metrics (None: Ray picks one); a cluster sets
    # its own with `ray start --metrics-export-port`
    metrics_export_port: int | None = None
    samples_to_save: int = 8  # samples (their views as one picture, and re-renderings) saved as PNG per epoch
    max_batch_attempts: int = 3  # a batch whose sampling or scoring failed this often stops the run
    max_auto_resumes: int = 0  # after a learner failure, resume from the last checkpoint this often
    # none | pack | spread | strict_pack | strict_spread: reserve one Ray placement group with a
    # bundle per actor before any model loads (learner/placement.py); none: Ray places each actor
    placement: str = "none"
    placement_timeout_s: float = 120.0  # a cluster that cannot place the group by then fails the run
    # Plug-in modules imported by every process before it resolves a registered name (reward.kind,
    # reward.reconstructor, reward.alignment, logging sinks); MiniCarve's registers lrm and minicarve
    plugins: list[str] = field(default_factory=lambda: ["minicarve.plugin"])
    # Also write the per-epoch metrics as TensorBoard event files (<run dir>/tensorboard/); needs the
    # tensorboard package. metrics.parquet is always written, the Ray metrics always recorded.
    tensorboard: bool = False


# The model section (path, family, finetune, lora, dtype, gradient_checkpointing) is the
# policy's own settings dataclass, so the policy takes it as it is (policy/settings.py).
ModelConfig = ModelSettings


@dataclass
class PromptsConfig:
    file: str = "data/minicarve/train_prompts.txt"  # one prompt per line
    limit: int | None = None  # use the first N prompts (None: all)


@dataclass
class RolloutConfig:
    num_workers: int = 1
    batch_size: int = 8  # samples per rollout call; also the unit sent to the reward pool
    # Ray's CPU accounting; fractions let all roles share a laptop. torch_threads is
    # what the actor really uses (rollout and reward run at once, training alone). One
    # rollout thread beside the reward's one fills a 2-core laptop; two oversubscribe it,
    # which costs little where the UNet dominates (v1) and halves the loop's speed where
    # the reward weighs as much as sampling (v2; docs/minicarve.md, "Throughput").
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    torch_threads: int = 1
    timeout_s: float = 600.0  # a batch running longer means a hung actor: restart it, re-issue
    max_restarts: int = 3  # process restarts per actor (Ray max_restarts)


@dataclass
class RewardConfig:
    kind: str = "mrc"  # mrc | brightness | package.module:function
    num_workers: int = 1
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    torch_threads: int = 1
    reconstructor: str = "lrm"  # lrm (MiniCarve's feed-forward model) | voxel (per-sample fit) | package.module:Class
    reconstructor_options: dict = field(default_factory=dict)
    # torchvision's AlexNet checkpoint (.pth) or a safetensors file of it; null: the torch hub
    # cache, else the ImageNet AlexNet shipped in reward_service/weights/ (never downloaded)
    lpips_backbone: str | None = None
    # LPIPS sees the box crops at the render resolution, or at this size when views are smaller
    # (LPIPS was calibrated on 64 px patches; MiniCarve's views are 32 px)
    lpips_min_size: int = 64
    # MRC's square foreground box (Carve3D).  false rewards whole-view LPIPS instead: only for
    # the reward-hacking ablation (configs/experiments/reward_hacking.yaml); MRC is still reported.
    box_normalize: bool = True
    # A 3x3 opening of the foreground mask before the box, ignoring isolated speckle on the white
    # background.  Not in the reference (false = the reference box); for worlds whose samples
    # carry speckle that would otherwise stretch every box to the whole view.
    foreground_opening: bool = False
    # Prompt alignment of every scored batch (reported, never rewarded): minicarve (the
    # shipped attribute classifier) | package.module:function | null
    alignment: str | None = "minicarve"
    timeout_s: float = 600.0
    max_restarts: int = 3

    def mrc_options(self, device: str = "cpu") -> dict:
        """The keyword arguments of ``reward_service.rewards.MRCReward`` for this section."""
        return {"reconstructor": self.reconstructor, "reconstructor_options": dict(self.reconstructor_options),
                "lpips_backbone": self.lpips_backbone, "lpips_min_size": self.lpips_min_size,
                "box_normalize": self.box_normalize, "foreground_opening": self.foreground_opening,
                "device": device}


@dataclass
class ZigalConfig:
    """MV-ZigAL / MVC-ZigAL (arXiv 2505.20107).  Every sample is a pair: a standard and a
    ZMV-Sampling trajectory (sampling.zmv_*) from the same noise; the loss is
    learner.losses.zigal_pair_loss with train.clip_range.  mvc-zigal maximises the per-view
    fidelity (reward.alignment's score) subject to the joint-view consistency (the run's
    reward, -MRC) staying >= a threshold, through a Lagrange multiplier (dual ascent)."""

    multiplier_init: float = 0.0
    multiplier_max: float = 5.0
    # Dual step sizes while the constraint is violated / satisfied (MVC-ZigAL: 0.1 / 0.01 for
    # HyperScore; -MRC moves by ~1e-3 per epoch on MiniCarve, hence larger defaults)
    multiplier_lr_violated: float = 100.0
    multiplier_lr_satisfied: float = 10.0
    threshold: float | None = None  # None: self-paced, an EMA of the batch mean (MVC-ZigAL's code)
    threshold_ema: float = 0.99


@dataclass
class NablaConfig:
    """Nabla-GFlowNet (arXiv 2412.07775) as Nabla-R2D3 (arXiv 2506.15684) releases it: forward
    residual gradient matching against beta * a_{t-1} * grad R(x0_hat(x_{t-1})).  The reward
    gradient comes from the reward actors (the run's reward, differentiated through the LRM,
    the renderer and LPIPS for mrc).  Their trust region |eps_theta - eps_old|^2 on the previous
    epoch's samples is zero here: updates are on-policy, so eps_old is eps_theta at the step."""

    reward_scale: float = 1.0e5  # beta: the target is p_ref(x) exp(beta R(x)); -MRC differences are ~1e-3


@dataclass
class TrainConfig:
    epochs: int = 5
    samples_per_epoch: int = 64
    # Samples per prompt in an epoch: 1 draws prompts uniformly (Carve3D); k > 1 samples
    # samples_per_epoch / k prompts k times each (per-prompt baselines from the first epoch).
    group_size: int = 8
    # a registered algorithm (learner/algorithms/): ddpo-sf (REINFORCE, pure on-policy) | ddpo-is
    # (PPO clip) | mv-zigal | mvc-zigal (train.zigal) | nabla-gfn (train.nabla) | grpo (train.group_size
    # >= 2); `algorithm=X` on the command line is short for train.algorithm=X
    algorithm: str = "ddpo-sf"
    num_minibatches: int = 1  # optimizer steps per epoch; ddpo-sf needs 1
    clip_range: float = 1e-4  # ddpo-is and the zigal losses
    # for the default rank-4 LoRA; chosen on validation prompts (docs/minicarve.md, "The default run")
    learning_rate: float = 1e-2
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    microbatch_size: int = 8  # samples per forward/backward during gradient accumulation
    timestep_fraction: float = 1.0  # share of each trajectory's steps trained on
    # Steps whose DDIM noise std is below this fraction of the noisiest step's are neither trained
    # nor counted in the KL: their score terms scale like 1/std and carry noise without signal
    # (docs/minicarve.md).  0: every step.
    min_relative_step_sigma: float = 0.5
    reward_weight: float = 1.0  # alpha in A = alpha * z(reward) - beta * z(KL)
    kl_weight: float = 0.2  # beta
    advantage_clip: float = 5.0
    tracker_buffer_size: int = 75
    tracker_min_count: int = 4
    kl_early_stop: float | None = None  # stop when the epoch's mean KL reaches this
    warmup_epoch: bool = False  # Carve3D's epoch 0: each prompt tracker_min_count times, no update
    checkpoint_every: int = 1
    keep_checkpoints: int = 3  # the newest N are kept
    max_nonfinite_steps: int = 3  # this many optimizer steps in a row with a non-finite gradient stop the run
    timeout_s: float = 1800.0  # any learner call (update, checkpoint); longer means a hung learner
    # Data-parallel learner ranks (torch.distributed: gloo on CPU, NCCL on GPU).  Each rank
    # takes num_cpus/num_gpus/torch_threads below; 1 is a single learner, no torch.distributed.
    num_workers: int = 1
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    torch_threads: int = 2
    # How new weights reach the rollout actors: object_store (one ray.put per version, each actor
    # fetches) | broadcast (a collective from learner rank 0 into the actors' parameters, NCCL on
    # GPU, gloo on CPU, in buckets of weight_sync_bucket_mb; actors/weight_sync.py)
    weight_sync: str = "object_store"
    weight_sync_bucket_mb: int = 256
    zigal: ZigalConfig = field(default_factory=ZigalConfig)
    nabla: NablaConfig = field(default_factory=NablaConfig)


@dataclass
class EvalConfig:
    """Held-out evaluation at the start and the end of a run: the first ``num_prompts``
    prompts of ``prompts_file``, ``samples_per_prompt`` seeds each (the same seeds in
    every run), scored by the reward actors (MRC, alignment)."""

    prompts_file: str | None = "data/minicarve/test_prompts.txt"  # null: no evaluation
    # 64 x 4: with v2's fast UNet such an evaluation takes ~35 s, and 256 paired samples resolve
    # the default run's MRC change (docs/minicarve.md, "The default run")
    num_prompts: int = 64
    samples_per_prompt: int = 4
    seed: int = 1234
    at_start: bool = True
    at_end: bool = True
    every: int | None = None  # also after every N-th epoch (curves of test MRC and alignment)


@dataclass
class FaultsConfig:
    """Deliberate faults, for tests of the failure paths (actors/faults.py)."""

    nonfinite_reward_fraction: float = 0.0  # this share of each reward batch becomes NaN
    role: str | None = None  # rollout | reward | learner: which role fails (None: no fault)
    mode: str = "raise"  # raise | exit (the actor's process dies) | hang
    epoch: int = 0  # the epoch in which it fails
    batch: int = 0  # the batch index within the epoch (rollout and reward); the learner's rank (learner)
    hang_seconds: float = 3600.0


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    # resume=RUN_DIR: continue that run from its last good checkpoint, with its config
    # (later overrides still apply, e.g. train.epochs=20 to extend it).
    resume: str | None = None


def valid_keys(schema=Config, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(schema):
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default):
            keys += valid_keys(type(default), prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def load_config(argv: list[str] | None = None) -> Config:
    """Defaults <- ``--config FILE`` <- ``key=value`` overrides; returns a validated Config."""
    argv = list(argv or [])
    files, overrides = [], []
    while argv:
        arg = argv.pop(0)
        if arg in ("--config", "-c"):
            if not argv:
                raise ConfigError("--config needs a YAML file path")
            files.append(argv.pop(0))
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
        elif arg.startswith("algorithm="):  # the algorithm is what users change most
            overrides.append("train." + arg)
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        else:
            raise ConfigError(f"cannot parse argument {arg!r}: use --config FILE and key=value "
                              f"overrides, e.g. train.epochs=3 rollout.num_workers=2")
    resume = [o.split("=", 1)[1] for o in overrides if o.startswith("resume=")]
    if resume and resume[-1] not in ("", "null"):
        run_config = Path(resume[-1]) / "config.yaml"
        if not run_config.is_file():
            raise ConfigError(f"resume={resume[-1]}: no config.yaml there; resume takes a run directory "
                              "written by an earlier run (runs/<name>-<timestamp>)")
        files.insert(0, str(run_config))
    merged = OmegaConf.structured(Config)
    try:
        for path in files:
            merged = OmegaConf.merge(merged, load_yaml_file(path))
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(overrides))
    except (ConfigKeyError, ValidationError, OmegaConfBaseException) as err:
        raise ConfigError(_explain(err)) from None
    config: Config = OmegaConf.to_object(merged)
    validate(config)
    return config


def read_text_file(path: str | Path, what: str) -> str:
    """A UTF-8 text file, or a ConfigError naming it and the line of the first bad byte."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); "
                          "save it as UTF-8") from None


def load_yaml_file(path: str) -> DictConfig:
    """A ``--config`` file: a YAML mapping of sections (train:, rollout:, ...) without repeated keys."""
    if not Path(path).is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        loaded = OmegaConf.create(read_text_file(path, "config file"))
    except yaml.YAMLError as err:  # syntax, or a key given twice ("found duplicate key")
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {path!r} is not valid YAML{where}: {problem}; fix it there "
                          "(configs/default.yaml shows the layout)") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path!r} holds a {type(loaded).__name__.removesuffix('Config').lower()}, "
                          "not a mapping of sections (train:, rollout:, ...); see configs/default.yaml")
    return loaded


def _explain(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0]
    section = key.rsplit(".", 1)[0] + "." if "." in key else ""
    near = [k for k in valid_keys() if k.startswith(section)] or valid_keys()
    listing = f"Valid keys{' in ' + section[:-1] if section else ''}: " + ", ".join(near)
    if isinstance(err, ConfigKeyError) or "not in struct" in msg:
        return f"unknown config key {key!r}. {listing}"
    return f"wrong type for {key!r}: {msg}. {listing}"


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def resolve_path(path: str) -> Path:
    """A relative path is looked up in the working directory, then in the project."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    return PROJECT_ROOT / candidate


def load_prompts(config: PromptsConfig) -> list[str]:
    path = resolve_path(config.file)
    if not path.is_file():
        raise ConfigError(f"prompt file {config.file!r} not found (looked in {Path.cwd()} and "
                          f"{PROJECT_ROOT}); set prompts.file to a text file with one prompt a line")
    prompts = [line.strip() for line in read_text_file(path, "prompt file").splitlines() if line.strip()]
    if config.limit is not None:
        prompts = prompts[: config.limit]
    if not prompts:
        raise ConfigError(f"prompt file {str(path)!r} holds no prompts (after prompts.limit="
                          f"{config.limit}); put one prompt per line")
    return prompts


def non_finite_numbers(section, prefix: str = "") -> list[str]:
    """Every float in the config (lists of floats too) that is NaN or infinite.  They are
    checked first and alone: NaN fails every comparison and inf passes every lower bound, so
    the range checks would pass them or name the wrong problem ("must be > 0" for inf)."""
    problems = []
    for f in fields(section):
        value, key = getattr(section, f.name), prefix + f.name
        if is_dataclass(value):
            problems += non_finite_numbers(value, key + ".")
        elif any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            problems.append(f"{key} must be a finite number (got {value})")
    return problems


def plugin_problems(r: RewardConfig, plugins: list[str] = ()) -> list[str]:
    """run.plugins import; reward.kind, reward.alignment and reward.reconstructor (MRC only) name a
    registered name or an import path that imports here, not only later in an actor (as 'all
    reward actors are dead')."""
    try:
        load_plugins(plugins)
    except ImportPathError as err:
        return [str(err)]
    problems = []
    for registry, name in ((REWARDS, r.kind), (ALIGNMENTS, r.alignment),
                           (RECONSTRUCTORS, r.reconstructor if r.kind == "mrc" else None)):
        problem = registry.problem(name) if name is not None else None
        if problem:
            problems.append(problem)
    check_options = RECONSTRUCTORS.hook(r.reconstructor, "check_options") if r.kind == "mrc" else None
    if check_options is not None and not problems:  # e.g. lgm: its weights file exists here
        problems += check_options(dict(r.reconstructor_options))
    for registry, name, role in ((REWARDS, r.kind, "reward"), (ALIGNMENTS, r.alignment, "alignment")):
        # an import path names the function itself: it must take (views, cameras, prompts)
        if name is not None and name not in registry and registry.problem(name) is None:
            problems += [p for p in [signature_problem(registry.get(name), role)] if p]
    return problems


def sink_problems(run: RunConfig) -> list[str]:
    """run.tensorboard needs TensorBoard's event-file writer."""
    import importlib.util

    if run.tensorboard and importlib.util.find_spec("tensorboard") is None:
        return ["run.tensorboard=true writes TensorBoard event files, which needs the tensorboard package: "
                "pip install tensorboard (or set run.tensorboard=false)"]
    return []


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def validate(c: Config) -> None:
    """Ranges and relations, checked before any resources are spent."""
    _raise_if(non_finite_numbers(c))
    problems = plugin_problems(c.reward, c.run.plugins) + sink_problems(c.run)

    def need(ok: bool, message: str):
        if not ok:
            problems.append(message)

    need(c.sampling.eta > 0, f"sampling.eta must be > 0 (got {c.sampling.eta}): eta = 0 has no log-prob")
    need(c.sampling.num_steps >= 1, "sampling.num_steps must be >= 1")
    need(c.sampling.guidance_scale >= 1, f"sampling.guidance_scale must be >= 1 (got {c.sampling.guidance_scale})")
    need(c.sampling.negative_prompt in ("zero", "empty"), "sampling.negative_prompt must be 'zero' or 'empty'")
    need(c.model.finetune in ("lora", "full"), f"model.finetune must be 'lora' or 'full' (got {c.model.finetune!r})")
    need(c.model.lora.rank >= 1, "model.lora.rank must be >= 1")
    need(c.model.family in (AUTO, *FAMILIES),
         f"model.family must be {AUTO} or one of {', '.join(FAMILIES)} (got {c.model.family!r})")
    need(c.model.dtype in DTYPES, f"model.dtype must be one of {', '.join(DTYPES)} (got {c.model.dtype!r})")
    need(c.model.dtype != "fp16" or (c.rollout.num_gpus > 0 and c.train.num_gpus > 0),
         "model.dtype=fp16 needs GPUs for the rollout and learner roles (rollout.num_gpus, train.num_gpus > 0); "
         "on CPU use model.dtype=bf16 or fp32")
    need(c.eval.every is None or c.eval.every >= 1, "eval.every must be >= 1 (or null: start and end only)")
    need(c.eval.num_prompts >= 1 and c.eval.samples_per_prompt >= 1,
         "eval.num_prompts and eval.samples_per_prompt must be >= 1 (set eval.prompts_file=null for no evaluation)")
    need(c.rollout.num_workers >= 1 and c.reward.num_workers >= 1, "rollout/reward num_workers must be >= 1")
    need(c.rollout.batch_size >= 1, "rollout.batch_size must be >= 1")
    need(c.train.samples_per_epoch % c.rollout.batch_size == 0,
         f"train.samples_per_epoch ({c.train.samples_per_epoch}) must be a multiple of "
         f"rollout.batch_size ({c.rollout.batch_size})")
    need(c.train.num_workers >= 1, f"train.num_workers must be >= 1 (got {c.train.num_workers})")
    shard = c.rollout.batch_size * c.train.num_workers
    need(c.train.num_workers <= 1 or c.train.samples_per_epoch % shard == 0,
         f"train.samples_per_epoch ({c.train.samples_per_epoch}) must be a multiple of rollout.batch_size x "
         f"train.num_workers ({c.rollout.batch_size} x {c.train.num_workers} = {shard}), so that every learner "
         f"worker gets the same number of rollout batches; set train.samples_per_epoch to a multiple of {shard} "
         f"(e.g. {max(shard, c.train.samples_per_epoch // max(shard, 1) * shard)}), or change rollout.batch_size "
         "or train.num_workers")
    need(c.train.epochs >= 1, "train.epochs must be >= 1")
    names = algorithm_names()
    need(c.train.algorithm in names,
         f"train.algorithm (or algorithm=) must be one of {', '.join(names)} (got {c.train.algorithm!r})")
    need(c.sampling.sampler in ("standard", "zmv"), f"sampling.sampler must be 'standard' or 'zmv' (got {c.sampling.sampler!r})")
    need(c.sampling.zmv_steps >= 1, "sampling.zmv_steps must be >= 1")
    if c.train.algorithm in names:  # its own rules (learner/algorithms/<name>.py)
        problems += get_algorithm(c.train.algorithm).config_problems(c)
    need(c.reward.lpips_min_size >= 32,
         f"reward.lpips_min_size must be >= 32 (got {c.reward.lpips_min_size}): AlexNet needs at least 31 px")
    need(c.train.group_size >= 1 and c.train.samples_per_epoch % c.train.group_size == 0,
         f"train.group_size ({c.train.group_size}) must be >= 1 and divide train.samples_per_epoch "
         f"({c.train.samples_per_epoch})")
    need(c.train.num_minibatches >= 1 and c.train.samples_per_epoch % c.train.num_minibatches == 0,
         "train.samples_per_epoch must be a multiple of train.num_minibatches")
    need(0 < c.train.timestep_fraction <= 1, "train.timestep_fraction must be in (0, 1]")
    need(0 <= c.train.min_relative_step_sigma <= 1, "train.min_relative_step_sigma must be in [0, 1] (0: train every step)")
    need(c.train.learning_rate > 0, "train.learning_rate must be > 0")
    need(len(c.train.adam_betas) == 2 and all(0 <= b < 1 for b in c.train.adam_betas), "train.adam_betas must be two numbers in [0, 1)")
    need(c.train.max_grad_norm > 0, "train.max_grad_norm must be > 0")
    need(c.train.microbatch_size >= 1, "train.microbatch_size must be >= 1")
    need(c.train.advantage_clip > 0, "train.advantage_clip must be > 0")
    need(c.train.tracker_min_count >= 1 and c.train.tracker_buffer_size >= c.train.tracker_min_count,
         "train.tracker_buffer_size must be >= train.tracker_min_count >= 1")
    need(0 <= c.faults.nonfinite_reward_fraction <= 1, "faults.nonfinite_reward_fraction must be in [0, 1]")
    need(c.faults.role is None or c.faults.role in FAULT_ROLES,
         f"faults.role must be one of {', '.join(FAULT_ROLES)} or null")
    need(c.faults.mode in FAULT_MODES, f"faults.mode must be one of {', '.join(FAULT_MODES)}")
    need(min(c.rollout.timeout_s, c.reward.timeout_s, c.train.timeout_s) > 0, "timeouts must be > 0 seconds")
    need(min(c.rollout.max_restarts, c.reward.max_restarts, c.run.max_auto_resumes) >= 0,
         "max_restarts and run.max_auto_resumes must be >= 0")
    need(c.run.max_batch_attempts >= 1, "run.max_batch_attempts must be >= 1")
    need(c.train.weight_sync in ("object_store", "broadcast"),
         f"train.weight_sync must be object_store or broadcast (got {c.train.weight_sync!r})")
    need(c.train.weight_sync_bucket_mb >= 1, "train.weight_sync_bucket_mb must be >= 1")
    need(c.train.weight_sync != "broadcast" or (c.rollout.num_gpus > 0) == (c.train.num_gpus > 0),
         "train.weight_sync=broadcast needs the learner and the rollout actors on the same kind of device "
         "(both with GPUs: NCCL, or both on CPU: gloo); set rollout.num_gpus and train.num_gpus alike, or use "
         "train.weight_sync=object_store")
    need(c.run.placement in PLACEMENTS, f"run.placement must be one of {', '.join(PLACEMENTS)} (got {c.run.placement!r})")
    need(c.run.placement_timeout_s > 0, "run.placement_timeout_s must be > 0")
    need(c.run.metrics_export_port is None or 0 < c.run.metrics_export_port < 65536,
         f"run.metrics_export_port must be a TCP port (1-65535) or null (got {c.run.metrics_export_port})")
    need(c.train.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1")
    if not c.model.path.startswith("builtin:"):
        model_dir = resolve_path(c.model.path)  # as policy.models.resolve_model_path looks it up
        need(model_dir.is_dir(),
             f"model.path {c.model.path!r} is not a directory (looked in {Path.cwd()} and {PROJECT_ROOT}); "
             "point it at a local diffusers-format model directory, or use builtin:tiny")
        if model_dir.is_dir() and c.model.family in (AUTO, *FAMILIES):
            try:
                check_family(model_dir, c.model.family)  # reads the layout only
            except FamilyMismatchError as err:
                problems.append(str(err))
    _raise_if(problems)
