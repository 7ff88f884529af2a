"""Walk every ```bash block of README.md and docs/*.md, as a new user would, on tiny local models.

The commands are read from the Markdown (markdown-it's CommonMark parser: fenced blocks with info string `bash`), so
the docs and the code cannot drift apart: renaming a flag, dropping an option from transformers, or breaking a
shipped config makes this test fail with the file, line and command.

How a command is run:
- `saisa ...` runs in this process through `modeling_saisa.cli.main` (the console script's function), in one working
  directory per session, in document order: `saisa train --stage 2 --model checkpoints/stage1` reads what the
  stage-1 command before it wrote. It must exit with status 0.
- Names that stand for things a user has (hub ids, `path/to/...`, `DIR`, `cat.jpg`, the LLaVA data files) are
  replaced by tiny local stand-ins built here: see `SUBSTITUTIONS` and `workdir`. Nothing is downloaded.
- `saisa train` gets `EXTRA_FLAGS` appended (one step, no dataloader workers), so that a 1-epoch recipe on a tiny
  dataset stays a second.
- `PARSE_ONLY` commands (minutes of timing or training, run by their own tests) are parsed by the real argument
  parser, which still catches a renamed or missing flag.
- `NOT_RUN` commands (installers, this test suite, multi-GPU launchers) are skipped, each with its reason.
A command that matches none of these fails the test: a new kind of command needs a runner or a stated reason.
"""

from __future__ import annotations

import io
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import pytest
import torch
from test_convert import make_original, tiny_llava
from tiny import tiny_config

from modeling_saisa import SaisaForConditionalGeneration, SaisaProcessor
from modeling_saisa.tokenizers import build_word_tokenizer, split_words
from modeling_saisa.training import config_path, synthetic

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Placeholder in the docs -> key of the tiny stand-in built by `workdir` (whole shell words only).
SUBSTITUTIONS = {
    "path/to/saisa-vicuna": "model",
    "path/to/checkpoint": "model",
    "DIR": "model",
    "composed/": "stage1_init",
    "yuanqianhao/saisa-vicuna": "original_vicuna",
    "yuanqianhao/saisa-llama3": "original_llama3",
    "llava-hf/llava-1.5-7b-hf": "llava_hf",
}
# Paths inside the repository, written relative to its root in the docs.
REPO_PATHS = {"modeling_saisa/training/configs/": str(config_path()) + os.sep}
EXTRA_FLAGS = {"train": ["--max-steps", "1", "--dataloader-num-workers", "0", "--disable-tqdm", "true"]}
CHAT_INPUT = "what color is it\n"  # typed into `saisa chat`, then end of input

PARSE_ONLY = {
    "saisa demo": "trains for ~80 s; tests/test_training.py::test_saisa_demo_quick runs `saisa demo --quick`",
    "saisa bench": "timed benchmarks of 1-20 minutes; tests/test_bench.py runs `saisa bench --quick` and the "
    "`--visual-policy` and `--reuse` benchmarks on tiny shapes",
    "python benchmarks/bench.py": "the same benchmark as a script (same argument parser as `saisa bench`)",
    "saisa lc": "40 calibration prefills per layer of a 7B llava-hf model; "
    "tests/test_layer_contribution.py::test_cli_writes_order_preset_and_plot runs `saisa lc` and then `saisa generate "
    "--visual-policy` with its preset on a tiny llava-hf directory",
    "saisa generate --model path/to/llava-1.5-7b-hf": "reads the preset the `saisa lc` line above writes (run together "
    "by tests/test_layer_contribution.py::test_cli_writes_order_preset_and_plot)",
}
NOT_RUN = {
    "pip install": "installs packages; the environment running this test already has them",
    "python3 -m pytest": "is this test suite",
    "accelerate launch": "multi-GPU / multi-node launch (8 GPUs, DeepSpeed or FSDP); the one-CPU accelerate launch "
    "is run by tests/test_training.py::test_accelerate_launch_runs_a_training_step_in_one_cpu_process",
    "torchrun": "multi-GPU / multi-node launch (8 GPUs, DeepSpeed or FSDP); no GPU in the test environment",
}


@dataclass
class Command:
    doc: str
    line: int
    text: str

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def bash_commands(path: Path, name: str | None = None) -> list[Command]:
    """Every command of every ```bash block in `path`: continuation lines joined, comments and blanks dropped,
    `a && b` split into its commands."""
    from markdown_it import MarkdownIt

    commands = []
    for token in MarkdownIt("commonmark").parse(path.read_text(encoding="utf-8")):
        if token.type != "fence" or token.info.strip().split(" ")[0] != "bash":
            continue
        first_line = token.map[0] + 2  # 1-based line of the block's first content line
        joined, start = "", None
        for offset, raw in enumerate(token.content.splitlines()):
            if start is None:
                start = first_line + offset
            joined += raw.rstrip().removesuffix("\\") + " " if raw.rstrip().endswith("\\") else raw
            if raw.rstrip().endswith("\\"):
                continue
            words = shlex.split(joined, comments=True)
            while words:
                part = words[: words.index("&&")] if "&&" in words else words
                words = words[len(part) + 1 :]
                if part:
                    commands.append(Command(name or str(path.relative_to(ROOT)), start, shlex.join(part)))
            joined, start = "", None
    return commands


ALL = {str(p.relative_to(ROOT)): bash_commands(p) for p in DOCS}


