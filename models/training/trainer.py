"""The training loop for MOST-NET++ / MOST-NSS++ and R2-D4 on streams of clips.

Clips are run in streaming form exactly as at inference (reset on the first frame, state carried),
so the network learns the recurrence it is served with. Defaults suit 2 CPU cores: small crops,
batch 4, bf16 autocast with channels_last where the CPU has it. Everything needed to resume
(weights, optimiser, balancer, gates, step, RNG) is saved every ``checkpoint_every`` steps;
metrics go to a JSONL log and a progress bar.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from models.checkpoints import checkpoint_config, read_checkpoint, read_metadata, save_checkpoint
from models.hardware import cpu_has_bf16, cpu_model
from models.most import MostNet, Structure
from models.r2d4 import R2D4
from models.registry import create_model
from models.training.balancing import Balancer, create_balancer
from models.training.losses import MostTargets, VGGPerceptual, most_task_losses, r2d4_loss, r2d4_total
from models.training.nss import ScaleGates, gated_task_errors


@dataclass
class ClipBatch:
    """A batch of clips, every tensor (batch, time, ...), frames RGB in [0, 1]."""

    input: Tensor  # (b, t, 3, h, w)
    target: Tensor  # (b, t, 3, h, w) sharp, vivid
    target_blurry: Tensor  # (b, t, 3, h, w) blurry, noise-free (R2-D4's first stage)
    mask: Tensor  # (b, t, 1, h, w) 0/1
    homography: Tensor  # (b, t, 3, 3) H_{t-1->t}, identity at t = 0

    def to(self, device: str) -> ClipBatch:
        return ClipBatch(
            *(getattr(self, f).to(device) for f in ("input", "target", "target_blurry", "mask", "homography"))
        )


@dataclass
class TrainConfig:
    model: str = "most-nss"
    out: Path = Path("runs/most-nss")
    steps: int = 2000
    batch: int = 4
    clip_length: int = 3
    height: int = 128
    width: int = 160
    lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup: int = 100
    balancing: str = "atb"
    emphasis: dict[str, float] = field(default_factory=dict)  # task -> factor on its balanced weight
    seed: int = 0
    device: str = "cpu"
    amp: str = "auto"  # auto | bf16 | fp16 | off
    checkpoint_every: int = 100
    log_every: int = 10
    grad_clip: float = 1.0
    structure: Structure | None = None  # MOST only; None = the registered model's own
    # Neural Scale Search phase: gates over inner-scale differences (needs every head: MOST-NET++).
    search: bool = False
    gate_lr: float = 1e-2
    gate_tau: float = 5.0
    sparsity_weight: float = 1e-3
    perceptual_weights: Path | None = None  # R2-D4: VGG-19 .safetensors; the term is off without it
    init_from: Path | None = None  # start from these weights (safetensors), fresh optimiser
    # Parameter-name prefixes to train (e.g. "restoration_heads.1"); () trains everything. The rest is
    # frozen and held in eval mode, so its batch norms neither move nor switch to batch statistics.
    train_only: tuple[str, ...] = ()
    # Share of the restoration loss (R2-D4: of each stage's) taken after a per-channel colour fit to
    # the target (0-1), and the weight of a term on the output's low frequencies (its colour) added.
    aligned_loss: float = 0.0
    colour_loss: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)


def autocast_dtype(cfg: TrainConfig) -> torch.dtype | None:
    if cfg.amp == "off":
        return None
    if cfg.amp == "fp16":
        return torch.float16
    if cfg.amp == "bf16":
        return torch.bfloat16
    if cfg.device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else None


def prior_training(weights: Path, meta: dict[str, str] | None = None) -> dict[str, str]:
    """What the weights a run starts from (``--init-from``) had been trained for, steps and seconds
    summed over their own ancestry, so that a fine-tuned checkpoint's card states the whole budget.
    ``meta``: their metadata, when the caller has read it already."""
    meta = read_metadata(weights) if meta is None else meta
    if "steps" not in meta:
        return {}
    prior = recorded_prior(meta)
    steps = int(meta["steps"]) + int(prior.get("prior_steps", "0"))
    seconds = float(meta.get("train_seconds", "0")) + float(prior.get("prior_seconds", "0"))
    return {"prior_steps": str(steps), "prior_seconds": f"{seconds:.0f}", "prior_weights": str(weights)}


def recorded_prior(meta: dict[str, str]) -> dict[str, str]:
    """The ``prior_*`` budget a checkpoint's metadata records. Weights written before those keys
    existed still name their own --init-from in the training config: the ancestry is followed
    through it while that file is kept ({} otherwise: only the file's own steps can be counted)."""
    if "prior_steps" in meta:
        return meta
    parent = json.loads(meta.get("train_config", "{}")).get("init_from")
    return prior_training(Path(parent)) if parent and Path(parent).is_file() else {}


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def trained_parameters(model: nn.Module, prefixes: tuple[str, ...], label: str) -> dict[str, nn.Parameter]:
    """The parameters under ``prefixes`` (``--train-only``); a prefix that matches none is refused with
    the module names there are, since a typo would otherwise freeze the whole network."""
    names = dict(model.named_parameters())
    unmatched = [p for p in prefixes if not any(under(n, (p,)) for n in names)]
    if unmatched:
        tops = sorted({".".join(n.split(".")[: 2 if isinstance(getattr(model, n.split(".")[0]), nn.ModuleDict) else 1])
                       for n in names})  # fmt: skip
        raise ValueError(f"--train-only {', '.join(unmatched)} matches no parameter of {label} "
                         f"(modules: {', '.join(tops)})")  # fmt: skip
    return {n: p for n, p in names.items() if under(n, prefixes)}


class Trainer:
    def __init__(self, cfg: TrainConfig, batches: Iterator[ClipBatch]) -> None:
        self.cfg = cfg
        self.batches = batches
        torch.manual_seed(cfg.seed)
        self.prior: dict[str, str] = {}
        kwargs: dict[str, object] = {"structure": cfg.structure} if cfg.structure is not None else {}
        own = cfg.out / "last.safetensors"
        if self.resume_path.is_file() and own.is_file():  # a resumed run goes on in the layout it was making
            kwargs = checkpoint_config({**read_metadata(own), "model": cfg.model})
        self.model: nn.Module = create_model(cfg.model, **kwargs).to(cfg.device)
        if cfg.init_from is not None:
            self.prior = prior_training(cfg.init_from)
            try:  # weights of an older layout convert to the registered one, computing the same function
                _, state = read_checkpoint(cfg.init_from, cfg.model, into=self.model.cfg)  # type: ignore[attr-defined]
            except ValueError:  # a layout that does not convert (a candidate's) is kept as it is
                made, state = read_checkpoint(cfg.init_from, cfg.model)
                self.model = create_model(cfg.model, **made).to(cfg.device)
            self.model.load_state_dict(state, strict=True)
        self.is_most = isinstance(self.model, MostNet)
        if not self.is_most and not isinstance(self.model, R2D4):
            raise TypeError(f"cannot train {type(self.model).__name__}")
        if (cfg.aligned_loss or cfg.colour_loss) and cfg.search:
            raise ValueError("the colour-aligned and colour losses are not part of Neural Scale Search's gated errors")
        if not cfg.colour_loss >= 0:  # NaN too
            raise ValueError(f"colour_loss is a weight, >= 0; got {cfg.colour_loss}")
        if not 0.0 <= cfg.aligned_loss <= 1.0:
            raise ValueError(f"aligned_loss is a share of the restoration loss, 0-1; got {cfg.aligned_loss}")
        if cfg.emphasis and not self.is_most:
            raise ValueError("task emphasis weights MOST's tasks; R2-D4 has fixed stage weights")
        self.model.to(memory_format=torch.channels_last)
        self.gates: ScaleGates | None = None
        if cfg.search:
            if not self.is_most or self.model.structure != Structure():  # type: ignore[union-attr]
                raise ValueError("Neural Scale Search needs every task at every scale (most-net)")
            self.gates = ScaleGates(tau=cfg.gate_tau).to(cfg.device)
        groups = [{"params": self._trainable_parameters(), "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
        if self.gates is not None:
            groups.append({"params": self.gates.parameters(), "lr": cfg.gate_lr, "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.balancer: Balancer | None = (
            create_balancer(cfg.balancing, ("restoration", "segmentation", "homography"), cfg.emphasis)
            if self.is_most
            else None
        )
        self.perceptual = VGGPerceptual(cfg.perceptual_weights).to(cfg.device) if cfg.perceptual_weights else None
        self.amp_dtype = autocast_dtype(cfg)
        self.step_index = 0
        self.seconds = 0.0
        cfg.out.mkdir(parents=True, exist_ok=True)
        self.log_path = cfg.out / "log.jsonl"

    def _trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter, or with ``cfg.train_only`` those under its prefixes (the rest frozen)."""
        if not self.cfg.train_only:
            return list(self.model.parameters())
        trained = trained_parameters(self.model, self.cfg.train_only, self.cfg.model)
        for name, param in self.model.named_parameters():
            param.requires_grad_(name in trained)
        return list(trained.values())

    def _train_mode(self) -> None:
        """Training mode for what trains; frozen modules (``cfg.train_only``) stay as they are served."""
        self.model.train()
        if not self.cfg.train_only:
            return
        for name, module in self.model.named_modules():  # "" (the whole model) holds what trains
            above = not name or any(p.startswith(name + ".") for p in self.cfg.train_only)
            if not above and not under(name, self.cfg.train_only):
                module.eval()

    # -- schedule -------------------------------------------------------------------------------

    def _set_lr(self) -> None:
        cfg = self.cfg
        if self.step_index < cfg.warmup:
            factor = (self.step_index + 1) / cfg.warmup
        else:
            progress = (self.step_index - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
            factor = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * (factor if group is self.optimizer.param_groups[0] else 1.0)

    # -- one optimisation step ------------------------------------------------------------------

    def _clip_losses(self, batch: ClipBatch) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        b, t = batch.input.shape[:2]
        h, w = batch.input.shape[-2:]
        spec = self.model.spec  # type: ignore[attr-defined]
        state = {k: torch.from_numpy(v).to(cfg.device) for k, v in spec.initial_state(b, h, w).items()}
        task_sums: dict[str, Tensor] = {}
        gates = self.gates.sample() if self.gates is not None else None
        for k in range(t):
            frame = batch.input[:, k].contiguous(memory_format=torch.channels_last)
            reset = torch.full((b, 1, 1, 1), float(k == 0), device=cfg.device)
            with torch.autocast(cfg.device.split(":")[0], dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):  # fmt: skip
                if self.is_most:
                    step, state = self.model.step(frame, reset, state)  # type: ignore[operator]
                else:  # the loss trains the frame before the detail return, which is fitted (as MOST's)
                    outputs, state, found = self.model.forward_intermediates(frame, reset, state)  # type: ignore[operator]
                    step = {**outputs, "restored": found.get("restored_before_detail", outputs["restored"])}
            if self.is_most:
                targets = MostTargets(batch.target[:, k], batch.mask[:, k], batch.homography[:, k])
                losses = (
                    gated_task_errors(step, targets, gates)
                    if gates is not None
                    else most_task_losses(step, targets, cfg.aligned_loss, cfg.colour_loss)
                )
            else:
                _, losses = r2d4_loss(step, batch.target[:, k], batch.target_blurry[:, k], self.perceptual,
                                      aligned=cfg.aligned_loss, colour=cfg.colour_loss)
            for name, value in losses.items():
                task_sums[name] = task_sums.get(name, 0.0) + value / t  # type: ignore[operator]
        logs: dict[str, float] = {f"loss_{k}": float(v.detach()) for k, v in task_sums.items()}
        if self.balancer is not None:
            total, weights = self.balancer.combine(task_sums)
            logs.update({f"weight_{k}": v for k, v in weights.items()})
        else:
            total = r2d4_total(task_sums)
        if self.gates is not None:
            total = total + self.cfg.sparsity_weight * self.gates.sparsity()
            logs.update(self.gates.snapshot())
        logs["loss"] = float(total.detach())
        return total, logs

    def train_step(self, batch: ClipBatch) -> dict[str, float]:
        self._train_mode()
        self._set_lr()
        start = time.perf_counter()
        total, logs = self._clip_losses(batch.to(self.cfg.device))
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        logs["grad_norm"] = float(nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
        self.optimizer.step()
        self.step_index += 1
        self.seconds += time.perf_counter() - start
        logs["step"] = self.step_index
        logs["lr"] = self.optimizer.param_groups[0]["lr"]
        return logs

    # -- persistence ----------------------------------------------------------------------------

    @property
    def resume_path(self) -> Path:
        return self.cfg.out / "resume.pt"

    def save(self) -> Path:
        """Weights as safetensors (what ships) and everything else for --resume (tensors/ints only)."""
        weights = save_checkpoint(self.model, self.cfg.out / "last.safetensors", self.metadata())
        state = {
            "optimizer": self.optimizer.state_dict(),
            "step": self.step_index,
            "seconds": self.seconds,
            "torch_rng": torch.get_rng_state(),
            "gates": self.gates.state_dict() if self.gates is not None else {},
        }
        tmp = self.resume_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.resume_path)
        return weights

    def load(self) -> None:
        weights = self.cfg.out / "last.safetensors"
        made, tensors = read_checkpoint(weights, self.cfg.model)
        now = {key: getattr(self.model.cfg, key) for key in made}  # type: ignore[union-attr]
        if made != now:
            raise ValueError(
                f"{weights} was made with {made}, {self.cfg.model} builds {now}: start a new run with "
                f"--init-from {weights}, which converts the weights where that computes the same"
            )
        self.model.load_state_dict(tensors, strict=True)
        state = torch.load(self.resume_path, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_index = int(state["step"])
        self.seconds = float(state["seconds"])
        torch.set_rng_state(state["torch_rng"])
        if self.gates is not None and state["gates"]:
            self.gates.load_state_dict(state["gates"])

    def metadata(self) -> dict[str, str]:
        cfg = asdict(self.cfg)
        cfg["out"] = str(cfg["out"])
        cfg["structure"] = self.cfg.structure.to_json() if self.cfg.structure else None
        cfg["perceptual_weights"] = str(cfg["perceptual_weights"]) if cfg["perceptual_weights"] else None
        cfg["init_from"] = str(cfg["init_from"]) if cfg["init_from"] else None
        # Where the steps ran: a card written later, or for a fit of these weights, must name this
        # machine, not the one that ships.
        on_gpu = self.cfg.device.startswith("cuda")
        hardware = torch.cuda.get_device_name(self.cfg.device) if on_gpu else cpu_model()
        return {
            "train_config": json.dumps(cfg),
            "steps": str(self.step_index),
            "train_seconds": f"{self.seconds:.0f}",
            "amp": str(self.amp_dtype),
            "hardware": hardware,
            **self.prior,
        }

    def log(self, record: dict[str, float]) -> None:
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    # -- the loop -------------------------------------------------------------------------------

    def fit(
        self,
        progress: bool = True,
        until: int | None = None,
        minutes: float | None = None,
        checkpoint_minutes: float | None = None,
        on_checkpoint: Callable[[Path], None] | None = None,
    ) -> Path:
        """Trains to ``cfg.steps`` (or stops early at step ``until``, as an interrupted run would).

        ``minutes``: a wall-clock budget for this call. Once it is spent the run stops after the
        step in progress and saves a checkpoint, keeping the ``cfg.steps`` schedule like ``until``,
        so resuming goes on where it stopped. ``checkpoint_minutes`` also saves when that long has
        passed since the last save (steps differ in cost between machines); ``on_checkpoint`` gets
        the weights' path after every save (e.g. to copy them where a remote run's outputs go).
        """
        start = last_save = time.monotonic()
        deadline = None if minutes is None else start + 60 * minutes
        bar = None
        if progress:
            bar = tqdm(total=self.cfg.steps, initial=self.step_index, dynamic_ncols=True)
        path = self.cfg.out / "last.safetensors"
        stop = self.cfg.steps if until is None else min(until, self.cfg.steps)
        while self.step_index < stop:
            logs = self.train_step(next(self.batches))
            now = time.monotonic()
            final = self.step_index == stop or (deadline is not None and now >= deadline)
            if bar is not None:
                bar.update(1)
            if self.step_index % self.cfg.log_every == 0 or final:
                logs["seconds"] = self.seconds
                self.log(logs)
                if bar is not None:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k.startswith("loss")})
            timed_save = checkpoint_minutes is not None and now - last_save >= 60 * checkpoint_minutes
            if self.step_index % self.cfg.checkpoint_every == 0 or final or timed_save:
                path = self.save()
                last_save = time.monotonic()
                if on_checkpoint is not None:
                    on_checkpoint(path)
            if final:
                break
        if bar is not None:
            bar.close()
        return path
