"""Model cards: what a shipped checkpoint is, how it was made and what it measures.

Everything on a card is read from the checkpoint's metadata, its training log and a ``vident eval``
JSON report, so a card can be regenerated, and its numbers re-measured, by anyone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.checkpoints import CHECKPOINT_DIR, checkpoint_config, read_metadata
from models.hardware import cpu_model
from models.most import TASKS, Structure
from models.training.colour_fit import ColourFit, colour_fit_of
from models.training.detail_fit import DetailFit, detail_fit_of
from models.training.filter_fit import filter_fit_of
from models.training.losses import R2D4_NOISE_WEIGHT
from models.training.trainer import recorded_prior

METRIC_COLUMNS = (("psnr", "PSNR", "{:.2f}"), ("psnr_aligned", "PSNR c.a.", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"),
                  ("iou", "IoU", "{:.3f}"), ("mace", "MACE (px)", "{:.2f}"), ("ew", "E(W)", "{:.5f}"),
                  ("fps", "FPS", "{:.1f}"))  # fmt: skip
NLM, ECC, BASELINE = "NL-means (OpenCV)", "ECC (OpenCV)", "BASELINE"


def structure_table(structure: Structure) -> str:
    lines = ["| task | s = 1 | s = 2 | s = 3 |", "|---|---|---|---|"]
    for task, row in zip(TASKS, structure.table(), strict=True):
        lines.append(f"| {task} | " + " | ".join("yes" if v else "-" for v in row) + " |")
    return "\n".join(lines)


def eval_table(report: dict) -> str:
    lines = ["| method | " + " | ".join(c[1] for c in METRIC_COLUMNS) + " |",
             "|---|" + "---|" * len(METRIC_COLUMNS)]  # fmt: skip
    for values in report["rows"]:  # the JSON `vident eval --json` writes: a list of named rows
        cells = ["-" if values.get(k) is None else fmt.format(values[k]) for k, _, fmt in METRIC_COLUMNS]
        lines.append(f"| {values['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _rows(report: dict) -> dict[str, dict]:
    return {row["name"]: row for row in report["rows"]}


def _check(name: str, value: float | None, bar: float | None, higher: bool, unit: str, bar_text: str) -> str:
    if value is None or bar is None:
        return f"| {name} | not measured | {bar_text} | - |"
    met = value > bar if higher else value <= bar
    return f"| {name} | {value:.3g}{unit} | {bar_text} | {'met' if met else '**missed**'} |"


def targets_table(model: str, test: dict, real: dict | None) -> str:
    """The generalisation targets measured by the card's two evaluations, each marked met or missed.

    Real-content split: raw PSNR gain over the input > 0 and colour-aligned PSNR above NL-means'
    (every restoring model); MACE below ECC's (models with a homography). Synthetic test split
    (MOST family): PSNR gain >= +6 dB, IoU >= 0.85, MACE <= 0.5 x the identity's."""
    lines = ["| target | measured | bar | |", "|---|---|---|---|"]
    if real is not None:
        rows = _rows(real)
        mine, base, nlm, ecc = rows.get(model, {}), rows.get(BASELINE, {}), rows.get(NLM, {}), rows.get(ECC, {})
        gain = mine["psnr"] - base["psnr"] if mine.get("psnr") is not None and base.get("psnr") is not None else None
        lines.append(_check("real content: PSNR gain over the input", gain, 0.0, True, " dB", "> 0 dB"))
        nlm_ca = nlm.get("psnr_aligned")
        lines.append(_check("real content: colour-aligned PSNR", mine.get("psnr_aligned"), nlm_ca, True, " dB",
                            f"> NL-means' {nlm_ca:.2f} dB" if nlm_ca is not None else "> NL-means'"))  # fmt: skip
        if mine.get("mace") is not None:
            ecc_mace = ecc.get("mace")
            lines.append(_check("real content: MACE", mine["mace"], ecc_mace, False, " px",
                                f"< ECC's {ecc_mace:.2f} px" if ecc_mace is not None else "< ECC's"))  # fmt: skip
    rows = _rows(test)
    mine, base = rows.get(model, {}), rows.get(BASELINE, {})
    if mine.get("iou") is not None:
        gain = mine["psnr"] - base["psnr"] if mine.get("psnr") is not None else None
        lines.append(_check("synthetic test: PSNR gain over the input", gain, 6.0, True, " dB", ">= +6 dB"))
        lines.append(_check("synthetic test: IoU", mine["iou"], 0.85 - 1e-12, True, "", ">= 0.85"))
        if mine.get("mace") is not None and base.get("mace"):
            lines.append(_check("synthetic test: MACE / identity's", mine["mace"] / base["mace"], 0.5, False, "",
                                "<= 0.5"))  # fmt: skip
    return "\n".join(lines)


