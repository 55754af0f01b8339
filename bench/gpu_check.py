"""One script for a GPU session (at most ~10 minutes on one GPU): everything the CPU could not check.

    python bench/gpu_check.py [--out runs/gpu_check] [--sections kernels,head,train,sampling]
    python bench/gpu_check.py --smoke            # tiny shapes on the CPU: checks the script itself (tests do this)

Sections, each timed and recorded even when another fails:
- kernels:  the log-prob kernel tests under pytest on CUDA (compiled Triton on CUDA tensors), the sampling kernel
            tests with the GPU hidden;
- head:     the fused log-prob head, forward + backward, naive / chunked / triton at VAR-d16 and d30 head shapes (bf16
            inputs): time, peak memory, max error against a float32 reference, and whether two runs give identical
            bits (Triton's atomics may not);
- train:    one bf16 training step (model, AdamW, clipping, as var_mclr/train.py) per objective at d16, and d30 with
            activation checkpointing at a small micro-batch: time and peak memory beside var_mclr.plan's prediction
            for one process;
- sampling: guidance-free against CFG, images per second, d16 with random weights (tokens only).
Writes <out>/gpu_check.json and <out>/gpu_check.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from var_mclr import plan as plan_mod  # noqa: E402
from var_mclr.config import load_config, var_config, vqvae_config  # noqa: E402
from var_mclr.kernels import token_logprobs  # noqa: E402
from var_mclr.model import VAR  # noqa: E402
from var_mclr.objectives import get_objective, objective_loss  # noqa: E402

log = logging.getLogger("bench.gpu_check")
OBJECTIVES = ("nll", "mclr", "cca", "cc_dpo", "unlearning")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(run, device: torch.device, repeats: int) -> tuple[float, float]:
    """(median seconds, peak bytes above what was allocated before) of run(), after one warm-up call."""
    run()
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        return statistics.median(times), float(torch.cuda.max_memory_allocated(device) - base)
    from var_mclr.memprobe import peak_bytes

    return statistics.median(times), float(peak_bytes(run))


def _pytest(files: list[str], env: dict) -> dict:
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=240)
    return {"passed": res.returncode == 0, "returncode": res.returncode,
            "summary": (res.stdout + res.stderr).strip().splitlines()[-3:]}


def section_kernels(args, device) -> dict:
    """The log-prob kernel tests on CUDA tensors (compiled Triton). The sampling kernel tests build CPU tensors, so
    they run with the GPU hidden (Triton interpreted): a check of the code, not of its CUDA build."""
    if args.smoke:  # the CPU run of this script only checks that the section runs
        return {"fallback": _pytest(["tests/test_kernels_fallback.py"], dict(os.environ))}
    cuda_env = {**os.environ, "VAR_MCLR_TEST_DEVICE": "cuda"}
    cpu_env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}
    return {"logprob_on_cuda": _pytest(["tests/test_kernels_logprob.py", "tests/test_kernels_fallback.py"], cuda_env),
            "sampling_interpreted": _pytest(["tests/test_kernels_sampling.py"], cpu_env)}


def _head_problem(N: int, C: int, V: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, C, generator=g)
    w = torch.randn(V, C, generator=g) / C ** 0.5 * 3
    return (h.to(device), w.to(device), torch.randn(V, generator=g).to(device),
            torch.randint(0, V, (N,), generator=g).to(device), torch.randn(N, generator=g).to(device))


def _head_grads(impl, h, w, b, t, gout, bf16=True):
    """logp and (dh, dW, db) as training computes them: float32 weights and hidden states under bf16 autocast
    (bf16=False: the float32 reference)."""
    leaves = [x.detach().clone().requires_grad_(True) for x in (h, w, b)]
    with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=bf16):
        logp = token_logprobs(*leaves, t, impl=impl)
    (logp * gout).sum().backward()
    return [logp.detach()] + [x.grad for x in leaves]


def section_head(args, device) -> dict:
    """Fused head forward + backward per implementation at the d16 and d30 head shapes (L = 680 tokens per row)."""
    shapes = {"d16": (16 * 680, 1024, 4096), "d30": (8 * 680, 1920, 4096)}
    if args.smoke:
        shapes = {"tiny": (64, 32, 128)}
    impls = ["naive", "chunked"] + (["triton"] if device.type == "cuda" else [])
    out = {}
    for name, (N, C, V) in shapes.items():
        prob = _head_problem(N, C, V, device)
        ref = _head_grads("naive", *prob, bf16=False)
        for impl in impls:
            got = _head_grads(impl, *prob)
            again = _head_grads(impl, *prob)
            seconds, peak = measure(lambda: _head_grads(impl, *prob), device, args.repeats)
            out[f"{name}/{impl}"] = {
                "N": N, "C": C, "V": V, "ms": 1e3 * seconds, "peak_MB": peak / 1e6,
                "max_err": {k: float((g.float() - r.float()).abs().max()) for k, g, r in
                            zip(("logp", "dh", "dW", "db"), got, ref)},
                "bit_repeatable": all(torch.equal(a, b) for a, b in zip(got, again))}
            del got, again
        del prob, ref
    return out


SMOKE_MODEL = ["model.depth=2", "model.embed_dim=64", "model.num_heads=2", "tokenizer.vocab_size=256",
               "tokenizer.v_patch_nums=[1, 2, 3]"]


def _train_cfg(args, depth: int, objective: str, micro: int, ckpt: bool):
    overrides = [f"train.objective={objective}", "data.cache_tokens=true", f"train.global_batch={micro}",
                 f"train.micro_batch={micro}", f"train.activation_checkpointing={str(ckpt).lower()}",
                 "loss.mclr.tau=0.1", "train.mixed_precision=bf16", "model.init=null"]
    return load_config(REPO / "configs" / f"var_d{depth}.yaml", overrides + (SMOKE_MODEL if args.smoke else []),
                       check_files=False)


def _train_step_fn(cfg, device):
    """A model, its optimizer and one training step of cfg on random tokens, the way var_mclr/train.py steps."""
    from var_mclr.optim import make_optimizer

    vae_cfg = vqvae_config(cfg.tokenizer)
    var_cfg = var_config(cfg.model, vae_cfg.vocab_size, vae_cfg.z_channels, cfg.data.num_classes,
                         vae_cfg.v_patch_nums)
    torch.manual_seed(0)
    var = VAR(var_cfg).to(device)
    var.init_weights()
    var.activation_checkpointing = cfg.train.activation_checkpointing
    objective = get_objective(cfg.train.objective)
    ref = VAR(var_cfg).to(device).requires_grad_(False) if objective.needs_reference else None
    opt = make_optimizer(cfg, var)
    B, L = cfg.train.micro_batch, var.L
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, var.V, (B, L), generator=g).to(device)
    x = torch.randn(B, L - 1, var.Cvae, generator=g).to(device)
    label = torch.randint(0, cfg.data.num_classes, (B,), generator=g)

    def step():
        plan = objective.plan(cfg.loss, label, cfg.data.num_classes, 0.0, torch.Generator().manual_seed(1))
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = objective_loss(objective, cfg.loss, var, ref, plan, idx, x)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(var.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _one_train_check(args, device, depth: int, objective: str, micro: int, ckpt: bool) -> dict:
    cfg = _train_cfg(args, depth, objective, micro, ckpt)
    cuda = device.type == "cuda"
    memory_gb = torch.cuda.get_device_properties(device).total_memory / plan_mod.GIB if cuda else 1e3
    predicted = plan_mod.memory_plan(cfg, 1, micro, "ddp", device.type, memory_gb)
    plan_mod.add_time(predicted, cfg, micro, micro, plan_mod.GPU_TFLOPS, plan_mod.MFU)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    step = _train_step_fn(cfg, device)
    step()  # warm-up: optimizer state, allocator, kernels compiled
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = float(torch.cuda.max_memory_allocated(device) - base) if device.type == "cuda" else None
    flops = plan_mod.step_flops(cfg, micro)
    seconds = statistics.median(times)
    return {"micro_batch": micro, "checkpointing": ckpt, "ms": 1e3 * seconds,
            "peak_GiB": peak and peak / plan_mod.GIB, "plan_peak_GiB": predicted.peak / plan_mod.GIB,
            "plan_error": peak and (predicted.peak - peak) / peak,
            "achieved_TFLOPS": flops / seconds / 1e12, "plan_ms_at_assumed_MFU": 1e3 * predicted.step_s}


def section_train(args, device) -> dict:
    runs = [(16, o, 2 if args.smoke else 16, False) for o in OBJECTIVES] + [(30, "mclr", 2, True)]
    out = {}
    for depth, objective, micro, ckpt in runs:
        key = f"d{depth}/{objective}" + ("/ckpt" if ckpt else "")
        out[key] = _one_train_check(args, device, depth, objective, micro, ckpt)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def section_sampling(args, device) -> dict:
    """Images per second, guidance-free against CFG (w = 1.5, top-k 900, top-p 0.96, bf16), tokens only."""
    from tokenizer.model import VQVAE, VQVAEConfig
    from var_mclr.model import VARConfig
    from var_mclr.sampling import SamplingConfig, sample_tokens

    if args.smoke:
        vae_cfg = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1,
                              v_patch_nums=(1, 2, 3, 4))
        var_cfg = dict(depth=2, embed_dim=64, num_heads=2)
        B = 4
    else:
        vae_cfg, var_cfg, B = VQVAEConfig(), dict(depth=16, embed_dim=1024, num_heads=16), 64
    torch.manual_seed(0)
    vae = VQVAE(vae_cfg).to(device).eval()
    var = VAR(VARConfig(vocab_size=vae.V, Cvae=vae.Cvae, num_classes=1000, patch_nums=vae.patch_nums,
                        **var_cfg)).to(device).eval()
    var.init_weights()
    label = torch.randint(0, 1000, (B,), generator=torch.Generator().manual_seed(0)).to(device)
    out = {}
    for guidance in ("none", "cfg"):
        cfg = SamplingConfig(guidance=guidance, cfg_scale=1.5, top_k=900, top_p=0.96,
                             mixed_precision="bf16" if device.type == "cuda" else "no")

        def run(cfg=cfg):
            sample_tokens(var, vae.quantize, label, cfg, torch.Generator(device=device).manual_seed(0))
        seconds, _ = measure(run, device, args.repeats)
        out[guidance] = {"batch": B, "images_per_s": B / seconds}
    out["cfg_slowdown"] = out["none"]["images_per_s"] / out["cfg"]["images_per_s"]
    return out


SECTIONS = {"kernels": section_kernels, "head": section_head, "train": section_train, "sampling": section_sampling}


def _md_rows(name: str, result) -> list[str]:
    if not isinstance(result, dict) or "error" in result:
        return [f"**{name}**: {result}", ""]
    if name in ("head", "train"):
        keys = list(next(iter(result.values())).keys())
        lines = [f"**{name}**", "", "| case | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for case, row in result.items():
            lines.append(f"| {case} | " + " | ".join(_fmt(row[k]) for k in keys) + " |")
        return lines + [""]
    return [f"**{name}**: `{json.dumps(result, default=str)}`", ""]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    return str(v)


def write_report(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    lines = [f"# gpu_check on {results['device']}", "", f"torch {results['torch']}, {results['seconds']:.0f} s", ""]
    for name in SECTIONS:
        if name in results:
            lines += _md_rows(name, results[name])
    (out_dir / "gpu_check.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "runs" / "gpu_check"))
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script runs")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke:
        ap.error("no GPU: run with --smoke for the CPU check of this script")
    t0 = time.perf_counter()
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)",
               "torch": torch.__version__, "smoke": args.smoke}
    for name in args.sections.split(","):
        log.info("gpu_check: %s", name)
        s0 = time.perf_counter()
        try:
            results[name] = SECTIONS[name](args, device)
        except Exception as e:  # one failing section must not cost the others' numbers
            log.exception("section %s failed", name)
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        log.info("gpu_check: %s took %.0f s", name, time.perf_counter() - s0)
    results["seconds"] = time.perf_counter() - t0
    write_report(results, Path(args.out))
    log.info("wrote %s", Path(args.out) / "gpu_check.md")
    return results


if __name__ == "__main__":
    main()
