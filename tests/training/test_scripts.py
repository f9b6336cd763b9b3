"""scripts/train.sh (torchrun launcher), scripts/train.py --print-config, scripts/run_evaluation.py."""

from __future__ import annotations

import json
import socket
import subprocess

from trainer_helpers import PYTHON, ROOT, script_env, tiny_overrides

TRAIN_SH = str(ROOT / "scripts" / "train.sh")
TINY = str(ROOT / "configs" / "tiny.yaml")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sets(run, *extra):
    return [a for o in tiny_overrides(run, *extra) for a in ("--set", o)]


def test_train_sh_builds_the_torchrun_command():
    env = {**script_env(), "DRY_RUN": "1"}
    args = ["--config", TINY, "--gpus-per-node", "8", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.1.2.3",
            "--master-port", "29555", "--set", "train_config.lr=1e-3", "--resume"]  # fmt: skip
    out = subprocess.run(["bash", TRAIN_SH, *args], env=env, capture_output=True, text=True, check=True).stdout
    for part in ("torch.distributed.run", "--nnodes 2", "--node-rank 1", "--nproc-per-node 8", "--master-addr 10.1.2.3",
                 "--master-port 29555", "scripts/train.py --config", "--set train_config.lr=1e-3 --resume"):  # fmt: skip
        assert part in out, (part, out)


def test_train_sh_rejects_bad_arguments():
    for args in (["--gpus-per-node", "2"], ["--config", TINY, "--gpus-per-node", "zero"],
                 ["--config", TINY, "--gpus-per-node", "1", "--nnodes", "2", "--node-rank", "2"],
                 ["--config", "missing.yaml", "--gpus-per-node", "1"], ["--bogus"]):  # fmt: skip
        proc = subprocess.run(["bash", TRAIN_SH, *args], env=script_env(), capture_output=True, text=True)
        assert proc.returncode == 2 and "error:" in proc.stderr, (args, proc.stderr)
    # a bad config is checked once before torchrun: one line and exit 2, not one per rank plus a traceback
    args = ["--config", TINY, "--gpus-per-node", "2", "--set", "model_config.peer_config.num_expertz=3"]
    proc = subprocess.run(["bash", TRAIN_SH, *args], env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert subprocess.run(["bash", TRAIN_SH, "--help"], capture_output=True).returncode == 0


def test_train_sh_runs_two_cpu_processes_then_evaluation_script(tmp_path):
    run = tmp_path / "run"
    env = {**script_env(), "PYTHON": PYTHON}
    cmd = ["bash", TRAIN_SH, "--config", TINY, "--gpus-per-node", "2", "--master-port", str(_free_port()),
           *_sets(run, "train_config.max_steps=2", "eval_config.sample_tokens=0")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "perplexity" in proc.stdout and (run / "checkpoints" / "step_00000002" / "COMPLETE").is_file()

    ev = subprocess.run([PYTHON, str(ROOT / "scripts" / "run_evaluation.py"), "--checkpoint", str(run), "--config", TINY,
                         *_sets(run), "--batches", "2"], cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert ev.returncode == 0, ev.stderr[-3000:]
    result = json.loads(ev.stdout.strip().splitlines()[-1])
    assert result["checkpoint"].endswith("step_00000002") and result["tokens"] > 0 and 1 < result["perplexity"] < 1e4

    # The model comes from the checkpoint's own config: a --config for another model size only changes data/eval.
    other = subprocess.run([PYTHON, str(ROOT / "scripts" / "run_evaluation.py"), "--checkpoint", str(run), "--config", TINY,
                            *_sets(run, "model_config.mla_config.kv_lora_rank=8"), "--batches", "2"],
                           cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert other.returncode == 0, other.stderr[-3000:]
    assert json.loads(other.stdout.strip().splitlines()[-1])["perplexity"] == result["perplexity"]

    bad = subprocess.run([PYTHON, str(ROOT / "scripts" / "run_evaluation.py"), "--checkpoint", str(tmp_path / "none"),
                          "--config", TINY], cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr


def test_print_config_shows_the_resolved_config():
    proc = subprocess.run([PYTHON, str(ROOT / "scripts" / "train.py"), "--config", TINY, "--set", "train_config.seed=7",
                           "--print-config"], cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "seed: 7" in proc.stdout and "peer_config:" in proc.stdout
