"""The `autoresearch` command line: help, entry points, and `prepare` pass-through.

Checked both in-process (click's CliRunner) and as a real program, because the console
script and `python -m runner.cli` are what people and CI actually run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import runner.cli
from runner.cli import autoresearch
from runner.paths import REPO_ROOT

SUBCOMMANDS = ["prepare"]


def cli_command() -> list[str]:
    """The installed console script if there is one, else `python -m runner.cli`."""
    for script in (Path(sys.executable).parent / "autoresearch", REPO_ROOT / ".venv" / "bin" / "autoresearch"):
        if script.is_file():
            return [str(script)]
    return [sys.executable, "-m", "runner.cli"]


def test_help_in_process_lists_subcommands_and_workflow() -> None:
    result = CliRunner().invoke(autoresearch, ["--help"])
    assert result.exit_code == 0, result.output
    for name in SUBCOMMANDS:
        assert name in result.output
    assert "autoresearch trial target/train.py" in result.output
    assert "val_bpb" in result.output


def test_help_as_program() -> None:
    proc = subprocess.run([*cli_command(), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Usage: autoresearch" in proc.stdout
    for name in SUBCOMMANDS:
        assert name in proc.stdout


def test_module_entry_point() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "runner.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "prepare" in proc.stdout


def test_prepare_help_lists_sources_and_options() -> None:
    result = CliRunner().invoke(autoresearch, ["prepare", "--help"])
    assert result.exit_code == 0, result.output
    for text in ["shakespeare", "textdir:PATH", "climbmix", "parquet-url:BASE"]:
        assert text in result.output
    for option in ["--dataset", "--data-dir", "--vocab-size", "--num-shards", "--val-shard", "--cache-dir"]:
        assert option in result.output


def test_prepare_rejects_unknown_dataset(tmp_path: Path) -> None:
    """An unknown source must fail (prepare.py says why) and write nothing."""
    data_dir = tmp_path / "data"
    proc = subprocess.run(
        [*cli_command(), "prepare", "--dataset", "nonsense", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert not data_dir.exists() or not any(data_dir.iterdir())


def test_prepare_forwards_options_and_exit_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`autoresearch prepare` runs `prepare.py data` with the options given and exits with its code."""
    fake = tmp_path / "prepare.py"
    record = tmp_path / "argv.json"
    fake.write_text(
        "import json, sys\n"
        f"json.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n"
        "sys.exit(3)\n"
    )
    monkeypatch.setattr(runner.cli, "PREPARE_PY", fake)
    result = CliRunner().invoke(
        autoresearch,
        ["prepare", "--dataset", "textdir:/some/texts", "--data-dir", str(tmp_path / "d"),
         "--vocab-size", "512", "--num-shards", "2", "--val-shard", "5", "--cache-dir", str(tmp_path / "c")],
    )
    assert result.exit_code == 3, result.output
    assert json.loads(record.read_text()) == [
        "data", "--dataset", "textdir:/some/texts", "--data-dir", str((tmp_path / "d").resolve()),
        "--vocab-size", "512", "--num-shards", "2", "--val-shard", "5",
        "--cache-dir", str((tmp_path / "c").resolve()),
    ]