def content_text(extra: dict) -> str:
    """``; content dental=0.4,...; degradations drawn per clip (wide)`` for runs that record them."""
    mix = extra.get("content_mix")
    if not mix:
        return ""
    share = float(extra.get("recipe_share", 0.5))  # runs from before the setting drew with even odds
    how = {
        "wide": "drawn per clip over docs/data.md's ranges (wide)",
        "mixed": f"the recipe's for {share:.0%} of the clips, the rest drawn over docs/data.md's ranges (mixed, "
        f"`--recipe-share {share:g}`)",
    }.get(str(extra.get("degradation")), "the recipe's")
    codec = float(extra.get("recipe_codec", 0))
    if codec:
        how += (f"; {codec:.0%} of the recipe's clips through a client codec (JPEG or H.264 over the same ranges, "
                f"`--recipe-codec {codec:g}`)")  # fmt: skip
    photos = [name for name in str(extra.get("training_photos", "")).split(",") if name]
    seen = f"; {len(photos)} training photographs, docs/data.md" if photos else ""
    return f"; content per clip {mix} (`--mix`{seen}); degradations {how}"


def write_card(
    checkpoint: Path,
    eval_json: Path,
    eval_command: str,
    hardware: str | None = None,
    status: str | None = None,
    noise: str | None = None,
    real_json: Path | None = None,
    real_command: str | None = None,
) -> Path:
    """``status`` is a paragraph put first (what the checkpoint is good for, what it misses); ``noise``
    overrides the training noise level for runs older than the metadata that records it; ``real_json``
    adds the real-content evaluation and the generalisation targets.

    A card that already exists keeps its hand-written parts (:func:`kept_sections`): they are appended
    to the regenerated card, so a re-ship does not drop them."""
    card = checkpoint.with_suffix(".md")
    kept = kept_sections(card.read_text()) if card.is_file() else []
    meta = read_metadata(checkpoint)
    cfg = json.loads(meta.get("train_config", "{}"))
    extra = cfg.get("extra") or {}
    noise = noise or extra.get("noise", "mixed")
    report = json.loads(Path(eval_json).read_text())
    seconds = float(meta.get("train_seconds", "nan"))
    prior = recorded_prior(meta)
    start = ""
    if prior:
        total = int(meta.get("steps", 0)) + int(prior["prior_steps"])
        hours = float(prior["prior_seconds"]) / 3600
        parent = prior.get("prior_weights", cfg.get("init_from"))
        steps = prior["prior_steps"]
        start = f"; started from `{parent}`, trained {steps} steps ({hours:.2f} h) before ({total} in all)"
    source = extra.get("data", "synthetic")
    rendered = ""
    if extra.get("render_size"):
        whole = f"; whole {extra['render_size']} frames {extra['whole_frames']}" if extra.get("whole_frames") else ""
        rendered = f" (crops of {extra['render_size']} renders{whole})"
    data_line = (
        f"- data: synthetic dental video (`models/data`, `vident synth`), train split, seed {cfg.get('seed')}, "
        f"clips of {cfg.get('clip_length')} frames at {cfg.get('height')}x{cfg.get('width')}{rendered}, noise "
        f"{noise}, camera motion x{extra.get('motion', '1.0')}{content_text(extra)}, fresh clips every step"
        if source == "synthetic"
        else f"- data: `{source}` (on-disk format), clips of {cfg.get('clip_length')} frames"
    )
    parts = [f"# {meta['model']}: `{checkpoint.name}`", ""]
    if status:
        parts += [status.strip(), ""]
    chosen = best_checkpoint_text(meta)
    loss_of = "restoration" if "structure" in meta else "each stage"  # MOST's one loss, or R2-D4's two
    parts += [
        "## Training",
        "",
        data_line,
        *([f"- checkpoint: the run's {chosen} of its checkpoints, not necessarily its last step"] if chosen else []),
        f"- steps: {meta.get('steps')} x batch {cfg.get('batch')}; optimiser AdamW, lr {cfg.get('lr')} "
        f"(warm-up {cfg.get('warmup')}, cosine){start}",
        *([f"- trained only: {', '.join(cfg['train_only'])} (the rest frozen)"] if cfg.get("train_only") else []),
        *([f"- {loss_of} loss: {float(cfg['aligned_loss']):g} of it after a per-channel colour fit to the target"]
          if cfg.get("aligned_loss") else []),
        *([f"- colour loss: weight {float(cfg['colour_loss']):g} on 8x8-pixel block means, added to the {loss_of} loss"]
          if cfg.get("colour_loss") else []),
        f"- task balancing: {cfg.get('balancing', '-')}{emphasis_text(cfg.get('emphasis'))}"
        if "structure" in meta
        else f"- loss: MSE(R) + {R2D4_NOISE_WEIGHT:g} MSE(R')",
        f"- mixed precision: {meta.get('amp')}",
        f"- wall time: {seconds / 3600:.2f} h of optimisation on {hardware or meta.get('hardware') or cpu_model()}",
        f"- weights: {meta.get('dtype', 'float32')} safetensors, no pickle; metadata holds the full training config",
    ]
    if "structure" in meta:
        made = checkpoint_config(meta)
        reads = "read" if made["restoration_input"] else "do not read"
        refined = refine_text(made["homography_refine"], made["homography_refine_prior"],  # type: ignore[arg-type]
                              made["homography_refine_prior_scale"], made["homography_refine_frames"],  # type: ignore[arg-type]
                              made["homography_refine_highpass"])  # type: ignore[arg-type]  # fmt: skip
        parts += [
            "",
            "## Scales-to-tasks structure",
            "",
            structure_table(made["structure"]),  # type: ignore[arg-type]
            "",
            f"Homography pooling: {made['homography_pool']}{homography_fit_text(meta)}; the restoration heads "
            f"{reads} the input frame B^s{filter_text(meta, made['restoration_filter'])}"
            f"{refined} (docs/models.md).",
        ]
    if meta.get("colour_transform") == "1":
        parts += ["", colour_map_text(meta)]
    if meta.get("detail_return") == "1":
        parts += ["", detail_return_text(meta)]
    parts += [
        "",
        "## Evaluation",
        "",
        f"{report['frames']} frames of {len(report['sequences'])} sequences in `{report['data']}`, "
        f"backend {report['backend']} on {report['device']}. Reproduce:",
        "",
        "```bash",
        eval_command,
        "```",
        "",
        eval_table(report),
    ]
    for name, note in report.get("notes", {}).items():
        parts.append(f"\n{name}: {note}")
    real = json.loads(Path(real_json).read_text()) if real_json is not None else None
    if real is not None:
        parts += [
            "",
            "## Real-content evaluation",
            "",
            f"{real['frames']} frames of {len(real['sequences'])} sequences in `{real['data']}`: photographs no "
            "training source uses, filmed by a simulated hand-held camera under drawn degradations (docs/data.md). "
            "PSNR c.a. is colour-aligned PSNR (a per-channel gain and offset fitted to the target first). Reproduce:",
            "",
            "```bash",
            real_command or "",
            "```",
            "",
            eval_table(real),
        ]
        for name, note in real.get("notes", {}).items():
            parts.append(f"\n{name}: {note}")
    parts += ["", "## Targets", "", targets_table(report.get("model") or meta["model"], report, real)]
    generated = "\n".join(parts)
    parts += [part for k in kept for part in ("", k) if k not in generated]  # not twice, e.g. via --status
    card.write_text("\n".join(parts) + "\n")
    return card


