"""``vllm-tune estimate``: the per-GPU memory breakdown and what context × concurrency fits."""

from __future__ import annotations

from pathlib import Path

import click
import yaml

from ..errors import UsageError
from ..serveconfig import ServeConfig
from ..units import GIB

CONTEXT_ROWS = (8192, 32768, 65536, 131072)
MARGIN = 1.25  # "fits with margin": at least 25% more KV blocks than the row needs
ROPE_ROW_REACH = 4  # rows past the model's length go to 4x it with YaRN (the factor model cards give)


@click.command("estimate")
@click.option(
    "--model", "models", multiple=True, help="Model dir, HF id or profile name (repeat to share a GPU)."
)
@click.option(
    "--models",
    "models_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML list of {model, max-model-len, max-num-seqs, ...} sharing the GPUs.",
)
@click.option("--gpus", type=int, default=None, help="Use the first N GPUs.")
@click.option("--gpu-ids", default=None, help="Comma-separated GPU indices, e.g. 0,2.")
@click.option("--gpu", "gpu_name", default=None, help="GPU model from profiles/gpus.yaml, e.g. rtx-4090.")
@click.option("--gpu-memory", default=None, help="Memory per GPU, e.g. 32GiB; a bare number is GiB.")
@click.option("--tensor-parallel-size", "-tp", "tp", type=int, default=None)
@click.option("--max-model-len", type=int, default=None)
@click.option("--max-num-seqs", type=int, default=None)
@click.option("--gpu-memory-utilization", "util", type=float, default=None)
@click.option("--kv-cache-dtype", default="auto", show_default=True)
@click.option("--enforce-eager", is_flag=True)
@click.option(
    "--allow",
    type=click.Choice(["rope-scaling"]),
    default=None,
    help="A --max-model-len past the model's own length with YaRN (the --hf-overrides find would use).",
)
@click.option(
    "--hf-overrides", default=None, metavar="JSON", help="vLLM's --hf-overrides, e.g. a YaRN override."
)
@click.option("--json", "json_", is_flag=True, help="Print one JSON object.")
@click.option(
    "--simulate",
    metavar="SCENARIO",
    default=None,
    help="Read the GPUs of a simulated machine (profiles/sim/SCENARIO.yaml) instead of NVML.",
)
def command(
    models,
    models_file,
    gpus,
    gpu_ids,
    gpu_name,
    gpu_memory,
    tp,
    max_model_len,
    max_num_seqs,
    util,
    kv_cache_dtype,
    enforce_eager,
    allow,
    hf_overrides,
    json_,
    simulate,
) -> None:
    """Estimate per-GPU memory and what context x concurrency fits."""
    from ..gpus import resolve_gpus
    from ..models import resolve_model
    from ..nvml import open_nvml
    from ..rope import parse_hf_overrides
    from .find import _check_heads  # the same refusal of a TP size the heads cannot take

    if allow and hf_overrides:
        raise UsageError(
            "--allow rope-scaling writes the --hf-overrides itself", "pass one of --allow and --hf-overrides"
        )
    if hf_overrides:
        parse_hf_overrides(hf_overrides)  # refused as vLLM refuses it, before anything is resolved
    if util is not None and not 0 < util <= 1:
        raise UsageError(f"--gpu-memory-utilization must be in (0, 1], got {util}", "pass e.g. 0.9")
    for flag, value in (("--tensor-parallel-size", tp), ("--max-num-seqs", max_num_seqs)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}", f"pass e.g. {flag} 1")
    simulated_nvml = None
    if simulate:  # the simulated machine's GPUs, read through its own pynvml
        from ..paths import data_dir
        from ..simlite.activate import create

        simulated_nvml = create(simulate, state_dir=data_dir() / "sim" / Path(simulate).stem).open_nvml()
    entries = _entries(models, models_file)
    ids = _parse_ids(gpu_ids)
    tp_size = tp or (len(ids) if ids else gpus) or 1
    if gpus is None and not ids and tp_size > 1:
        gpus = tp_size
    try:
        gpu = resolve_gpus(
            gpus=gpus,
            gpu_ids=ids,
            gpu_name=gpu_name,
            gpu_memory=gpu_memory,
            nvml_opener=open_nvml if simulated_nvml is None else lambda: simulated_nvml,
        )
    finally:
        if simulated_nvml is not None:
            simulated_nvml.close()
    if tp_size > gpu.count:
        raise UsageError(
            f"--tensor-parallel-size {tp_size} needs {tp_size} GPUs, only {gpu.count} given",
            "raise --gpus or lower --tensor-parallel-size",
        )
    flags = {"max_model_len": max_model_len, "max_num_seqs": max_num_seqs, "gpu_memory_utilization": util}
    pairs = []
    for entry in entries:
        spec = resolve_model(entry["model"])
        entry_tp = int(entry.get("tensor-parallel-size") or tp_size)
        _check_heads(spec, entry_tp, using_ids=ids is not None)  # vLLM refuses it, and so does find
        cfg = ServeConfig(
            model=spec.serve_name,
            tensor_parallel_size=entry_tp,
            max_model_len=entry.get("max-model-len") or flags["max_model_len"],
            max_num_seqs=entry.get("max-num-seqs") or flags["max_num_seqs"],
            gpu_memory_utilization=entry.get("gpu-memory-utilization") or flags["gpu_memory_utilization"],
            kv_cache_dtype=str(entry.get("kv-cache-dtype") or kv_cache_dtype),
            enforce_eager=bool(entry.get("enforce-eager") or enforce_eager),
            hf_overrides=hf_overrides,
        )
        pairs.append((spec, _with_rope_scaling(spec, cfg) if allow else cfg))
    if len(pairs) == 1:
        _single(*pairs[0], gpu, json_)
    else:
        _shared(pairs, gpu, json_)


