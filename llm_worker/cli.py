"""``llm-worker``: the worker's commands, for a Pod, a VM or a workstation (``pip install -e .``, or
``make install``, puts it in the environment).

    llm-worker serve [MODEL] [--host 0.0.0.0] [--port 8000] [--max-model-len 4096 ...]
    llm-worker bench [options of python -m benchmarks.throughput]
    llm-worker conformance [options of python -m benchmarks.conformance]
    llm-worker finetune --data FILE --out DIR [options of python -m llm_worker.model.finetune]

``serve`` runs the HTTP server (``python -m llm_worker.doors.server``) with ``MODEL`` as
``BASE_MODEL``. Every setting is a flag beside its environment variable (``--dtype bfloat16`` or
``DTYPE=bfloat16``; a flag wins); ``--help`` lists them with their defaults. The secrets
(``HF_TOKEN``, ``API_KEY``) are read from the environment only: a flag would show them in the
process list.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from llm_worker.settings import SECRETS, ServerSettings, Settings, SettingsError

PASSED_ON = {
    "bench": ("benchmarks.throughput", "the engine's throughput against the seed's way (python -m benchmarks.throughput)"),
    "conformance": ("benchmarks.conformance", "the engine's answers against transformers' and PEFT's (python -m benchmarks.conformance)"),
    "finetune": ("llm_worker.model.finetune", "train a LoRA adapter on Alpaca-format data (python -m llm_worker.model.finetune)"),
}


def setting_flags(parser: argparse.ArgumentParser) -> list[str]:
    """A ``--flag`` for each setting of the worker and the server (not the secrets); returns their names."""
    names = []
    for model in (Settings, ServerSettings):
        group = parser.add_argument_group(f"{model.__name__.removesuffix('Settings') or 'worker'} settings (flag or environment variable)")
        for name, field in model.model_fields.items():
            if name in SECRETS or name == "base_model" or name in names:
                continue
            default = field.default
            shown = "unset" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
            switch = {"nargs": "?", "const": "1"} if isinstance(default, bool) else {}  # --merge-lora alone is --merge-lora 1
            group.add_argument(
                f"--{name.replace('_', '-')}", dest=name, metavar=name.upper(), default=None, **switch,
                help=f"{(field.description or '').rstrip('.')}. Default: {shown}.".replace("%", "%%"),
            )
            names.append(name)
    return names


def serve_parser() -> tuple[argparse.ArgumentParser, list[str]]:
    parser = argparse.ArgumentParser(
        prog="llm-worker serve", description="The HTTP server: the seed's REST API, OpenAI's and Anthropic's, over one model.",
    )
    parser.add_argument("model", nargs="?", help="BASE_MODEL: a Hub id or a local folder. Default: the embedded SmolLM2-135M-Instruct.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface). Default: 127.0.0.1.")
    parser.add_argument("--port", type=int, default=8000, help="Default: 8000.")
    return parser, setting_flags(parser)


def serve(argv: Sequence[str]) -> int:
    parser, names = serve_parser()
    args = parser.parse_args(argv)
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.model is not None:
        given["base_model"] = args.model
    os.environ.update({name.upper(): value for name, value in given.items()})
    try:  # every setting checked before anything loads: a wrong flag is a message, not a server that fails later
        Settings()
        ServerSettings()
    except SettingsError as err:
        for problem in err.problems:
            print(f"llm-worker serve: {problem}", file=sys.stderr)
        return 2
    from llm_worker.doors.server import main as server

    return server(["--host", args.host, "--port", str(args.port)])


def passed_on(module: str) -> Callable[[Sequence[str]], int]:
    def run(argv: Sequence[str]) -> int:
        import importlib

        main = importlib.import_module(module).main
        sys.argv = [f"llm-worker {module}", *argv]
        return main(list(argv)) or 0

    return run


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"serve": serve, **{name: passed_on(module) for name, (module, _) in PASSED_ON.items()}}
    if not argv or argv[0] not in commands:
        parser = argparse.ArgumentParser(prog="llm-worker", description=__doc__.split("\n\n")[0])
        choices = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
        choices.add_parser("serve", help="the HTTP server (llm-worker serve --help: every setting)")
        for name, (_, what) in PASSED_ON.items():
            choices.add_parser(name, help=what)
        parser.parse_args(argv)  # prints the usage, and exits 2 on an unknown command
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