KEEP_OPEN, KEEP_CLOSE = "<!-- keep -->", "<!-- /keep -->"


def kept_sections(card: str) -> list[str]:
    """The hand-written parts of a card that survive regenerating it, in their order on the card.

    - a section whose heading starts with ``## Notes`` (``## Notes``, ``## Notes on ...``), up to the
      next ``#`` or ``##`` heading or the end (``###`` sub-headings stay inside it);
    - a block from a line ``<!-- keep -->`` to a line ``<!-- /keep -->`` anywhere else on the card,
      markers included (an unclosed block runs to the end).

    Headings inside fenced code blocks do not count. Each part is returned without surrounding blank
    lines."""
    parts: list[str] = []
    current: list[str] | None = None
    mode = ""  # "notes", "keep" or "" (generated text)
    fenced = False
    for line in card.splitlines():
        stripped = line.strip()
        heading = not fenced and (line.startswith("# ") or line.startswith("## "))
        if stripped.startswith("```"):
            fenced = not fenced
        if mode == "notes" and heading:
            parts.append("\n".join(current or []).strip("\n"))
            current, mode = None, ""
        if mode == "":
            if heading and line.startswith("## Notes"):
                current, mode = [line], "notes"
            elif not fenced and stripped == KEEP_OPEN:
                current, mode = [line], "keep"
            continue
        assert current is not None
        current.append(line)
        if mode == "keep" and not fenced and stripped == KEEP_CLOSE:
            parts.append("\n".join(current).strip("\n"))
            current, mode = None, ""
    if current is not None:
        parts.append("\n".join(current).strip("\n"))
    return [part for part in parts if part.strip()]