def test_prepare_data_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """AUTORESEARCH_DATA_DIR overrides the default data folder."""
    fake = tmp_path / "prepare.py"
    record = tmp_path / "argv.json"
    fake.write_text(f"import json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    monkeypatch.setattr(runner.cli, "PREPARE_PY", fake)
    monkeypatch.setenv("AUTORESEARCH_DATA_DIR", str(tmp_path / "envdata"))
    result = CliRunner().invoke(autoresearch, ["prepare"])
    assert result.exit_code == 0, result.output
    argv = json.loads(record.read_text())
    assert argv[argv.index("--data-dir") + 1] == str((tmp_path / "envdata").resolve())
    assert argv[argv.index("--dataset") + 1] == "shakespeare"
    assert argv[argv.index("--vocab-size") + 1] == "8192"


def test_overnight_refuses_bad_options_before_doing_anything() -> None:
    runner_ = CliRunner()
    result = runner_.invoke(autoresearch, ["overnight", "--agent", "llm"])
    assert result.exit_code == 2 and "--model" in result.output
    result = runner_.invoke(autoresearch, ["overnight", "--until", "25:99"])
    assert result.exit_code == 2 and "HH:MM" in result.output
    result = runner_.invoke(autoresearch, ["overnight", "--tag", "bad tag!"], catch_exceptions=False)
    assert result.exit_code == 1 and "tag" in result.output and "Traceback" not in result.output
    assert not (Path(runner.cli.__file__).resolve().parent.parent / "runs" / "bad tag!").exists()


def test_every_command_has_help() -> None:
    for command in ("prepare", "trial", "overnight", "status", "report", "reproduce", "images"):
        result = CliRunner().invoke(autoresearch, [command, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, command


def test_overnight_takes_every_free_gpu_of_a_gpu_box_and_says_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --gpus/--slots/--cluster the machine decides: on a GPU box (faked here: no machine
    of the project has a GPU and a container engine) one slot per free GPU on the CUDA base; the
    choice and its reason are printed first. --slots keeps the CPU path without asking."""
    import runner.loop
    import runner.machine

    seen: list = []
    monkeypatch.setattr(runner.machine, "detect", lambda backend="docker": runner.machine.Profile(
        "gpu", "NVML sees 2 GPU(s) (NVIDIA H200) and the Docker engine has the nvidia runtime",
        gpus=["0", "1"], base="cuda", dataset="pysource"))
    monkeypatch.setenv("AUTORESEARCH_BASE", "")     # unset for the CLI; restored after (delenv of an
    #                                               absent name would not restore what the CLI sets)

    def fake_loop(cfg, observe=None, log=None):
        seen.append((cfg.gpus, cfg.keep_rule, runner.cli.os.environ.get("AUTORESEARCH_BASE")))
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.loop, "overnight", fake_loop)
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"settings": {"dataset": "shakespeare"}}))
    args = ["overnight", "--tag", "t1", "--data-dir", str(data)]
    result = CliRunner().invoke(autoresearch, args)
    monkeypatch.setenv("AUTORESEARCH_BASE", "")     # unset for the CLI; restored after (delenv of an
    #                                               absent name would not restore what the CLI sets)
    assert "machine: gpu: NVML sees 2 GPU(s)" in result.output, result.output
    assert "data: shakespeare (prepared); a gpu machine would use pysource" in result.output
    assert seen == [(["0", "1"], "sequential", "cuda")]
    result = CliRunner().invoke(autoresearch, args + ["--slots", "2"])
    assert "machine:" not in result.output and seen[-1][0] == [None, None]


def test_images_build_takes_the_base_the_machine_needs_and_says_why(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --offline/--cuda and AUTORESEARCH_BASE, a GPU box builds the CUDA base; the
    variable still wins over the machine."""
    import runner.machine
    from runner.sandbox import images

    built: list[bool] = []
    monkeypatch.setattr(images, "ensure_base", lambda offline, rebuild=False, log=None:
                        built.append(offline) or "autoresearch/base:x")
    monkeypatch.setattr(runner.machine, "detect", lambda backend="docker": runner.machine.Profile(
        "gpu", "NVML sees 1 GPU(s) (NVIDIA H200) and the Docker engine has the nvidia runtime",
        gpus=["0"], base="cuda", dataset="pysource"))
    monkeypatch.setenv("AUTORESEARCH_BASE", "")     # unset for the CLI; restored after (delenv of an
    #                                               absent name would not restore what the CLI sets)
    result = CliRunner().invoke(autoresearch, ["images", "build"])
    assert result.exit_code == 0, result.output
    assert built == [False] and "base: cuda (gpu machine: NVML sees 1 GPU(s)" in result.output
    monkeypatch.setenv("AUTORESEARCH_BASE", "offline")
    result = CliRunner().invoke(autoresearch, ["images", "build"])
    assert built == [False, True] and "machine:" not in result.output


def test_overnight_exec_agent_options_are_checked() -> None:
    result = CliRunner().invoke(autoresearch, ["overnight", "--agent", "exec"])
    assert result.exit_code == 2 and "--agent exec needs --agent-command" in result.output
    result = CliRunner().invoke(autoresearch, ["overnight", "--agent", "search",
                                               "--agent-command", "true"])
    assert result.exit_code == 2 and "--agent-command is for --agent exec" in result.output
    result = CliRunner().invoke(autoresearch, ["overnight", "--help"])
    for option in ("--agent-command", "--agent-timeout", "--agent-env", "--agent-keep-home"):
        assert option in result.output