def _entries(models: tuple[str, ...], models_file: Path | None) -> list[dict]:
    entries = [{"model": m} for m in models]
    if models_file is not None:
        try:
            data = yaml.safe_load(models_file.read_text())
        except yaml.YAMLError as exc:
            raise UsageError(f"cannot parse {models_file}: {exc}", "fix the YAML") from exc
        items = data.get("models") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise UsageError(f"{models_file} must hold a list of models", "write e.g. '- model: qwen2.5-7b'")
        for item in items:
            item = {"model": item} if isinstance(item, str) else dict(item or {})
            if not item.get("model"):
                raise UsageError(
                    f"an entry in {models_file} has no 'model'", "add 'model: NAME' to every entry"
                )
            entries.append({str(k).replace("_", "-"): v for k, v in item.items()})
    if not entries:
        raise UsageError("no model given", "pass --model NAME (e.g. --model qwen2.5-7b) or --models FILE")
    return entries


def _parse_ids(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(
            f"--gpu-ids must be comma-separated integers, got {text!r}", "pass e.g. --gpu-ids 0,2"
        ) from None


def _gib(value: int) -> str:
    return f"{value / GIB:.2f} GiB"


def _with_rope_scaling(spec, cfg: ServeConfig) -> ServeConfig:
    """``--allow rope-scaling``: a length past the model's own gets the YaRN override find would use."""
    from ..rope import extension

    if cfg.max_model_len is None or cfg.max_model_len <= spec.derived_max_model_len:
        return cfg
    return cfg.replace(hf_overrides=extension(spec, cfg.max_model_len).flag_value)


def _context_rows(est, spec, cfg: ServeConfig, run) -> list[dict]:
    """The guides' context table: the usual lengths up to the model's own, then (where its RoPE takes YaRN)
    the ones up to 4x it, each with the YaRN factor that serves it and its own estimate."""
    from ..rope import extension, yarn_of

    native = spec.derived_max_model_len
    lengths = {n for n in CONTEXT_ROWS if n < native} | {native}
    lengths |= {
        n for n in (*CONTEXT_ROWS, est.derived_max_model_len) if native < n <= ROPE_ROW_REACH * native
    }
    if est.derived_max_model_len > native:  # the length a YaRN override in force reaches
        lengths.add(est.derived_max_model_len)
    rows = []
    for n in sorted(lengths):
        sized, rope = est, None
        if n > est.derived_max_model_len:
            try:
                ext = extension(spec, n)
            except UsageError:
                continue  # vLLM cannot serve it: no row
            sized = run(cfg.replace(max_model_len=n, hf_overrides=ext.flag_value))
            rope = {"factor": ext.factor, "hf_overrides": ext.flag_value}
        elif n > native:
            yarn = yarn_of(cfg.hf_overrides)
            rope = {"factor": yarn[0] if yarn else None, "hf_overrides": cfg.hf_overrides}
        seqs = sized.max_seqs(n)
        need = sized.layout.blocks_per_request(n, sized.in_flight_tokens)
        verdict = "does not fit"
        if seqs >= 1:
            verdict = "fits with margin" if sized.usable_blocks >= need * MARGIN else "tight"
        rows.append(
            {
                "context": n,
                "rope": rope,
                "kv_gib_per_seq": round(need * sized.bytes_per_block / GIB, 3),
                "max_concurrency": seqs,
                "verdict": verdict,
            }
        )
    return rows


REMEDY_UTILIZATION = 0.95  # the "higher utilization" rung: find's default ceiling
REMEDY_OFFLOAD_GIB = 4.0  # the "CPU offload" rung


def _remedies(spec, cfg: ServeConfig, est, total: int, gpu_name: str) -> list[dict]:
    """When (max_model_len, max_num_seqs) does not fit: the guides' knobs in their order (fewer sequences,
    higher utilization, eager mode, fp8 KV, CPU offload, more GPUs), each row applied on top of the rows
    above, until one fits. The shorter context is the alternative at its place in the order: the longest
    context the rows above it hold (the rows below keep the context asked for). A context past the model's
    own length starts with the YaRN override of --allow rope-scaling: without it nothing below fits."""
    from ..estimate import estimate
    from ..rope import extension

    def run(changed: ServeConfig):
        return estimate(spec, total, changed, gpu_name=gpu_name)

    out: list[dict] = []
    need = est.kv_bytes_for(est.max_model_len, 1) - est.kv_pool_bytes
    if need > 0:
        out.append({"step": "missing", "gain_gib": round(-need / GIB, 2)})
    current, now = cfg, est

    def row(label: str, changed: ServeConfig, after, changes: dict, *, alternative: bool = False) -> dict:
        return {
            "step": label,
            "changes": changes,
            "flags": changed.flags(),
            "alternative": alternative,
            "gain_gib": round((after.kv_pool_bytes - now.kv_pool_bytes) / GIB, 2),
            "gain_tokens": after.kv_cache_tokens - now.kv_cache_tokens,
            "kv_pool_gib": round(after.kv_pool_bytes / GIB, 2),
            "kv_cache_tokens": after.kv_cache_tokens,
            "max_model_len_fit": after.max_model_len_fit,
            "fits": after.fits,
        }

    def rungs():
        """(label, changes) of each rung in order, computed from the config the rows above reached."""
        if now.max_model_len > now.derived_max_model_len:
            # past the model's own length no memory knob helps: YaRN first, the rows below at its length
            try:
                ext = extension(spec, now.max_model_len)
            except UsageError:
                yield "shorter context", None
                return
            yield f"YaRN ×{ext.factor:g} (--allow rope-scaling)", {"hf_overrides": ext.flag_value}
        seqs = max(1, now.max_num_seqs // 4)
        if seqs < now.max_num_seqs:
            yield f"fewer sequences (--max-num-seqs {seqs})", {"max_num_seqs": seqs}
        yield "shorter context", None
        if now.utilization < REMEDY_UTILIZATION:
            yield (
                f"higher utilization (--gpu-memory-utilization {REMEDY_UTILIZATION})",
                {"gpu_memory_utilization": REMEDY_UTILIZATION},
            )
        if not current.enforce_eager:
            yield "eager mode (--enforce-eager)", {"enforce_eager": True}
        if not current.kv_cache_dtype.startswith("fp8"):
            yield "fp8 KV cache (--kv-cache-dtype fp8)", {"kv_cache_dtype": "fp8"}
        offload = current.cpu_offload_gb + REMEDY_OFFLOAD_GIB
        yield f"CPU offload (--cpu-offload-gb {offload:g})", {"cpu_offload_gb": offload}
        # more GPUs of this size: the smallest tensor-parallel size vLLM can shard the model over that fits
        wider = [t for t in spec.tp_sizes(up_to=8) if t > current.tensor_parallel_size]
        for t in wider:
            if t == wider[-1] or run(current.replace(tensor_parallel_size=t)).fits:
                yield f"more GPUs (-tp {t}, --gpus {t})", {"tensor_parallel_size": t}
                break

    for label, changes in rungs():
        if changes is None:  # the alternative: settle for the context the rows above hold
            fit = now.max_model_len_fit
            if 0 < fit < now.max_model_len:
                shorter = current.replace(max_model_len=fit)
                out.append(
                    row(
                        f"shorter context (--max-model-len {fit})",
                        shorter,
                        run(shorter),
                        {"--max-model-len": fit},
                        alternative=True,
                    )
                )
            continue
        changed = current.replace(**changes)
        after = run(changed)
        flags = changed.flags()
        out.append(
            row(label, changed, after, {k: v for k, v in flags.items() if current.flags().get(k) != v})
        )
        current, now = changed, after
        if after.fits:
            break
    return out


def _single(spec, cfg: ServeConfig, gpu, json_: bool) -> None:
    from ..estimate import estimate
    from ._common import emit_json

    est = estimate(spec, gpu.total_bytes, cfg, gpu_name=gpu.name)
    seqs = cfg.max_num_seqs or 1
    fit: dict[str, dict[str, float | None]] = {
        "max_context_for_seqs": {"seqs": seqs, "context": est.max_context(seqs)},
        "max_seqs_for_context": {"context": est.max_model_len, "seqs": est.max_seqs(est.max_model_len)},
        "min_utilization": {
            "context": est.max_model_len,
            "seqs": seqs,
            "utilization": est.min_utilization(est.max_model_len, seqs),
        },
    }
    rows = _context_rows(
        est, spec, cfg, lambda changed: estimate(spec, gpu.total_bytes, changed, gpu_name=gpu.name)
    )
    remedies = [] if est.fits else _remedies(spec, cfg, est, gpu.total_bytes, gpu.name)
    if json_:
        out = {
            "model": spec.name,
            "serve_name": spec.serve_name,
            "gpu_ids": list(gpu.ids),
            "gpu_source": gpu.source,
            "weights_exact": spec.weights_exact,
            "hf_overrides": cfg.hf_overrides,
            **est.as_dict(),
            "what_fits": fit,
            "contexts": rows,
            "remedies": remedies,
        }
        emit_json(out)
        return
    w = "exact" if spec.weights_exact else "computed"
    click.echo(
        f"{spec.name} ({spec.serve_name}) on {gpu.count} × {gpu.name or 'GPU'} "
        f"({_gib(gpu.total_bytes)} each, {gpu.source}), TP {cfg.tensor_parallel_size}"
    )
    if cfg.hf_overrides:
        _echo_overrides(spec, cfg, cfg.hf_overrides)
    click.echo(f"Per GPU at --gpu-memory-utilization {est.utilization} ({_gib(est.requested_bytes)} budget):")
    for label, value, note in (
        ("weights", est.weights_bytes, w),
        (
            "non-torch",
            est.non_torch_bytes,
            "NCCL/all-reduce" if cfg.tensor_parallel_size > 1 else "cuBLAS, allocator",
        ),
        (
            "activation peak",
            est.activation_bytes,
            f"{est.max_num_batched_tokens} batched tokens, {est.max_num_seqs} seqs",
        ),
        ("CUDA graphs", est.cudagraph_bytes, "eager" if cfg.enforce_eager else "estimated"),
        ("KV cache pool", est.kv_pool_bytes, f"{est.kv_bytes_per_token:,} B/token, block {est.block_size}"),
        ("headroom", est.headroom_bytes, "outside the budget: CUDA context, other processes"),
    ):
        click.echo(f"  {label:<16} {value / GIB:8.2f} GiB   {note}")
    verdict = "fits" if est.fits else "does NOT fit"
    click.echo(
        f"KV cache: {est.kv_cache_tokens:,} tokens, maximum concurrency {est.max_concurrency:.2f}x "
        f"at {est.max_model_len:,} tokens: {verdict}"
    )
    click.echo("What fits:")
    click.echo(f"  largest context for {seqs} seq(s): {fit['max_context_for_seqs']['context']:,}")
    click.echo(f"  most sequences at {est.max_model_len:,} tokens: {fit['max_seqs_for_context']['seqs']}")
    u = fit["min_utilization"]["utilization"]
    click.echo(
        f"  smallest utilization for {est.max_model_len:,} × {seqs}: {u if u is not None else 'none (> 1.0)'}"
    )
    click.echo("Context table:")
    click.echo(f"  {'context':>9}  {'positions':<9}  {'KV/seq':>9}  {'concurrency':>11}  verdict")
    for r in rows:
        rope = f"YaRN ×{r['rope']['factor']:g}" if r["rope"] and r["rope"]["factor"] else "native"
        click.echo(
            f"  {r['context']:>9,}  {rope:<9}  {r['kv_gib_per_seq']:>7.2f}G  {r['max_concurrency']:>11}  "
            f"{r['verdict']}"
        )
    if (
        any(r["rope"] for r in rows) and est.max_model_len <= spec.derived_max_model_len
    ):  # else a note says it
        from ..rope import extension

        longest = extension(spec, max(r["context"] for r in rows if r["rope"]))
        click.echo(f"  YaRN rows: vLLM takes them with --allow rope-scaling's --hf-overrides; {longest.cost}")
    for note in est.notes:
        click.echo(f"  note: {note}")
    if remedies:
        click.echo("To make it fit (in this order, each row on top of the rows above, until one fits):")
        for r in remedies:
            if r["step"] == "missing":
                click.echo(f"  short by {-r['gain_gib']:.2f} GiB of KV cache")
                continue
            state = "fits" if r["fits"] else "still short"
            label = f"  or a {r['step']}" if r["alternative"] else r["step"]
            gained = "" if r["alternative"] else f"({r['gain_tokens']:+,})"
            click.echo(
                f"  {label:<52} pool {r['kv_pool_gib']:6.2f} GiB  {r['kv_cache_tokens']:>10,} tokens "
                f"{gained:<12} max len {r['max_model_len_fit']:,}  {state}"
            )


def _echo_overrides(spec, cfg: ServeConfig, overrides: str) -> None:
    """The --hf-overrides in force, and what a YaRN override costs."""
    import shlex

    from ..rope import describe, extension

    click.echo(f"With --hf-overrides {shlex.quote(overrides)}")
    yarn = describe(overrides)
    if yarn and cfg.max_model_len and cfg.max_model_len > spec.derived_max_model_len:
        ext = extension(spec, cfg.max_model_len)
        click.echo(f"  {yarn} (the model's own length is {spec.derived_max_model_len:,}): {ext.cost}")


def _shared(pairs, gpu, json_: bool) -> None:
    """Several servers on the GPUs: packed by the deployment planner (``vllm-tune plan``'s), each model
    asking for its --max-model-len (else the model's own) and --max-num-seqs (else 1), the spare memory
    turned into context."""
    from ..deploy.plan import CUDA_CONTEXT_BYTES, make_plan, need_bytes
    from ._common import emit_json

    deployment, gpus, costs = _deployment(pairs, gpu)
    plan = make_plan(deployment, gpus, costs, offline=True)

    def row(entry, inst=None) -> dict:
        cost, refusal = costs[entry.name], plan.refusal(entry.name)
        return {
            "model": entry.name,
            "gpu_ids": list(inst.gpu_ids) if inst else None,
            "gpu_memory_utilization": inst.gpu_memory_utilization if inst else None,
            "kv_cache_memory_bytes": inst.config.kv_cache_memory_bytes if inst else None,  # None: no KV
            "max_model_len": inst.max_model_len if inst else entry.needs.min_context,
            "max_num_seqs": inst.max_num_seqs if inst else entry.min_seqs,
            "min_gib": round(need_bytes(entry, cost) / GIB, 3),
            "weights_gib": round(cost.weights_bytes / GIB, 3),
            "overhead_gib": round((CUDA_CONTEXT_BYTES + cost.overhead_bytes) / GIB, 3),
            "kv_pool_gib": round(inst.kv_bytes / GIB, 3) if inst else None,
            "kv_cache_tokens": inst.kv_tokens if inst else None,
            "fits": inst is not None,
            "reason": refusal.reason if refusal else "",
        }

    models = [row(inst.entry, inst) for inst in plan.start_order()]
    models += [row(deployment.model(name)) for name in plan.unplaced]
    out = {
        "fits": plan.fits,
        "gpu": gpu.name,
        "gpu_ids": [g.id for g in gpus],
        "total_gib": round(gpu.total_bytes / GIB, 3),
        "headroom_gib": round(deployment.headroom_bytes / GIB, 3),
        "spare_gib": round(min(b.free_bytes for b in plan.budgets()) / GIB, 3),
        "reason": "; ".join(plan.problems),
        "models": models,
    }
    if json_:
        emit_json(out)
        return
    on = f"{gpu.count} × " if gpu.count > 1 else ""
    click.echo(
        f"{len(pairs)} models on {on}{gpu.name or 'GPU'} ({_gib(gpu.total_bytes)}"
        f"{' each' if gpu.count > 1 else ''}, {_gib(deployment.headroom_bytes)} kept free): "
        + ("they fit" if plan.fits else "they do NOT fit")
    )
    for m in models:
        where = f"GPU {','.join(map(str, m['gpu_ids']))}  " if gpu.count > 1 and m["fits"] else ""
        if not m["fits"]:
            click.echo(f"  {m['model']:<28} does NOT fit: {m['reason']}")
            continue
        kv = m["kv_cache_memory_bytes"]
        click.echo(
            f"  {m['model']:<28} {where}--gpu-memory-utilization {m['gpu_memory_utilization']:.2f} "
            + (f"--kv-cache-memory-bytes {kv:<11} " if kv is not None else "")
            + f"--max-model-len {m['max_model_len']:<7} --max-num-seqs {m['max_num_seqs']:<4} "
            f"(needs at least {m['min_gib']:.2f} GiB)"
        )
    if plan.instances:
        click.echo("Start them in this order; each needs its utilization × total free when it starts.")


def _deployment(pairs, gpu):
    """The estimate's servers as the planner's inputs: a deployment of them on ``gpu``'s GPUs (as the
    card, not what runs on it now), and each model's cost from the estimator at its minimum."""
    from ..deploy.costs import cost_of
    from ..deploy.plan import GpuInfo
    from ..deploy.spec import Deployment, GpuSpec, ModelEntry, Needs
    from ..estimate import estimate

    entries, costs = [], {}
    for i, (spec, cfg) in enumerate(pairs):
        name = spec.name if all(s.name != spec.name for s, _ in pairs[:i]) else f"{spec.name}-{i + 1}"
        context = cfg.max_model_len if cfg.max_model_len and cfg.max_model_len > 0 else None
        seqs = cfg.max_num_seqs or 1
        est = estimate(
            spec, gpu.total_bytes, cfg.replace(max_model_len=context, max_num_seqs=seqs), gpu_name=gpu.name
        )
        flags = (
            *(("--enforce-eager",) if cfg.enforce_eager else ()),
            *(("--hf-overrides", cfg.hf_overrides) if cfg.hf_overrides else ()),
        )
        entries.append(
            ModelEntry(
                name=name,
                model=spec.serve_name,
                port=8000 + i,
                tensor_parallel_size=cfg.tensor_parallel_size,
                kv_cache_dtype=cfg.kv_cache_dtype,
                flags=flags,
                needs=Needs(min_context=context or est.max_model_len, min_seqs=seqs, objective="context"),
            )
        )
        costs[name] = cost_of(spec, est)
    gpus = [GpuInfo(i, gpu.name, gpu.total_bytes) for i in gpu.ids]
    deployment = Deployment("estimate", tuple(entries), GpuSpec(ids=tuple(gpu.ids)))
    return deployment, gpus, costs