def ship_checkpoint(run_weights: Path, name: str, directory: Path | None = None) -> Path:
    """A run's fp32 ``last.safetensors`` (or ``best``) -> ``models/checkpoints/<name>.safetensors`` in float16.

    Half the bytes in the repository; the model computes in float32 after loading, and the card's
    evaluation is measured on this very file, so the rounding is part of what is measured.
    """
    meta = read_metadata(run_weights)
    tensors = {
        k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous()
        for k, v in load_file(str(run_weights)).items()
    }
    out = (directory or CHECKPOINT_DIR) / f"{name}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={**meta, "dtype": "float16", "source_run": run_weights.parent.name})
    return out


def filter_text(meta: dict[str, str], kernel: int) -> str:
    """How the restored frame's ``kernel`` x ``kernel`` input filter was made (0: none), for the
    card's layout line."""
    if not kernel:
        return ""
    fit = filter_fit_of(meta)
    if fit is None:
        return f" and add a {kernel}x{kernel} linear filter of it, trained with the network"
    held = (f", {fit.holdout_psnr_before:.2f} -> {fit.holdout_psnr_after:.2f} dB on {fit.holdout_sequences} "
            "held-out ones" if fit.holdout_psnr_before is not None else "")  # fmt: skip
    return (f" and add a {kernel}x{kernel} linear filter of it; the scale-1 filter was solved by least squares "
            f"given the trained network (`vident fit-filter --data {fit.data}`: {fit.fit_sequences} training "
            f"sequences x {fit.frames} frames, PSNR {fit.fit_psnr_before:.2f} -> {fit.fit_psnr_after:.2f} dB on "
            f"them{held})")  # fmt: skip


def chooser(fit: ColourFit | DetailFit) -> str:
    if fit.chosen_on is None:
        return "which chose"
    splits = fit.chosen_on.split(",")
    named = f"split{'s' if len(splits) > 1 else ''} {' and '.join(splits)}"
    return (f"while the validation {named} (PSNR {fit.chosen_psnr_before:.2f} -> "
            f"{fit.chosen_psnr_after:.2f} dB there) chose")  # fmt: skip


def colour_map_text(meta: dict[str, str]) -> str:
    """How the per-frame colour map of the restored frame was made, for a layout that has one."""
    fit = colour_fit_of(meta)
    if fit is not None and not fit.kept:
        where = "its held-out training sequences" if fit.chosen_on is None else f"the validation data ({fit.chosen_on})"
        return ("Colour map: the layout has a per-frame colour map, left at zero: a least-squares fit (`vident "
                f"fit-colour --data {fit.data}`) lowered PSNR on {where} at every ridge, so the restored frame is "
                "the trunk's own.")  # fmt: skip
    made = ("solved by least squares given the trained network (`vident fit-colour --data "
            f"{fit.data}`: {fit.fit_sequences} training sequences x {fit.frames} frames, PSNR "
            f"{fit.fit_psnr_before:.2f} -> {fit.fit_psnr_after:.2f} dB on them, {fit.holdout_psnr_before:.2f} -> "
            f"{fit.holdout_psnr_after:.2f} dB on {fit.holdout_sequences} held-out ones, {chooser(fit)} the ridge "
            f"{fit.ridge:g})" if fit is not None else "trained with the network")  # fmt: skip
    return ("Colour map: the restored frame is mapped by a 3x4 colour matrix per frame, read linearly from the "
            f"frame's colour statistics (docs/models.md); its weights were {made}.")  # fmt: skip