def _classify(command: Command) -> tuple[str, str]:
    for table, kind in ((NOT_RUN, "skip"), (PARSE_ONLY, "parse")):
        for prefix in table:
            if command.text == prefix or command.text.startswith(prefix + " "):
                return kind, prefix
    if command.text.startswith("saisa "):
        return "run", ""
    raise AssertionError(f"{command.where}: no runner and no stated reason to skip it; add one to this test")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> dict[str, str]:
    """One working directory with the stand-ins: built once per session (a few seconds), shared by every doc."""
    root = tmp_path_factory.mktemp("walkthrough")
    words = split_words("A chat USER: ASSISTANT: what is in the image compare them tell me a joke") + [
        *synthetic.vocabulary()
    ]
    tokenizer = build_word_tokenizer(words, vocab_size=99)
    stands = {}
    for name, shared in (("model", False), ("stage1_init", True)):
        folder = root / "stand-ins" / name
        torch.manual_seed(0)
        SaisaForConditionalGeneration(tiny_config(shared_projector=shared)).save_pretrained(folder)
        SaisaProcessor.from_model_config(tiny_config(), tokenizer).save_pretrained(folder)
        stands[name] = str(folder)
    originals = root / "stand-ins" / "originals"
    originals.mkdir()
    stands["original_vicuna"] = str(make_original(originals, "saisa-vicuna", kind="vicuna")[0])
    stands["original_llama3"] = str(make_original(originals, "saisa-llama3", kind="llama_3", seed=1)[0])
    tiny_llava(root / "stand-ins" / "llava-hf", hub_layout=True)
    stands["llava_hf"] = str(root / "stand-ins" / "llava-hf")

    cwd = root / "cwd"
    cwd.mkdir()
    for name, color in (("cat.jpg", (200, 120, 40)), ("a.jpg", (220, 30, 30)), ("b.jpg", (30, 30, 220))):
        PIL.Image.new("RGB", (12, 9), color).save(cwd / name)
    data = synthetic.write_llava_dataset(cwd / "data", synthetic.make_samples(6, seed=2))
    for name in ("blip_laion_cc_sbu_558k.json", "llava_v1_5_mix665k.json"):
        shutil.copy(data, cwd / name)
    return {"cwd": str(cwd), **stands}


def _argv(command: Command, stands: dict[str, str]) -> list[str]:
    words = shlex.split(command.text)
    out = []
    for word in words:
        if word in SUBSTITUTIONS:
            word = stands[SUBSTITUTIONS[word]]
        for prefix, real in REPO_PATHS.items():
            if word.startswith(prefix):
                word = real + word[len(prefix) :]
        out.append(word)
    return out


def _run(command: Command, stands: dict[str, str], capsys, monkeypatch) -> None:
    from modeling_saisa.cli import build_parser, main

    kind, prefix = _classify(command)
    if kind == "skip":
        return
    argv = _argv(command, stands)
    if kind == "parse":
        if argv[0] == "python":  # a script sharing `saisa bench`'s options
            argv = ["saisa", "bench", *argv[2:]]
        build_parser().parse_args(argv[1:])  # SystemExit(2) on a bad flag
        return
    argv = argv[1:] + EXTRA_FLAGS.get(argv[1], [])
    if argv[0] == "chat":
        monkeypatch.setattr("sys.stdin", io.StringIO(CHAT_INPUT))
    status = main(argv)
    captured = capsys.readouterr()
    assert status == 0, f"{command.where}\n  exit status {status}; stderr ends: {captured.err[-800:]}"
    assert "error" not in captured.err.lower().replace("stderr", ""), f"{command.where}\n{captured.err[-800:]}"


@pytest.mark.parametrize("doc", sorted(ALL), ids=str)
def test_doc_commands_run(doc, workdir, capsys, monkeypatch):
    """Every command of `doc`, in order, in the shared working directory."""
    monkeypatch.chdir(workdir["cwd"])
    for command in ALL[doc]:
        _run(command, workdir, capsys, monkeypatch)


def test_the_walkthrough_covers_the_docs_and_the_allow_list_is_used():
    commands = [c for doc in ALL.values() for c in doc]
    assert {c.doc for c in commands} >= {"README.md", "docs/usage.md", "docs/training.md", "docs/conversion.md"}
    kinds = [_classify(c) for c in commands]
    assert sum(kind == "run" for kind, _ in kinds) >= 12
    used = {prefix for _, prefix in kinds}
    assert used >= set(PARSE_ONLY) | set(NOT_RUN), (
        f"allow-list entries no doc uses: {set(PARSE_ONLY) | set(NOT_RUN) - used}"
    )
    words = {w for c in commands for w in shlex.split(c.text)}
    assert set(SUBSTITUTIONS) <= words, f"substitutions no doc uses: {set(SUBSTITUTIONS) - words}"


def test_a_broken_doc_command_fails(tmp_path, workdir, capsys, monkeypatch):
    """The runner itself: a doc with a flag transformers dropped fails, naming the line."""
    doc = tmp_path / "broken.md"
    doc.write_text(
        "# x\n\n```bash\nsaisa train --stage 1 --model composed/ --data llava_v1_5_mix665k.json \\\n"
        "    --image-folder data/ --output-dir out --warmup-ratio 0.03\n```\n"
    )
    monkeypatch.chdir(workdir["cwd"])
    (command,) = bash_commands(doc, name=doc.name)
    with pytest.raises(
        AssertionError, match=r"(?s)broken.md:4: saisa train .*exit status 2.*--warmup-ratio no longer exists"
    ):
        _run(command, workdir, capsys, monkeypatch)
