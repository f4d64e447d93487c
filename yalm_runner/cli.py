"""``yalm-runner``: the command line. Thin: each command parses, makes one library call, reports.

Every flag can also come from an environment variable ``YALM_RUNNER_<FLAG>`` (shown in
``--help``). Library errors print as one line on stderr and exit 1; ``--verbose`` shows the
traceback. Results go to files or stdout, progress and summaries to stderr.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch

from yalm_runner import __version__, settings
from yalm_runner.errors import YalmError

EXAMPLES = {
    "convert": "example: yalm-runner convert yalm100b_checkpoint/ yalm100b-int4/ --quantize int4 "
    "  (or --dtype bf16 for a 16-bit store)",
    "fetch": "example: yalm-runner fetch yalm100b-int4/ --quantize int4   (after any interruption, "
    "run the same command again to continue)",
    "generate": "example: yalm-runner generate -m store/ --input prompts.jsonl --output out.jsonl "
    "-n 64 --stop $'\\n'   (after a crash, run the same command again to resume)",
    "score": "example: yalm-runner score -m store/ --input answers.jsonl --output scores.jsonl "
    '  (each line: {"prefix": ..., "candidates": [...]})',
    "inspect": "example: yalm-runner inspect store/",
    "make-tiny": "example: yalm-runner make-tiny tiny-release/ --layers 2 --hidden 64 --heads 4",
    "bench": "example: yalm-runner bench --shape 13b --gpu-memory 8GiB --batch-sizes 8,32,64",
    "quality": "example: yalm-runner quality --reference store-bf16/ --candidate store-int4/ "
    "--prompts prompts.jsonl --text sample.txt --signals examples/signals.jsonl",
}


def _env(flag: str, default: object = None) -> object:
    return os.environ.get("YALM_RUNNER_" + flag.upper().replace("-", "_"), default)


def _add(parser: argparse.ArgumentParser, *names: str, **kwargs: object) -> None:
    """Add an option whose default may come from ``YALM_RUNNER_<FLAG>``."""
    flag = next(name for name in names if name.startswith("--")).removeprefix("--")
    env_name = "YALM_RUNNER_" + flag.upper().replace("-", "_")
    default = _env(flag, kwargs.pop("default", None))
    if kwargs.get("action") in ("store_true", "store_false"):
        given = str(default).lower() in {"1", "true", "yes"} if default is not None else False
        default = given if kwargs["action"] == "store_true" else not given
    kwargs["help"] = f"{kwargs.get('help', '')} [env {env_name}]".strip()
    if kwargs.pop("required", False) and default is None:
        kwargs["required"] = True
    parser.add_argument(*names, default=default, **kwargs)


# The runner's settings a command takes; each option is defined once, in yalm_runner.settings,
# which the pipeline's YAML uses too.
BUDGETS = (
    "gpu_memory", "cpu_memory", "weights_on", "kv_on", "kv_bits", "kv_layout", "kv_attention",
    "overlap",
)  # fmt: skip
RATES = ("link_gbps", "disk_gbps")  # the machine's, which the planner compares plans at
# Scoring keeps no KV cache between passes: the KV settings would do nothing there.
WEIGHT_BUDGETS = tuple(name for name in BUDGETS if not name.startswith("kv_"))
SAMPLING = ("greedy", "temperature", "top_p", "top_k", "max_new_tokens", "seed")


def _add_settings(parser: argparse.ArgumentParser, names, **defaults: object) -> None:
    """Add the options of the runner settings ``names`` (``defaults`` for this command)."""
    for flags, options in settings.cli_options(names, **defaults):
        _add(parser, *flags, **options)


def _kv_widths(text: str) -> tuple[int, ...]:
    from yalm_runner.errors import ConfigError

    try:
        widths = tuple(
            settings.check(settings.RunnerSettings, "kv_bits", part, strict=False)
            for part in text.split(",")
            if part.strip()
        )
    except settings.ValidationError:
        widths = ()
    if not widths:
        *most, last = settings.KV_BITS
        choices = f"{', '.join(map(str, most))} or {last}"
        raise ConfigError(f"--kv-bits takes {choices} (a comma list), got {text!r}")
    return widths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yalm-runner", description="Run Yandex's YaLM-100B on small machines."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show tracebacks on errors",
        )
        return sub

    convert = command("convert", "Convert the released checkpoint folder into a store.")
    convert.add_argument("src", type=Path, help="release folder (weights/, vocab/)")
    convert.add_argument("dst", type=Path, help="store folder to create")
    _add(
        convert,
        "--num-heads",
        type=int,
        default=None,
        help="attention heads (default: what the release records, else YaLM-100B's 128)",
    )
    _add(
        convert,
        "--dtype",
        type=settings.option_parser("dtype"),
        default="auto",
        help="store dtype: bf16, fp16 or fp32 (auto: the release's own)",
    )
    _add(convert, "--max-positions", type=int, default=1024, help="rotary table size")
    _add(
        convert,
        "--quantize",
        choices=["int8", "int4"],
        help="compress the layers' matrices: int8 per output channel or 4-bit groups",
    )
    _add(convert, "--group-size", type=int, default=64, help="inputs per 4-bit group (int4)")

    fetch = command(
        "fetch",
        "Download the release and convert it into a store part by part, deleting each raw file "
        "once converted (disk: the store plus about two release files). Resumable.",
    )
    fetch.add_argument("dst", type=Path, help="store folder to create (or to continue)")
    _add(fetch, "--source", default=None, help="release URL or mirror (default: Yandex's own)")
    for action in convert._actions:
        if action.dest in {"num_heads", "dtype", "max_positions", "quantize", "group_size"}:
            fetch._add_action(action)
    _add(fetch, "--keep-release", type=Path, metavar="DIR", help="keep the raw release files here")
    _add(fetch, "--parallel", type=int, default=2, help="files downloading at once")

    generate = command("generate", "Continue the prefixes of a JSONL file.")
    _add(generate, "-m", "--model", type=Path, required=True, help="store folder")
    _add(generate, "--input", type=Path, required=True, help="JSONL with a 'prefix' per line")
    _add(generate, "--output", type=Path, required=True, help="JSONL to write")
    _add_settings(generate, ("device", "dtype", "batch_size", *SAMPLING, *BUDGETS, *RATES))
    _add(generate, "--no-verify", action="store_true", help="skip weight checksums")
    stop_env = _env("stop")
    generate.add_argument(
        "--stop",
        action="append",
        metavar="STR",
        default=None if stop_env is None else [stop_env],
        help="end a row once its new text contains STR (repeatable; a row's own 'stop' list "
        "adds to these) [env YALM_RUNNER_STOP, one string]",
    )
    _add_settings(generate, ("checkpoint_every", "kv_checkpoint_interval"))
    _add(
        generate,
        "--no-resume",
        action="store_true",
        help="discard OUTPUT.state.json and OUTPUT from an earlier run and start over",
    )

    score = command(
        "score",
        "Score candidate answers after each prefix of a JSONL file: their log-probabilities "
        "(exit 3 if some lines could not be scored).",
    )
    _add(score, "-m", "--model", type=Path, required=True, help="store folder")
    _add(score, "--input", type=Path, required=True, help="JSONL: 'prefix' and 'candidates'")
    _add(score, "--output", type=Path, required=True, help="JSONL to write")
    _add_settings(score, ("device", "dtype", "batch_size", *WEIGHT_BUDGETS, *RATES))
    _add(score, "--no-verify", action="store_true", help="skip weight checksums")

    inspect = command(
        "inspect",
        "Show a store's shape and sizes; with budgets, the memory plan and predicted step time "
        "(a dry run: nothing is loaded).",
    )
    inspect.add_argument("store", type=Path)
    _add(inspect, "--device", default="cuda", help="the device to plan for: cuda or cpu")
    _add_settings(inspect, ("dtype", "batch_size"))
    _add(inspect, "--prompt-len", type=int, default=128, help="longest prompt, in tokens")
    _add_settings(inspect, ("max_new_tokens",))
    _add(inspect, "--rows", type=int, help="how many prompts there are (caps the batch)")
    _add_settings(inspect, BUDGETS + RATES)

    tiny = command("make-tiny", "Write a tiny random YaLM checkpoint in the release layout.")
    tiny.add_argument("dst", type=Path)
    _add(tiny, "--layers", type=int, default=2)
    _add(tiny, "--embedding", type=int, default=32)
    _add(tiny, "--hidden", type=int, default=64)
    _add(tiny, "--heads", type=int, default=4)
    _add(tiny, "--ffn", type=int, default=172)
    _add(tiny, "--seed", type=int, default=0)
    vocab = tiny.add_mutually_exclusive_group()
    _add(vocab, "--vocab", type=Path, help="a .sp file to use (default: train a small one)")
    _add(vocab, "--yalm-vocab", action="store_true", help="use the real YaLM vocabulary shipped")
    _add(tiny, "--vocab-size", type=int, default=1000, help="size of the trained vocabulary")
    _add(tiny, "--dtype", type=settings.option_parser("dtype"), default="bf16")
    _add(tiny, "--tensor-parallel", type=int, default=1, help="write this many TP shards")
    quality = command(
        "quality", "Compare a (compressed) store's predictions with a reference store's."
    )
    _add(quality, "--reference", type=Path, required=True, help="reference store (16-bit)")
    _add(quality, "--candidate", type=Path, help="store to judge (default: the reference)")
    _add_settings(quality, ("kv_bits",))
    _add(quality, "-n", "--new-tokens", type=int, default=16, help="decode steps per prompt")
    _add(quality, "--prompts", type=Path, required=True, help="JSONL with a 'prefix' per line")
    _add(quality, "--text", type=Path, help="plain text for perplexity")
    _add_settings(quality, ("device", "dtype"), device="cpu", dtype="fp32")
    _add(quality, "--signals", type=Path, help="JSONL with 'prefix' and 'candidates': top answers")
    _add(quality, "--format", choices=["table", "json"], default="table")
    _add(quality, "--no-verify", action="store_true", help="skip weight checksums")

    bench = command("bench", "Measure streaming against the host-to-device link (needs CUDA).")
    _add(bench, "--shape", default="13b", help="13b, yalm-100b or tiny")
    _add(bench, "--layers", type=int, help="override the shape's layer count")
    _add(bench, "--batch-sizes", default="8,32,64", help="comma-separated batch sizes")
    _add(bench, "--prompt-len", type=int, default=128)
    _add(bench, "-n", "--max-new-tokens", type=int, default=32)
    _add(bench, "--gpu-memory", help="GPU budget, e.g. 8GiB")
    _add(bench, "--cpu-memory", help="pinned RAM budget, e.g. 64GiB")
    _add(bench, "--json", type=Path, help="write the figures here too")
    _add(
        bench,
        "--peers",
        default="",
        help="also run these under the same workload: accelerate,zero (needs --gpu-memory)",
    )
    _add(bench, "--uncapped-peers", help="peers of the uncapped comparison (default: --peers)")
    # Options that only some runs use have no default here: given to a run they would not
    # change, the bench refuses them (bench.comparison.DEFAULTS holds what unset means).
    _add(bench, "--uncapped-batch", type=int, help="batch of the uncapped comparison (32)")
    _add(bench, "--max-batch", type=int, help="largest batch the planner and cap search try (256)")
    _add(
        bench,
        "--kv-bits",
        help="also run ours at the planner's batch with the KV cache in pinned RAM at these "
        "widths (a comma list of 16, 8, 4; with --peers, 16 unless given)",
    )
    _add_settings(bench, ("kv_layout",), kv_layout=None)  # None: not given (refused if idle)
    _add(
        bench,
        "--peer-timeout",
        type=float,
        help="seconds per peer, its whole batch search under the cap included (900)",
    )
    _add(bench, "--disk", type=Path, help="also measure the drive and our disk tier in this dir")
    _add(bench, "--disk-layers", type=int, help="layers in the disk-tier store (8)")
    _add(bench, "--disk-file", help="size of the drive's sequential-read file (4GiB)")
    _add(
        bench,
        "--kv-batches",
        help="also run each --kv-bits width at these batch sizes (a comma list), the KV cache "
        "where the planner put it at its own batch",
    )
    _add(bench, "--quantize", choices=["int8", "int4"], help="ours on compressed weights")
    _add(bench, "--group-size", type=int, help="int4 group size (64)")
    _add(bench, "--device", default="cuda", help="cuda; cpu runs ours alone (a smoke run)")
    return parser


def _cmd_bench(args: argparse.Namespace) -> int:
    from yalm_runner.bench.comparison import run_bench
    from yalm_runner.errors import ConfigError
    from yalm_runner.offload import parse_bytes
    from yalm_runner.quant import Quantization

    batches = [int(size) for size in str(args.batch_sizes).split(",") if size.strip()]
    if args.group_size is not None and args.quantize != "int4":
        raise ConfigError("--group-size does nothing without --quantize int4")
    quantization = (
        Quantization(args.quantize, args.group_size or 64) if args.quantize is not None else None
    )
    kv_batches = str(args.kv_batches or "").split(",")
    if not all(size.strip().isdigit() for size in kv_batches if size.strip()):
        raise ConfigError(f"--kv-batches takes batch sizes (a comma list), got {args.kv_batches!r}")
    run_bench(
        args.shape,
        batches,
        args.prompt_len,
        args.max_new_tokens,
        parse_bytes(args.gpu_memory) if args.gpu_memory else None,
        parse_bytes(args.cpu_memory) if args.cpu_memory else None,
        args.layers,
        args.json,
        peers=tuple(name.strip() for name in str(args.peers).split(",") if name.strip()),
        uncapped_peers=None
        if args.uncapped_peers is None
        else tuple(name.strip() for name in str(args.uncapped_peers).split(",") if name.strip()),
        uncapped_batch=args.uncapped_batch,
        max_batch=args.max_batch,
        kv_bits=None if args.kv_bits is None else _kv_widths(args.kv_bits),
        kv_layout=args.kv_layout,
        peer_timeout_s=args.peer_timeout,
        disk_dir=args.disk,
        disk_layers=args.disk_layers,
        disk_file_bytes=None if args.disk_file is None else parse_bytes(args.disk_file),
        device=args.device,
        kv_batches=tuple(int(size) for size in kv_batches if size.strip()),
        quantization=quantization,
    )
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from yalm_runner.convert import convert_release, parse_dtype
    from yalm_runner.quant import Quantization

    dtype = None if args.dtype == "auto" else parse_dtype(args.dtype)
    quantization = Quantization(args.quantize, args.group_size) if args.quantize else None
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} parts"),
        TimeRemainingColumn(),
        transient=False,
        console=_stderr_console(),
    ) as progress:
        task = progress.add_task("converting", total=None)

        def on_part(report) -> None:
            progress.update(
                task,
                total=report.total,
                completed=report.index + 1,
                description=f"wrote {report.part}",
            )

        manifest = convert_release(
            args.src,
            args.dst,
            num_heads=args.num_heads,
            dtype=dtype,
            max_positions=args.max_positions,
            quantization=quantization,
            on_part=on_part,
        )
    print(manifest.parent)
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    from yalm_runner.convert import parse_dtype
    from yalm_runner.fetch import fetch_release
    from yalm_runner.quant import Quantization
    from yalm_runner.release import PUBLIC_URL, YALM_100B_HEADS

    with _fetch_monitor() as monitor:
        manifest = fetch_release(
            args.dst,
            source=args.source or PUBLIC_URL,
            num_heads=YALM_100B_HEADS if args.num_heads is None else args.num_heads,
            dtype=None if args.dtype in (None, "auto") else parse_dtype(args.dtype),
            max_positions=args.max_positions,
            quantization=Quantization(args.quantize, args.group_size) if args.quantize else None,
            keep_release=args.keep_release,
            parallel=args.parallel,
            monitor=monitor,
        )
    print(manifest.parent)
    return 0


def _fetch_monitor():
    """A progress bar (bytes, rate, ETA) on a terminal, plain lines otherwise."""
    from yalm_runner.progress import FetchProgress

    return FetchProgress(_stderr_console())


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _cmd_generate(args: argparse.Namespace) -> int:
    from yalm_runner.config import SamplingParams
    from yalm_runner.offload import OffloadPolicy
    from yalm_runner.runner import GenerationInterrupted, generate_file
    from yalm_runner.session import resolve_devices

    chosen = settings.from_args(args)
    devices = resolve_devices(chosen.device)  # once: the runner and the session take the list
    device = devices[0]
    for each in devices:
        if each.type == "cuda":
            torch.cuda.reset_peak_memory_stats(each)
    started = time.perf_counter()
    try:
        stats = generate_file(
            args.model,
            args.input,
            args.output,
            sampling=SamplingParams.from_settings(chosen),
            max_new_tokens=chosen.max_new_tokens,
            device=devices,
            dtype=chosen.torch_dtype(),
            batch_size=chosen.batch_size,
            policy=OffloadPolicy.from_settings(chosen),
            verify=not args.no_verify,
            stop=tuple(args.stop or ()),
            checkpoint_every=chosen.checkpoint_every,
            kv_checkpoint_interval_s=chosen.kv_checkpoint_interval,
            resume=not args.no_resume,
            notify=lambda message: print(f"yalm-runner generate: {message}", file=sys.stderr),
        )
    except GenerationInterrupted as exc:
        print(f"yalm-runner generate: {exc}", file=sys.stderr)
        return 128 + exc.signum
    elapsed = time.perf_counter() - started
    print(
        f"{stats.rows} rows, {stats.new_tokens} new tokens in {elapsed:.1f} s; "
        f"generation {stats.tokens_per_s:.1f} tokens/s "
        f"(prefill {stats.prefill_s:.2f} s, decode {stats.decode_s:.2f} s); "
        f"moved {stats.bytes_moved / 1e9:.2f} GB over the host-device link "
        f"({stats.bytes_moved / 1e9 / max(elapsed, 1e-9):.2f} GB/s); "
        f"peak RSS {_peak_rss_gib():.2f} GiB"
        + (
            f"; peak GPU {max(map(torch.cuda.max_memory_allocated, devices)) / 2**30:.2f} GiB"
            + (f" of the {args.gpu_memory} budget" if args.gpu_memory else "")
            if device.type == "cuda"
            else ""
        ),
        file=sys.stderr,
    )
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from yalm_runner.offload import OffloadPolicy
    from yalm_runner.runner import GenerationInterrupted
    from yalm_runner.scorefile import score_file

    chosen = settings.from_args(args)
    started = time.perf_counter()
    try:
        report = score_file(
            args.model,
            args.input,
            args.output,
            device=chosen.device,
            dtype=chosen.torch_dtype(),
            batch_size=chosen.batch_size,
            policy=OffloadPolicy.from_settings(chosen),
            verify=not args.no_verify,
            notify=lambda message: print(f"yalm-runner score: {message}", file=sys.stderr),
        )
    except GenerationInterrupted as exc:
        print(f"yalm-runner score: {exc}", file=sys.stderr)
        return 128 + exc.signum
    for line_no, reason in report.failed:
        print(f"yalm-runner score: {args.input} line {line_no}: {reason}", file=sys.stderr)
    elapsed = time.perf_counter() - started
    stats = report.stats
    print(
        f"{report.scored} prompts scored, {len(report.failed)} failed in {elapsed:.1f} s; "
        f"{stats.prompt_tokens} tokens in {stats.forward_passes} passes ({stats.prefill_s:.2f} s); "
        f"moved {stats.bytes_moved / 1e9:.2f} GB over the host-device link; "
        f"peak RSS {_peak_rss_gib():.2f} GiB",
        file=sys.stderr,
    )
    return 3 if report.failed else 0


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _cmd_inspect(args: argparse.Namespace) -> int:

    from yalm_runner.checkpoint import ModelStore
    from yalm_runner.offload import OffloadPolicy
    from yalm_runner.planning import plan_memory
    from yalm_runner.runner import describe_store
    from yalm_runner.session import default_dtype
    from yalm_runner.steptime import BatchTime, machine_class

    store = ModelStore.open(args.store)
    print(describe_store(store))
    device = torch.device(args.device)  # planning only: the device need not be here
    chosen = settings.from_args(args)
    dtype = chosen.torch_dtype() or default_dtype(store, device)
    # The machine the prediction is for (the policy's rates) is the one the plan is chosen for.
    policy = OffloadPolicy.from_settings(chosen)
    plan = plan_memory(
        store,
        device,
        dtype,
        policy,
        batch_size=chosen.batch_size,
        max_context=min(args.prompt_len + chosen.max_new_tokens, store.config.max_positions),
        prompt_tokens=args.prompt_len,
        rows=args.rows,
    )
    print(f"plan on {device.type} in {str(dtype).removeprefix('torch.')}: {plan.describe()}")
    if device.type != "cuda":
        print("no prediction for a CPU-only plan: the step-time model's rates are a GPU's")
        return 0
    rates = policy.rates()
    step, prefill = plan.predict_step(rates), plan.predict_prefill(rates)
    batch = BatchTime(plan.batch_size, chosen.max_new_tokens, step, prefill)
    print(
        f"PREDICTION (not a measurement) for {machine_class(rates)}, device-side rates as an "
        "H200 measured them (docs/benchmarks.md):"
    )
    print("\n".join(batch.lines()))
    return 0


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from yalm_runner.convert import parse_dtype
    from yalm_runner.tiny import TinySpec, make_tiny

    spec = TinySpec(
        num_layers=args.layers,
        embedding_size=args.embedding,
        hidden_size=args.hidden,
        num_heads=args.heads,
        ffn_size=args.ffn,
        seed=args.seed,
        dtype=parse_dtype(args.dtype),
        tensor_parallel=args.tensor_parallel,
    )
    vocab = args.vocab
    if args.yalm_vocab:
        from yalm_runner.vocab import bundled_vocab_path

        vocab = bundled_vocab_path()
    config = make_tiny(args.dst, spec, vocab=vocab, vocab_size=args.vocab_size)
    print(args.dst)
    print(
        f"{config.num_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}; "
        f"{config.num_heads} heads (recorded in the release); convert with: yalm-runner convert "
        f"{args.dst} STORE",
        file=sys.stderr,
    )
    return 0


def _cmd_quality(args: argparse.Namespace) -> int:
    from yalm_runner.convert import parse_dtype
    from yalm_runner.errors import ConfigError
    from yalm_runner.quality import compare_files
    from yalm_runner.session import resolve_device

    if args.candidate is None and args.kv_bits == 16:
        raise ConfigError("nothing to compare: give --candidate, or --kv-bits 8 or 4")
    report = compare_files(
        args.reference,
        args.candidate or args.reference,
        args.prompts,
        args.text,
        args.signals,
        device=resolve_device(args.device),
        dtype=parse_dtype(args.dtype),
        verify=not args.no_verify,
        kv_bits=args.kv_bits,
        new_tokens=args.new_tokens,
    )
    print(report.to_json() if args.format == "json" else report.table())
    return 0


COMMANDS = {
    "convert": _cmd_convert,
    "fetch": _cmd_fetch,
    "generate": _cmd_generate,
    "score": _cmd_score,
    "inspect": _cmd_inspect,
    "make-tiny": _cmd_make_tiny,
    "bench": _cmd_bench,
    "quality": _cmd_quality,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except YalmError as exc:
        if args.verbose:
            raise
        print(f"yalm-runner {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"yalm-runner {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`yalm-runner inspect STORE | head`): nothing is wrong with the
        # command. Point stdout at /dev/null so that the interpreter's final flush is quiet, and
        # exit as a process killed by SIGPIPE would.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