def detail_return_text(meta: dict[str, str]) -> str:
    """How the per-frame detail return was made, for a layout that has one."""
    fit = detail_fit_of(meta)
    if fit is None or not fit.kept:
        how = "" if fit is None else f": a least-squares fit (`vident fit-detail --data {fit.data}`) lowered PSNR"
        return (f"Detail return: the layout has a per-frame detail gate, left at zero{how}, so no input detail "
                "is given back.")  # fmt: skip
    return ("Detail return: after the colour map, a share of the input's own detail (the input mapped onto the "
            "output's colours) is given back per frame, read linearly from the input's noise level and the size of "
            "what the network removed (docs/models.md); the gate was solved by least squares given the network "
            f"(`vident fit-detail --data {fit.data}`: {fit.fit_sequences} training sequences x {fit.frames} frames, "
            f"PSNR {fit.fit_psnr_before:.2f} -> {fit.fit_psnr_after:.2f} dB on them, {fit.holdout_psnr_before:.2f} -> "
            f"{fit.holdout_psnr_after:.2f} dB on {fit.holdout_sequences} held-out ones, {chooser(fit)} the ridge "
            f"{fit.ridge:g}; mean share {fit.mean_share:.2f} there).")  # fmt: skip


def refine_text(
    levels: tuple[tuple[int, int], ...], prior: float = 0.0, prior_scale: str = "hessian", frames: str = "restored",
    highpass: tuple[int, ...] = (5,),
) -> str:
    """The photometric homography refinement the layout runs (empty without one)."""
    if not levels:
        return ""
    steps = ", then ".join(f"{n} at 1/{factor}" for factor, n in levels)
    relative = "the mean Gauss-Newton diagonal" + (" x the level's starting residual" if prior_scale == "residual"
                                                   else "")  # fmt: skip
    pull = f"; prior at the head's estimate {prior:g} x {relative}" if prior > 0 else ""
    matched = ("restored luma and the input's" if frames == "restored+input" else "restored luma")
    if len(highpass) > 1:
        sides = " and over ".join(str(side) for side in highpass)
        matched += f", each with its local mean removed over {sides} pixels"
    if frames == "restored+input" or len(highpass) > 1:
        matched += ", each channel weighed by its starting residual,"
    return (f". The output homography is then refined in the graph by inverse-compositional Lucas-Kanade on the "
            f"{matched} against the previous frame's (Gauss-Newton steps: {steps} resolution{pull}; "
            "`models/refine.py`)")  # fmt: skip


def homography_fit_text(meta: dict[str, str]) -> str:
    """How the homography readout was made when it was solved by ``vident fit-homography`` (else empty)."""
    if "homography_fit" not in meta:
        return ""
    fit = json.loads(meta["homography_fit"])
    held = (f", {fit['holdout_mace_before']:.3f} -> {fit['holdout_mace_after']:.3f} px on {fit['holdout_sequences']} "
            "held-out ones" if fit["holdout_mace_before"] is not None else "")  # fmt: skip
    return (
        f"; the scale-{fit['scale']} homography readout (the linear layer after the pooling) was solved by "
        f"least squares given the trained network (`vident fit-homography --data {fit['data']}`: "
        f"{fit['fit_sequences']} training sequences, {fit['pairs']} frame pairs, ridge {fit['ridge']:g} by "
        f"cross-validation; MACE {fit['fit_mace_before']:.3f} -> {fit['fit_mace_after']:.3f} px on them{held})"
    )


def emphasis_text(emphasis: dict[str, float] | None) -> str:
    """`` with homography weight x2`` for runs trained with ``--emphasis`` (empty otherwise)."""
    if not emphasis:
        return ""
    return " with " + ", ".join(f"{task} weight x{factor:g}" for task, factor in sorted(emphasis.items()))


def best_checkpoint_text(meta: dict[str, str]) -> str:
    """``best validation mace (3.535)`` for weights kept by ``vident train --keep-best`` (else empty)."""
    if "best_metric" not in meta:
        return ""
    return f"best validation {meta['best_metric']} ({float(meta['best_value']):.4g})"
