"""The run configuration's schema: one dataclass per config section (``Config`` holds them all).

A config file is a YAML mapping whose sections mirror these dataclasses; ``weaktr.config.loading`` reads it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from weaktr.crf import CRFParams
from weaktr.models.inference import CAM_FORWARD_BATCH


class ConfigError(ValueError):
    """A config file or override that cannot be turned into a :class:`Config`."""


@dataclass
class SyntheticConfig:
    """The built-in dataset, generated into ``data.root`` when its manifest is missing."""

    enabled: bool = True
    num_classes: int = 6
    num_train: int = 1200
    num_val: int = 200
    min_size: int = 96
    max_size: int = 160
    max_objects: int = 3
    min_visible_fraction: float = 0.06  # smaller (mostly hidden) objects are dropped, label and all
    seed: int = 0
    # > 0: the training split also carries noisy pseudo-labels made from its masks (phase-2 data without a phase-1
    # model): each object dilated by pseudo_dilate_px with probability pseudo_dilate, relabelled with pseudo_flip.
    pseudo_flip: float = 0.0
    pseudo_dilate: float = 0.0
    pseudo_dilate_px: int = 6

    def spec(self, **changes: Any):
        """The generator's ``weaktr.data.synthetic.SyntheticSpec`` for these settings (``changes`` on top): the
        one place the section maps onto it."""
        from weaktr.data.synthetic import SyntheticSpec  # weaktr.data needs webdataset; the config does not

        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "enabled"}
        return SyntheticSpec(**{**settings, **changes})


@dataclass
class DataConfig:
    root: str = "data/synthetic"  # directory holding manifest.json and the shards
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    train_split: str = "train"
    val_split: str = "val"
    loader_workers: int = 1  # DataLoader processes per Ray Train worker
    shuffle_buffer: int = 256
    max_failure_fraction: float = 0.01  # stop when more samples than this fail to decode


@dataclass
class BackboneConfig:
    """The timm ViT both phases build on (``models.vit.create_backbone``); ``model`` and ``seg_model`` extend it."""

    backbone: str = "deit_small_patch16_224"
    pretrained: bool = False  # timm's pretrained weights (downloads)
    weights_path: Optional[str] = None  # or a local weights file
    img_size: int = 224
    embed_dim: Optional[int] = None  # None: the backbone's own width/depth/heads
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    drop_path_rate: float = 0.1
    fused_attn: bool = True  # F.scaled_dot_product_attention; False: explicit softmax attention
    # The inputs' mean/std: "backbone", what its pretrained weights expect (timm's pretrained config: ImageNet's for
    # DeiT, 0.5 for the ImageNet-21k augreg ViTs), or "imagenet" (a model trained from scratch may use either).
    normalization: Literal["backbone", "imagenet"] = "backbone"


@dataclass
class ModelConfig(BackboneConfig):
    """Phase 1: the multi-class-token ViT with adaptive attention fusion."""

    reduction: int = 8
    feat_reduction: int = 8
    pool: str = "max"


@dataclass
class RunnerConfig:
    """How a training phase runs on Ray Train (workers, resources, failures, checkpoints) and the settings both
    phases' optimizers share; ``train`` and ``seg_train`` extend it."""

    epochs: int = 60
    batch_size: int = 64  # global: split evenly over num_workers (the official batch x world_size)
    opt: str = "adamw"
    lr: float = 6e-4
    min_lr: float = 1e-5
    weight_decay: float = 0.03
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    gpus_per_worker: float = 1.0  # with use_gpu; a fraction packs several workers (or Tune trials) on one GPU
    # Custom Ray resources each worker also needs, to place the workers on a node type (cluster.yaml gives each
    # type its own, e.g. {gpu_node: 0.01}); {}: any node with the CPUs/GPUs.
    resources_per_worker: dict = field(default_factory=dict)
    amp: bool = True  # bf16 autocast, GPU only
    compile: bool = False  # torch.compile the model (pays off on GPU once its compile time is amortized)
    fused_optimizer: bool = True  # fused optimizer kernels (torch's fused=True), GPU only; same updates up to rounding
    max_failures: int = 1  # worker-failure restarts from the last checkpoint
    # How long a run waits for its workers' resources (at its start, or after losing a node) before it fails naming
    # them; Ray Train's own default is to wait for ever for capacity that may never come.
    capacity_wait_s: float = 600.0
    checkpoints_to_keep: int = 2
    resume_from: Optional[str] = None  # a checkpoint directory


@dataclass
class CamEvalConfig:
    """Phase 1's per-epoch CAM mIoU (the official main.py: CAMs of VOC `train` / COCO `train_1250` after every
    epoch, background threshold searched, `checkpoint_best_mIoU.pth` kept). The best checkpoint is chosen by it."""

    split: Optional[str] = "train"  # a split with ground-truth masks; None: off (checkpoints chosen by val_mAP)
    samples: int = 200  # the split's first N samples (0: all of them); those without a mask are skipped
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = True
    sweep: str = "0.40:0.60:0.01"  # background thresholds searched in the same pass (official: 40..60 %)
    batch_size: int = 16  # images per CAM forward batch


@dataclass
class TrainConfig(RunnerConfig):
    """Phase 1 training (a Ray Train TorchTrainer)."""

    # None: `lr` is the learning rate. A number n: `lr` is given for a global batch of n and scaled linearly to
    # batch_size (the official main.py: lr x batch x world_size / 512), see TrainConfig.scaled_lr.
    lr_base_batch: Optional[int] = None
    # True: weight decay on every parameter, as the official main.py (it hands timm model.parameters(), so nothing is
    # exempted); False: timm's usual exemptions (biases, norms, tokens, position embeddings).
    decay_all: bool = True
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6
    img_size: int = 224  # training crop
    scale_min: float = 0.35  # RandomResizedCrop scale lower bound
    color_jitter: float = 0.3
    auto_augment: Optional[str] = None  # e.g. "rand-m9-mstd0.5-inc1" (DeiT)
    re_prob: float = 0.0  # random erasing
    cam_eval: CamEvalConfig = field(default_factory=CamEvalConfig)

    @property
    def worker_batch_size(self) -> int:
        return per_worker_batch(self.batch_size, self.num_workers, "train")

    @property
    def scaled_lr(self) -> float:
        """The learning rate the optimizer gets (see ``lr_base_batch``): the same for any number of workers."""
        if self.lr_base_batch is None:
            return self.lr
        return self.lr * self.batch_size / self.lr_base_batch


def per_worker_batch(batch_size: int, num_workers: int, section: str) -> int:
    """Each worker's share of the global ``{section}.batch_size`` (ConfigError unless it splits evenly)."""
    if num_workers < 1 or batch_size < num_workers or batch_size % num_workers:
        raise ConfigError(
            f"config key '{section}.batch_size': the global batch {batch_size} does not split evenly over "
            f"{section}.num_workers={num_workers}"
        )
    return batch_size // num_workers


@dataclass
class PseudoConfig:
    """CAMs -> pseudo-labels (a Ray Data pipeline)."""

    checkpoint: Optional[str] = None  # phase-1 checkpoint directory (or --checkpoint)
    split: str = "train"
    out_dir: str = "outputs/pseudo"  # a new dataset: manifest + shards with pseudo-labels, PNGs, report
    scales: list[float] = field(default_factory=lambda: [1.0, 1.2])
    flip: bool = True
    # The background score t of the CAM labels; null: the t that phase 1's CAM-mIoU sweep (train.cam_eval) chose
    # for the checkpoint (the official way: sweep t on train, then use it).
    bg_threshold: Optional[float] = 0.43
    # The CAM read off the phase-1 model (the official --attention-type / --[no-]patch-attn-refine): "fused"
    # CA * relu(M), "patchcam" relu(M), "cross" CA, each refined by the patch attention PA when patch_attn_refine.
    # ("fused", true) is the paper's fine CAM G. Phase 1's CAM mIoU (checkpoint choice) scores the same readout.
    attention_type: Literal["fused", "patchcam", "cross"] = "fused"  # ops.ATTENTION_TYPES
    patch_attn_refine: bool = True
    crf: CRFParams = field(default_factory=CRFParams)  # dense CRF kernels (SPEC: VOC; COCO in coco14.yaml)
    batch_size: int = 16  # images per CAM-inference batch
    # Images (flips included) per ViT forward of the CAM pass: every block's attention maps are kept for the fusion
    # (at 320x480, scale 1.2, DeiT-S: ~225 MB per image in float32), so peak memory grows with it. A GPU with
    # memory to spare may go faster with more.
    forward_batch: int = CAM_FORWARD_BATCH
    cam_actors: int = 1
    cam_gpus_per_actor: float = 0.0  # a fraction shares a GPU between actors; 0 runs on CPU
    cam_cpus_per_actor: float = 1.0
    crf_actors: int = 1
    # Run the CRF inside the CAM actors, on their device (a GPU), instead of in a CPU actor pool (crf_actors is then
    # unused). Needs crf.backend torch (or auto without pydensecrf): pydensecrf runs on one CPU core only.
    crf_in_cam_actors: bool = False
    # Custom Ray resources each CAM / CRF actor also needs, to place the pools on node types: CAM inference on GPU
    # nodes and the CPU-bound CRF on cheap CPU-only ones (cluster.yaml's cpu_worker offers {cpu_node: 1000}).
    cam_resources: dict = field(default_factory=dict)
    crf_resources: dict = field(default_factory=dict)
    save_cams: bool = False  # also write the raw CAM arrays (.npy)
    overlay_samples: int = 16  # CAM overlay images for the first N samples
    sweep_bg: Optional[str] = None  # "START:STOP:STEP", e.g. "0.30:0.60:0.01"
    overwrite: bool = False


@dataclass
class SegModelConfig(BackboneConfig):
    """Phase 2: ViT encoder + mask-transformer decoder."""

    img_size: int = 480
    # None: the backbone's. 16 on DINOv2 / EVA-02 (14-px patches) resamples their patch embedding, as the official
    # phase 2 does (configs/backbones/).
    patch_size: Optional[int] = None
    d_model: Optional[int] = None  # decoder width; None: the encoder's
    decoder_depth: int = 2
    decoder_heads: Optional[int] = None  # None: d_model // 64, as Segmenter
    dropout: float = 0.1
    encoder_norm_eps: Optional[float] = None  # None: the backbone's (timm DeiT 1e-6); the official Segmenter 1e-5


@dataclass
class SegTrainConfig(RunnerConfig):
    """Phase 2 training on pseudo-labels with the gradient-clipping loss."""

    data_root: Optional[str] = None  # the pseudo-label dataset; None: pseudo.out_dir
    # Start the encoder from the phase-1 checkpoint that made the pseudo-labels (named in their manifest): where
    # no pretrained weights exist (the synthetic benchmark), the one encoder trained on the data; excludes
    # seg_model.pretrained / weights_path.
    init_encoder_from_phase1: bool = False
    epochs: int = 100
    batch_size: int = 4  # global: split evenly over num_workers (the official world batch size)
    opt: str = "sgd"  # or "adamw"
    lr: float = 1e-4  # the decoder's; poly decay to min_lr (official segm/train.py)
    encoder_lr_scale: float = 0.1  # the encoder trains at this x the decoder's lr (official --enc-lr 0.1)
    momentum: float = 0.9
    weight_decay: float = 0.0
    poly_power: float = 0.9
    base_size: int = 520  # images are resized so the short side is base_size × a random scale
    crop_size: int = 480
    scale_min: float = 0.5
    scale_max: float = 2.0
    cat_max_ratio: float = 0.75  # crops redrawn (up to 10x) while one class fills this share (mmseg RandomCrop)
    photometric: bool = True  # mmseg's PhotoMetricDistortion
    clip: bool = True  # the gradient-clipping loss; False trains on plain cross-entropy
    clip_start_value: float = 1.2
    clip_patch_size: int = 120
    # Ignored (255) pixels count as loss 0 in the clipping statistics and the loss mean, as in the official
    # decoder.GradientClipping + engine.py; False: statistics and mean over labelled pixels only.
    count_ignored_pixels: bool = True
    eval_every: int = 1  # epochs between validation mIoU runs

    @property
    def worker_batch_size(self) -> int:
        return per_worker_batch(self.batch_size, self.num_workers, "seg_train")


@dataclass
class EvalConfig:
    """Sliding-window, multi-scale + flip evaluation of a phase-2 model."""

    checkpoint: Optional[str] = None
    split: str = "val"
    window: int = 480
    stride: int = 320
    short_side: Optional[int] = None  # each image resized to this short side x scale (official 520); None: as is
    upsample_small: bool = True  # images smaller than the window upsampled to it (official), else zero-padded
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = True
    ensemble_weight: Optional[float] = None  # w x (masks before the decoder's last block) + final (official 0.8)
    crf: bool = False  # dense CRF over the predicted classes' probabilities (official segm/eval/make_crf.py)
    crf_params: CRFParams = field(default_factory=lambda: CRFParams(gaussian_sxy=3.0))  # official phase-2 VOC
    actors: int = 2
    gpus_per_actor: float = 0.0
    actor_resources: dict = field(default_factory=dict)  # custom Ray resources per actor (see pseudo.cam_resources)
    out_dir: Optional[str] = None  # where to write the report; None: beside the checkpoint


@dataclass
class SweepConfig:
    """A Ray Tune sweep (``ray_jobs/tune_sweep.py``, ``weaktr.sweep``): each trial is one full phase-1 (``cam``) or
    phase-2 (``seg``) training run of this config with the ``space`` values set. A trial's workers and resources
    are the phase's runner section (``train`` / ``seg_train``: num_workers, cpus_per_worker, use_gpu,
    gpus_per_worker)."""

    phase: str = "cam"  # "cam": objective cam_mIoU (val_mAP when train.cam_eval.split is null); "seg": val_mIoU
    # Dotted config key -> one distribution: {choice: [a, b]}, {grid: [a, b]}, {uniform: [lo, hi]},
    # {loguniform: [lo, hi]}, {randint: [lo, hi]} (hi excluded), {quniform: [lo, hi, q]}.
    space: dict = field(default_factory=dict)
    num_samples: int = 4  # trials drawn (with a grid: repeats of the whole grid)
    max_concurrent_trials: int = 2  # Tune cannot see the trials' Ray Train workers: this bounds how many run at once
    time_budget_s: Optional[float] = None  # wall-clock budget of the whole sweep; None: none
    scheduler: str = "asha"  # "asha": early stopping; "fifo": every trial runs all its epochs
    grace_period: int = 1  # ASHA: epochs every trial runs before it can be stopped
    reduction_factor: int = 2  # ASHA: about 1/reduction_factor of the trials reaching a rung go on


TRACKING_BACKENDS = ("mlflow", "tensorboard")


@dataclass
class TrackingConfig:
    """Experiment tracking (weaktr.tracking): each phase's config and per-epoch metrics, the pseudo-label and
    evaluation results, to MLflow and/or TensorBoard, as the official code logs to MLflow."""

    backend: Union[str, list[str]] = "none"  # none | mlflow | tensorboard, or a list: [mlflow, tensorboard]
    # MLflow: a tracking URI (sqlite:////abs/path/mlflow.db, http://host:5000) or a folder (its mlflow.db);
    # TensorBoard: a log folder. null: in run.storage_path (mlflow.db, tensorboard/), which must then be local.
    # With both backends, null only.
    uri: Optional[str] = None

    def __post_init__(self):
        unknown = [name for name in self.backends if name not in TRACKING_BACKENDS]
        if unknown or (isinstance(self.backend, list) and "none" in self.backend):
            raise ValueError(f"backend must be none, mlflow, tensorboard or a list of the last two, got "
                             f"{self.backend!r}")
        if len(self.backends) > 1 and self.uri is not None:
            raise ValueError("uri names one store; with several backends leave it null (both under run.storage_path)")

    @property
    def backends(self) -> list[str]:
        if isinstance(self.backend, str):
            return [] if self.backend == "none" else [self.backend]
        return list(dict.fromkeys(self.backend))


@dataclass
class PretrainConfig:
    """``weaktr pretrain`` (weaktr.pretrain): ``model``'s backbone pretrained on formula-drawn images, the stand-in
    for ImageNet weights where none can be had (the built-in benchmark); ``model.weights_path`` and
    ``seg_model.weights_path`` then load ``{out}/backbone.pth``."""

    out: str = "pretrained/formula"
    num_classes: int = 32  # formula texture classes (none of them the benchmark's)
    num_images: int = 4000
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1.0e-3
    weight_decay: float = 0.05
    # "dense": each patch token also predicts its patch's class shares (background included); "image": the class
    # token's multi-label loss only, as ImageNet classification is.
    objective: Literal["dense", "image"] = "dense"
    mimetic_init: bool = False  # Trockman & Kolter 2023: W_q W_k^T ~ I before pretraining
    seed: int = 24

    def __post_init__(self):
        if self.num_classes < 2 or self.num_images < self.batch_size or self.epochs < 0 or self.batch_size < 1 \
                or self.lr <= 0:
            raise ValueError(f"invalid pretrain settings: {self}")


@dataclass
class RunConfig:
    name: str = "weaktr"
    storage_path: str = "runs"  # Ray Train storage (local dir or cloud URI)
    seed: int = 0
    # True: local paths (data.root, run.storage_path, ...) are on a file system mounted at the same place on every
    # node (NFS, EFS, Lustre). False: on a cluster of several nodes a local path is refused (launch.connect), since
    # each node would read and write its own disk; use a bucket URI.
    shared_filesystem: bool = False


# Every config key that names a file or directory (a local path or a URI). Made absolute on the driver
# (launch.resolve_paths): workers, actors and Tune trials run in other directories.
PATH_KEYS = (
    "data.root", "run.storage_path", "tracking.uri", "model.weights_path", "train.resume_from", "pseudo.checkpoint",
    "pseudo.out_dir",
    "seg_model.weights_path", "seg_train.data_root", "seg_train.resume_from", "eval.checkpoint", "eval.out_dir",
    "pretrain.out",
)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    seg_model: SegModelConfig = field(default_factory=SegModelConfig)
    seg_train: SegTrainConfig = field(default_factory=SegTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: SweepConfig = field(default_factory=SweepConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
